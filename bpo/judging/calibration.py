"""Known preference pairs for calibrating a judge, and judging them in both orders.

A known pair is a question with two responses and the one a person preferred: the good and bad responses of
the BPO construction records whose data allows redistribution (OASST1 and HH-RLHF origins; those built from
Alpaca-GPT4 and Chatbot Arena are left out), and the single-turn pairs of HH-RLHF harmless-base. They ship in
``bpo/resources/calibration`` (its SOURCES.md gives origins and licences) and are read with the importers
``bpo pairs import`` uses, as ``PreferenceRecord``s: ``chosen`` is the preferred response.

A pair goes to ``PairwiseJudge`` as an answer pair with the preferred response in the optimized slot, so the
judge's two orders show the preferred response first and then second, and its verdict "optimized" means it
agreed with the person. Both orders are judged for every pair; orders that disagree are a tie, as in an
evaluation, so a calibration measures the judge exactly as ``bpo eval`` uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bpo.errors import CorpusFormatError, InvalidConfigurationError
from bpo.judging.pairwise import JudgeInput, PairVerdict, PairwiseJudge
from bpo.judging.verdicts import VerdictLetter
from bpo.pairs.importers import read_records
from bpo.pairs.records import ImportIssue, PreferenceRecord

CalibrationSet = Literal["bpo", "hh-rlhf"]
CALIBRATION_SETS: tuple[CalibrationSet, ...] = ("bpo", "hh-rlhf")
PairFormat = Literal["bpo", "hh-rlhf"]
_PACKAGED_FILES: dict[CalibrationSet, tuple[str, ...]] = {
    "bpo": ("bpo_val_oasst1_hh_rlhf.json", "bpo_test_oasst1_hh_rlhf.json"),
    "hh-rlhf": ("hh_rlhf_harmless_base_test_single_turn.jsonl",),
}
# A BPO construction record keeps the terms of the data it was built from; only these allow redistribution.
REDISTRIBUTABLE_BPO_ORIGINS = frozenset({"oasst1", "hh-rlhf"})
DEFAULT_MAX_PAIR_WORDS = 600

Outcome = Literal["correct", "wrong", "tie"]


def packaged_pairs_path(file_name: str) -> Path:
    return Path(str(resources.files("bpo.resources").joinpath("calibration", file_name)))


def read_known_pairs(path: Path, fmt: PairFormat) -> list[PreferenceRecord]:
    """The known pairs of a file in the ``bpo`` or ``hh-rlhf`` format, in file order.

    Kept: single-turn records with two different, non-empty responses and, for BPO records, an origin that
    allows redistribution. A malformed record is an error: calibration data is curated, and a silently
    shorter set would change what a calibration measured.
    """
    pairs = []
    for item in read_records(path, fmt, path.stem):
        if isinstance(item, ImportIssue):
            raise CorpusFormatError(f"{path}: line {item.line}: {item.reason}")
        if not isinstance(item, PreferenceRecord):
            continue
        if fmt == "bpo" and item.extra.get("origin") not in REDISTRIBUTABLE_BPO_ORIGINS:
            continue
        if not item.chosen.strip() or not item.rejected.strip() or item.chosen.strip() == item.rejected.strip():
            continue
        pairs.append(item)
    return pairs


def packaged_pairs(sets: Iterable[CalibrationSet] = CALIBRATION_SETS) -> list[PreferenceRecord]:
    """Every shipped known pair of ``sets``, set by set, each in file order."""
    pairs = []
    for set_name in sets:
        if set_name not in _PACKAGED_FILES:
            raise InvalidConfigurationError(
                f"unknown calibration set {set_name!r}; choose from {', '.join(CALIBRATION_SETS)}"
            )
        for file_name in _PACKAGED_FILES[set_name]:
            pairs += read_known_pairs(packaged_pairs_path(file_name), set_name)
    return pairs


def pair_id(pair: PreferenceRecord) -> str:
    """The file a pair came from and the line it starts on."""
    return f"{pair.dataset}:{pair.position}"


def pair_group(pair: PreferenceRecord) -> str:
    """The data a pair's preference was recorded in: ``bpo/oasst1``, ``bpo/hh-rlhf`` or ``hh-rlhf``."""
    origin = pair.extra.get("origin")
    return f"{pair.source}/{origin}" if pair.source == "bpo" and origin else pair.source


def question_of(pair: PreferenceRecord) -> str:
    """What the judge is told the user asked: the instruction, and its context on the next line, the layout the
    judge stage shows an evaluated prompt in."""
    return f"{pair.instruction}\n{pair.context}" if pair.context else pair.instruction


def pair_words(pair: PreferenceRecord) -> int:
    return sum(len(text.split()) for text in (question_of(pair), pair.chosen, pair.rejected))


def judge_input(pair: PreferenceRecord) -> JudgeInput:
    """The preferred response in the optimized slot: the judge's "optimized" means it agreed with the person."""
    return JudgeInput(question_of(pair), original_answer=pair.rejected, optimized_answer=pair.chosen)


