from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from bpo.corpus.formats import CorpusError, CorpusRecord
from bpo.errors import InvalidConfigurationError
from bpo.evaluation.augment import alpaca_record
from bpo.evaluation.outcomes import Comparison, ItemOutcome
from bpo.evaluation.runner import (
    EvalPlan,
    EvalRunner,
    Variant,
    corpus_path,
    item_outcome,
    job_spec,
    with_kept_by_round,
)
from bpo.pipeline.client import JobsClient, submit_requests
from bpo.v1 import bpo_pb2 as pb

pytestmark = pytest.mark.unit


def exported(source_id: str, *, optimized: str, winner: str = "optimized", identical: bool = False) -> dict[str, Any]:
    judgements = (
        [] if identical else [{"optimized_first": True, "verdict": "A"}, {"optimized_first": False, "verdict": "B"}]
    )
    return {
        "item_id": f"id-{source_id}",
        "source_id": source_id,
        "line": 1,
        "category": "writing",
        "prompt": "Write a poem.",
        "status": "done",
        "winner": winner,
        "rewrite": {"optimized": optimized, "rounds_done": 2},
        "verdict": {
            "answers": {"original_answer": "roses", "optimized_answer": "roses" if identical else "violets"},
            "judgements": judgements,
            "position_consistent": not identical,
            **({"identical_answers": True} if identical else {}),
        },
    }


def test_an_exported_item_becomes_an_outcome() -> None:
    outcome = item_outcome(exported("s1", optimized="Write a rhyming poem about spring."))
    assert outcome is not None
    assert (outcome.source_id, outcome.category, outcome.winner) == ("s1", "writing", "optimized")
    assert (outcome.original_answer, outcome.optimized_answer) == ("roses", "violets")
    assert outcome.judged_orders == 2 and outcome.position_consistent and outcome.verdicts == ("A", "B")
    assert outcome.prompt_changed and outcome.rounds_done == 2


def test_identical_answers_were_judged_by_no_one() -> None:
    outcome = item_outcome(exported("s1", optimized="Write a poem.", winner="tie", identical=True))
    assert outcome is not None and outcome.judged_orders == 0 and not outcome.position_consistent
    assert not outcome.prompt_changed


def test_an_item_without_a_verdict_is_no_outcome() -> None:
    assert item_outcome({"item_id": "x", "source_id": "s", "prompt": "p", "status": "failed"}) is None


def outcome(source_id: str, prompt: str, optimized: str) -> ItemOutcome:
    return ItemOutcome(source_id, source_id, "", prompt, optimized, "a", "b", "tie", 2, True)


def comparison(rounds: int, *items: ItemOutcome, variant: str = "bpo") -> Comparison:
    return Comparison("vicuna", variant, "m", rounds, f"job-{variant}-{rounds}", tuple(items))


def test_kept_by_round_compares_each_round_with_the_one_before() -> None:
    r1 = comparison(1, outcome("a", "p", "p1"), outcome("b", "q", "q"))
    r2 = comparison(2, outcome("a", "p", "p2"), outcome("b", "q", "q"))
    r3 = comparison(3, outcome("a", "p", "p2"), outcome("b", "q", "q"))
    shares = [c.kept_by_last_round for c in with_kept_by_round([r1, r2, r3])]
    assert shares == [0.5, 0.5, 1.0]


def test_kept_by_round_needs_the_previous_round_of_the_same_variant() -> None:
    r2 = comparison(2, outcome("a", "p", "p2"))
    other = comparison(1, outcome("a", "p", "p2"), variant="no-feedback")
    assert [c.kept_by_last_round for c in with_kept_by_round([r2, other])] == [None, 0.0]


def plan(**overrides: Any) -> EvalPlan:
    values: dict[str, Any] = {
        "sets": ("vicuna",),
        "variants": (Variant("bpo", "trained"), Variant("no-feedback", "base")),
        "rounds": 2,
        "limit": 3,
        "target": pb.ModelEndpoint(model="target"),
        "judge": pb.ModelEndpoint(model="judge", max_new_tokens=64),
        "judge_template": "ranking",
        "seed": 7,
    }
    return EvalPlan(**(values | overrides))


def test_job_spec_names_the_comparison_and_carries_every_setting() -> None:
    spec = job_spec(plan(), "vicuna", Variant("no-feedback", "base"), 2)
    assert spec.name == "eval/vicuna/no-feedback/r2"
    assert spec.optimizer_model == "base" and spec.params.rounds == 2 and spec.params.seed == 7
    assert spec.judge_template == "ranking" and spec.judge.max_new_tokens == 64 and spec.target.model == "target"


