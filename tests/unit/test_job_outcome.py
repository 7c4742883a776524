"""A finished job's outcome decides the exit status of every command that waits for it."""

from __future__ import annotations

import pytest

from bpo.corpus.run import CorpusRunSummary
from bpo.pipeline.outcome import JobOutcome
from bpo.v1 import bpo_pb2 as pb

pytestmark = pytest.mark.unit


def report(
    state: pb.JobState.ValueType, items: int, failures: list[tuple[str, pb.Stage.ValueType, str]]
) -> pb.JobReport:
    """``failures``: (item id, stage, reason); an empty item id is a corpus line rejected at submission. The
    reasons are summarised as the store does: by (stage, reason), most frequent first, then by first line."""
    lines: dict[tuple[pb.Stage.ValueType, str], list[int]] = {}
    for line, (_, stage, reason) in enumerate(failures):
        lines.setdefault((stage, reason), []).append(line)
    ranked = sorted(lines.items(), key=lambda entry: (-len(entry[1]), entry[1][0]))
    return pb.JobReport(
        job=pb.Job(job_id="j1", spec=pb.JobSpec(name="eval/vicuna"), state=state),
        items=items,
        failed=len(failures),
        rejected=sum(1 for item_id, _, _ in failures if not item_id),
        failures=[pb.ItemFailure(item_id=i, stage=s, reason=r, line=n) for n, (i, s, r) in enumerate(failures)],
        failure_reasons=[
            pb.FailureReason(stage=stage, reason=reason, count=len(at), sample_lines=at[:5])
            for (stage, reason), at in ranked
        ],
    )


def test_a_succeeded_job_is_no_problem() -> None:
    assert JobOutcome.of(report(pb.JOB_STATE_SUCCEEDED, 10, [])).problem() is None


def test_every_item_failed_is_a_problem_with_its_reasons() -> None:
    crash = "WorkerLostError('Worker exited prematurely: signal 11 (SIGSEGV)')"
    outcome = JobOutcome.of(report(pb.JOB_STATE_FAILED, 10, [(f"i{n}", pb.STAGE_REWRITE, crash) for n in range(10)]))
    problem = outcome.problem()
    assert problem is not None
    assert problem.splitlines()[0] == "job j1 (eval/vicuna) failed: none of its 10 items finished"
    assert f"10x [rewrite] {crash}" in problem


def test_partial_failure_is_judged_against_the_allowed_rate() -> None:
    failures = [("i1", pb.STAGE_GENERATE, "endpoint rejected the request"), ("", pb.STAGE_UNSPECIFIED, "bad JSON")]
    outcome = JobOutcome.of(report(pb.JOB_STATE_PARTIALLY_FAILED, 9, failures))
    assert (outcome.total, outcome.failed) == (10, 2)  # the rejected line counts as an item
    problem = outcome.problem(0.0)
    assert problem is not None and "2 of 10 items failed (20.0%, allowed 0.0%)" in problem
    assert "1x [generate] endpoint rejected the request" in problem and "1x [submit] bad JSON" in problem
    assert outcome.problem(0.2) is None
    assert outcome.problem(0.19) is not None


def test_distinct_reasons_are_counted_and_capped() -> None:
    failures = [(f"i{n}", pb.STAGE_JUDGE, f"reason {n % 7}") for n in range(20)]
    outcome = JobOutcome.of(report(pb.JOB_STATE_PARTIALLY_FAILED, 40, failures))
    assert [reason for reason, _ in outcome.reasons] == [f"[judge] reason {n}" for n in range(5)]
    assert dict(outcome.reasons)["[judge] reason 0"] == 3


@pytest.mark.parametrize(
    ("state", "items", "headline"),
    [
        (pb.JOB_STATE_CANCELLED, 5, "was cancelled"),
        (pb.JOB_STATE_FAILED, 0, "had no items to process"),
        (pb.JOB_STATE_RUNNING, 5, "has not finished"),
    ],
)
def test_other_endings_are_problems_whatever_the_rate(state: pb.JobState.ValueType, items: int, headline: str) -> None:
    problem = JobOutcome.of(report(state, items, [])).problem(1.0)
    assert problem is not None and headline in problem


def test_a_corpus_run_fails_loudly() -> None:
    assert CorpusRunSummary(done=3).problem(0.0) is None
    assert CorpusRunSummary(done=0, skipped=2).problem(0.0) is None
    assert CorpusRunSummary().problem(1.0) == "the corpus holds no prompts"
    assert CorpusRunSummary(done=2, failed=2).problem(0.0) == "2 of 4 prompts failed (50.0%, allowed 0.0%)"
    assert CorpusRunSummary(done=2, failed=2).problem(0.5) is None