def select_pairs(
    pairs: Sequence[PreferenceRecord], *, limit: int, seed: int, max_words: int = DEFAULT_MAX_PAIR_WORDS
) -> list[PreferenceRecord]:
    """Up to ``limit`` pairs of at most ``max_words`` words (question and both responses together).

    Each set (``PreferenceRecord.source``: bpo, hh-rlhf) is shuffled with ``seed``, and the sets are taken in
    turn, so each gets an equal share of the limit while it has pairs left. The same pairs, seed and limit
    always give the same selection, in the same order.
    """
    if limit < 1:
        raise InvalidConfigurationError(f"limit must be at least 1, got {limit}")
    rng = np.random.default_rng(seed)
    by_set: dict[str, list[PreferenceRecord]] = {}
    for pair in pairs:
        if pair_words(pair) <= max_words:
            by_set.setdefault(pair.source, []).append(pair)
    queues = []
    for source in sorted(by_set):
        members = by_set[source]
        queues.append(iter([members[int(index)] for index in rng.permutation(len(members))]))
    return list(_round_robin(queues, limit))


def _round_robin(queues: list[Iterator[PreferenceRecord]], limit: int) -> Iterator[PreferenceRecord]:
    taken = 0
    while queues and taken < limit:
        for queue in list(queues):
            pair = next(queue, None)
            if pair is None:
                queues.remove(queue)
                continue
            yield pair
            taken += 1
            if taken == limit:
                return


@dataclass(frozen=True, slots=True)
class KnownPairJudgement:
    """How the judge decided one known pair.

    ``outcome``: ``correct`` when both orders picked the preferred response, ``wrong`` when both picked the
    rejected one, ``tie`` otherwise (a tie verdict, orders that disagree, or an unreadable order).
    ``verdicts``: the letters of the two orders, the preferred response shown first, then second ("" when
    unreadable); with the preferred response first, "A" picks it, and with it second, "B" does.
    """

    pair_id: str
    group: str
    outcome: Outcome
    position_consistent: bool
    verdicts: tuple[VerdictLetter, VerdictLetter]
    truncated_orders: int
    tokens_in: int
    tokens_out: int

    @property
    def unreadable_orders(self) -> int:
        return sum(letter == "" for letter in self.verdicts)

    @property
    def first_shown_picks(self) -> int:
        """Orders whose verdict picked the response shown first."""
        return sum(letter == "A" for letter in self.verdicts)

    @property
    def second_shown_picks(self) -> int:
        return sum(letter == "B" for letter in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pair_id": self.pair_id,
            "group": self.group,
            "outcome": self.outcome,
            "position_consistent": self.position_consistent,
            "verdicts": list(self.verdicts),
            "truncated_orders": self.truncated_orders,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnownPairJudgement:
        first, second = data["verdicts"]
        return cls(
            pair_id=str(data["pair_id"]),
            group=str(data["group"]),
            outcome=_outcome(str(data["outcome"])),
            position_consistent=bool(data["position_consistent"]),
            verdicts=(_letter(first), _letter(second)),
            truncated_orders=int(data["truncated_orders"]),
            tokens_in=int(data["tokens_in"]),
            tokens_out=int(data["tokens_out"]),
        )


def _outcome(value: str) -> Outcome:
    if value == "correct":
        return "correct"
    if value == "wrong":
        return "wrong"
    if value == "tie":
        return "tie"
    raise ValueError(f"unknown calibration outcome {value!r}")


def _letter(value: object) -> VerdictLetter:
    if value == "A":
        return "A"
    if value == "B":
        return "B"
    if value == "C":
        return "C"
    if value == "":
        return ""
    raise ValueError(f"unknown verdict letter {value!r}")


def known_pair_judgement(pair: PreferenceRecord, verdict: PairVerdict) -> KnownPairJudgement:
    """A pair's judgement from the judge's verdict on ``judge_input(pair)``."""
    if verdict.identical_answers or len(verdict.judgements) != 2:
        raise ValueError(f"pair {pair_id(pair)} was not judged in both orders")
    preferred_first, preferred_second = verdict.judgements
    outcome: Outcome = (
        "correct" if verdict.winner == "optimized" else "wrong" if verdict.winner == "original" else "tie"
    )
    return KnownPairJudgement(
        pair_id=pair_id(pair),
        group=pair_group(pair),
        outcome=outcome,
        position_consistent=verdict.position_consistent,
        verdicts=(preferred_first.verdict, preferred_second.verdict),
        truncated_orders=sum(judgement.truncated for judgement in verdict.judgements),
        tokens_in=verdict.tokens_in,
        tokens_out=verdict.tokens_out,
    )


@dataclass(frozen=True, slots=True)
class PairFailure:
    """A pair the judge could not decide at all (it did not fit the judge's context, or the engine failed)."""

    pair_id: str
    reason: str


async def judge_known_pairs(
    judge: PairwiseJudge,
    pairs: Sequence[PreferenceRecord],
    *,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[KnownPairJudgement], list[PairFailure]]:
    """Judge every pair in both orders, ``batch_size`` pairs to an engine batch; ``on_batch`` hears how many
    pairs each finished batch held. A pair's failure is recorded and takes no other pair with it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    judged: list[KnownPairJudgement] = []
    failures: list[PairFailure] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        verdicts = await judge.judge_each([judge_input(pair) for pair in batch])
        for pair, verdict in zip(batch, verdicts, strict=True):
            if isinstance(verdict, Exception):
                failures.append(PairFailure(pair_id(pair), f"{type(verdict).__name__}: {verdict}"))
            else:
                judged.append(known_pair_judgement(pair, verdict))
        if on_batch is not None:
            on_batch(len(batch))
    return judged, failures