def test_a_set_is_a_shipped_name_or_an_existing_file(tmp_path: Path) -> None:
    assert corpus_path("self-instruct").name == "self_instruct_eval.json"
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"prompt": "hi"}\n')
    assert corpus_path(str(corpus)) == corpus
    with pytest.raises(InvalidConfigurationError, match="neither a shipped set"):
        corpus_path(str(tmp_path / "missing.jsonl"))


class FakeJobs:
    """Records submissions; every job is finished and holds one item."""

    def __init__(self) -> None:
        self.submitted: list[tuple[pb.JobSpec, list[CorpusRecord | CorpusError]]] = []

    def submit(
        self,
        spec: pb.JobSpec,
        entries: Iterable[CorpusRecord | CorpusError],
        on_bad_line: Callable[[CorpusError], None] | None = None,
    ) -> pb.SubmitJobResponse:
        self.submitted.append((spec, list(entries)))
        return pb.SubmitJobResponse(job_id=f"job-{len(self.submitted)}")

    def wait(self, job_ids: Sequence[str], on_progress: Any = None) -> list[pb.Job]:
        return [pb.Job(job_id=j, state=pb.JOB_STATE_SUCCEEDED) for j in job_ids]

    def export(self, job_id: str) -> Iterator[dict[str, Any]]:
        yield exported("s1", optimized=f"rewritten by {job_id}")
        yield {"item_id": "x", "source_id": "s2", "line": 2, "prompt": "p", "status": "failed",
               "failed_stage": "rewrite", "error": "too long"}  # fmt: skip

    def report(self, job_id: str) -> pb.JobReport:
        return pb.JobReport(failures=[pb.ItemFailure(line=9, reason="not JSON")])


def test_runner_submits_one_job_per_comparison_and_resumes_from_its_plan(tmp_path: Path) -> None:
    fake = FakeJobs()
    runner = EvalRunner(cast(JobsClient, fake), tmp_path)
    jobs = runner.submit(plan())
    assert [(j.variant, j.rounds) for j in jobs] == [("bpo", 1), ("bpo", 2), ("no-feedback", 1), ("no-feedback", 2)]
    assert all(len(entries) == 3 for _, entries in fake.submitted)  # --limit applies to every job
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert [j["job"]["job_id"] for j in saved["jobs"]] == ["job-1", "job-2", "job-3", "job-4"]

    again = EvalRunner(cast(JobsClient, fake), tmp_path).submit(plan())
    assert again == jobs and len(fake.submitted) == 4  # nothing submitted twice

    with pytest.raises(InvalidConfigurationError, match="other settings"):
        EvalRunner(cast(JobsClient, fake), tmp_path).submit(plan(seed=8))


def test_runner_turns_jobs_into_comparisons_with_their_failures(tmp_path: Path) -> None:
    fake = FakeJobs()
    runner = EvalRunner(cast(JobsClient, fake), tmp_path)
    (first, *_) = runner.comparisons(runner.submit(plan(rounds=1)))
    assert (first.set_name, first.variant, first.rounds, first.job_id) == ("vicuna", "bpo", 1, "job-1")
    assert [i.optimized_prompt for i in first.items] == ["rewritten by job-1"]
    assert first.failed == 2
    assert first.failures == ("line 9: not JSON", "line 2: [rewrite] too long")


def test_submit_stream_starts_with_the_spec_and_carries_bad_lines_as_rejections() -> None:
    bad: list[CorpusError] = []
    entries: list[CorpusRecord | CorpusError] = [CorpusRecord(1, "a", "hi", None, "cat"), CorpusError(2, "not JSON")]
    stream = list(submit_requests(pb.JobSpec(name="n"), entries, bad.append))
    assert stream[0].spec.name == "n"
    assert stream[1].item.prompt == "hi" and stream[1].item.category == "cat" and stream[1].item.line == 1
    assert stream[2].rejected.line == 2 and stream[2].rejected.reason == "not JSON"
    assert [e.line for e in bad] == [2]


def test_alpaca_record_keeps_the_instruction_and_answers_the_optimized_one() -> None:
    item = {
        "source_id": "7",
        "prompt": "Summarize.",
        "context": "Cats sleep.",
        "status": "done",
        "rewrite": {"optimized": "Summarize the passage in one sentence.", "fallback_reason": ""},
        "answers": {"original_answer": "Cats nap.", "optimized_answer": "Cats sleep a great deal."},
    }
    assert alpaca_record(item) == {
        "instruction": "Summarize.",
        "input": "Cats sleep.",
        "output": "Cats sleep a great deal.",
        "optimized_instruction": "Summarize the passage in one sentence.",
        "original_output": "Cats nap.",
        "source_id": "7",
    }
    kept = alpaca_record(item | {"rewrite": {"optimized": "Summarize.", "fallback_reason": "refusal"}})
    assert kept is not None and kept["fallback_reason"] == "refusal"
    assert alpaca_record({"prompt": "p", "status": "failed"}) is None
