"""What an evaluation measured, item by item: the input every statistic and report is computed from.

An evaluation compares, on one test set, the target's answer to the original prompt with its answer to the
rewritten prompt, for one optimizer (the *variant*: the trained optimizer, or an ablation) after a number of
rewriting rounds. Each such comparison is one :class:`Comparison`; each of its items one :class:`ItemOutcome`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Winner = Literal["optimized", "original", "tie"]


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """One judged item.

    ``winner`` is the verdict both orders agreed on (a disagreement is a tie). ``judged_orders`` is how many
    judge calls decided it: 2 normally, 0 when the two answers were identical and the tie needed no judge.
    ``position_consistent`` is true when both orders were read and agreed. ``verdicts`` are the two orders'
    raw letters (optimized shown first, then second; "" when unreadable).
    """

    item_id: str
    source_id: str
    category: str
    prompt: str
    optimized_prompt: str
    original_answer: str
    optimized_answer: str
    winner: Winner
    judged_orders: int
    position_consistent: bool
    verdicts: tuple[str, ...] = ()
    rounds_done: int = 1
    fallback_reason: str = ""

    @property
    def prompt_changed(self) -> bool:
        return self.optimized_prompt != self.prompt


@dataclass(frozen=True, slots=True)
class Comparison:
    """Original vs optimized answers on one set, for one optimizer variant after ``rounds`` rounds."""

    set_name: str
    variant: str
    optimizer_model: str
    rounds: int
    job_id: str
    items: tuple[ItemOutcome, ...]
    failed: int = 0
    failures: tuple[str, ...] = field(default=())
    # Share of items whose prompt this comparison's last round left exactly as the round before had it (the
    # original for round 1): how often a round keeps the prompt unchanged. None when not measured.
    kept_by_last_round: float | None = None
