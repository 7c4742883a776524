"""Whether a finished job did its work: the one rule every command that waits for jobs applies.

A job whose items failed beyond what the caller allows, a cancelled job, a failed job and a job with no items
at all are problems: the command says why (how many failed, the most frequent reasons) and exits non-zero.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from bpo.messages import STAGE_NAMES
from bpo.v1 import bpo_pb2 as pb

MAX_REASONS = 5


@dataclass(frozen=True, slots=True)
class JobOutcome:
    job_id: str
    name: str
    state: pb.JobState.ValueType
    total: int
    failed: int
    # Distinct failure reasons with how often each occurred, the most frequent first (the first few).
    reasons: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, report: pb.JobReport, max_reasons: int = MAX_REASONS) -> JobOutcome:
        counts: Counter[str] = Counter()
        for reason in report.failure_reasons:  # most frequent first
            stage = STAGE_NAMES.get(reason.stage, "submit")
            counts[f"[{stage}] {reason.reason or 'no reason recorded'}"] += int(reason.count)
        return cls(
            job_id=report.job.job_id,
            name=report.job.spec.name,
            state=report.job.state,
            total=int(report.items) + int(report.rejected),
            failed=int(report.failed),
            reasons=tuple(counts.items())[:max_reasons],
        )

    @property
    def failure_rate(self) -> float:
        return self.failed / self.total if self.total else 1.0

    def problem(self, max_failure_rate: float = 0.0) -> str | None:
        """Why this job did not do enough of its work, or None when it did."""
        label = f"job {self.job_id}" + (f" ({self.name})" if self.name else "")
        state = self.state
        if state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_UNSPECIFIED):
            headline = f"{label} has not finished"
        elif state == pb.JOB_STATE_CANCELLED:
            headline = f"{label} was cancelled ({self.failed} of {self.total} items had failed)"
        elif self.total == 0:
            headline = f"{label} had no items to process"
        elif state == pb.JOB_STATE_FAILED:
            headline = f"{label} failed: none of its {self.total} items finished"
        elif self.failure_rate > max_failure_rate:
            headline = (
                f"{label} partially failed: {self.failed} of {self.total} items failed "
                f"({self.failure_rate:.1%}, allowed {max_failure_rate:.1%})"
            )
        else:
            return None
        return "\n".join([headline, *self.reason_lines()])

    def reason_lines(self) -> list[str]:
        if not self.reasons:
            return []
        lines = ["  most frequent failure reasons:"]
        lines += [f"    {count}x {reason}" for reason, count in self.reasons]
        return lines
