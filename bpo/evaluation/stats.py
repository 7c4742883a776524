"""Statistics of an evaluation: win / tie / lose, ΔWR with a bootstrap interval, and length-aware views.

ΔWR (win rate minus lose rate, as in the BPO paper) is a difference of proportions over a few hundred items
at most, so a point estimate alone overstates what was measured: every ΔWR here carries a percentile bootstrap
interval over items, seeded so that a report can be regenerated to the same numbers.

LLM judges favour longer answers, and a rewritten prompt often asks for more detail, so part of a ΔWR can be
length rather than quality. AlpacaEval 2 answers this with a length-controlled win rate: a regression of the
judge's preference on the length difference, read off at zero difference. That model needs many items and
hides its assumptions in a fit; this module uses a transparent, model-free alternative instead. Items are put
into strata by the ratio of the optimized answer's length to the original's (shorter, similar, longer) and
ΔWR is reported per stratum; the ΔWR of the "similar" stratum is the length-controlled ΔWR, and the Pearson
correlation between the log length ratio and the per-item score shows how much length and verdict move
together. Lengths are counted in whitespace-separated words, which needs no tokenizer and is the same for
every target model.

Everything here is a pure function of the items: no I/O, no NaN in any output, and a ``to_dict()`` on every
result that ``json.dumps`` accepts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bpo.evaluation.outcomes import ItemOutcome

#: Below this ratio of optimized to original answer length (in words) the optimized answer is "shorter".
SHORTER_BELOW = 0.8
#: Above this ratio the optimized answer is "longer"; ratios from SHORTER_BELOW to LONGER_ABOVE, both
#: included, are "similar". The bounds are reciprocal (0.8 = 1 / 1.25), so the strata are symmetric in log space.
LONGER_ABOVE = 1.25

Stratum = Literal["shorter", "similar", "longer"]
STRATA: tuple[Stratum, ...] = ("shorter", "similar", "longer")

#: How an empty category is shown.
NO_CATEGORY = "(none)"

DEFAULT_BOOTSTRAP_SAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95

Interval = tuple[float, float]


def _round(value: float) -> float:
    # Adding 0.0 turns a rounded -0.0 into 0.0, so the JSON never shows a signed zero.
    return round(float(value), 4) + 0.0


def _round_interval(interval: Interval) -> list[float]:
    return [_round(interval[0]), _round(interval[1])]


def _rate(count: int, n: int) -> float:
    return count / n if n else 0.0


def item_score(item: ItemOutcome) -> int:
    """+1 when the optimized answer won, -1 when the original did, 0 for a tie."""
    if item.winner == "optimized":
        return 1
    if item.winner == "original":
        return -1
    return 0


def word_count(text: str) -> int:
    """Whitespace-separated words."""
    return len(text.split())


def length_ratio(item: ItemOutcome) -> float:
    """Words of the optimized answer over words of the original; an empty answer counts as one word."""
    return max(word_count(item.optimized_answer), 1) / max(word_count(item.original_answer), 1)


def length_stratum(ratio: float) -> Stratum:
    """The stratum of a length ratio; both bounds belong to "similar"."""
    if ratio < SHORTER_BELOW:
        return "shorter"
    if ratio > LONGER_ABOVE:
        return "longer"
    return "similar"


def category_label(category: str) -> str:
    return category.strip() or NO_CATEGORY


def _tally(items: Iterable[ItemOutcome]) -> tuple[int, int, int]:
    wins = ties = losses = 0
    for item in items:
        score = item_score(item)
        if score > 0:
            wins += 1
        elif score < 0:
            losses += 1
        else:
            ties += 1
    return wins, ties, losses


def _resampled_counts(
    counts: Sequence[int], *, bootstrap_samples: int, seed: int, confidence: float
) -> np.ndarray[Any, np.dtype[np.int64]] | None:
    """``bootstrap_samples`` item bootstrap resamples of items with these outcome counts, as counts (one row
    each); None when there are no items.

    Resampling n items with replacement only matters through how many of each outcome were drawn, and those
    counts are multinomial with the observed shares as probabilities. Drawing the counts directly is therefore
    the item bootstrap exactly, in memory independent of n.
    """
    if bootstrap_samples < 1:
        raise ValueError(f"bootstrap_samples must be at least 1, got {bootstrap_samples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    if min(counts) < 0:
        raise ValueError(f"outcome counts must not be negative, got {tuple(counts)}")
    n = sum(counts)
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, [count / n for count in counts], size=bootstrap_samples)


def _percentile_interval(values: np.ndarray[Any, np.dtype[np.float64]], confidence: float) -> Interval:
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2, 1.0 - alpha / 2])
    return (float(low), float(high))


def bootstrap_delta_wr(
    wins: int,
    ties: int,
    losses: int,
    *,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """Percentile bootstrap interval of ΔWR over items with the given outcome counts ((0, 0) without items)."""
    counts = _resampled_counts(
        (wins, ties, losses), bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence
    )
    if counts is None:
        return (0.0, 0.0)
    n = wins + ties + losses
    return _percentile_interval((counts[:, 0] - counts[:, 2]) / n, confidence)


def bootstrap_share(
    count: int,
    n: int,
    *,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """Percentile bootstrap interval of the share ``count / n`` of items with some property ((0, 0) without
    items): the same item bootstrap as ``bootstrap_delta_wr``, with two outcomes."""
    if count > n:
        raise ValueError(f"count {count} exceeds the {n} items")
    counts = _resampled_counts(
        (count, n - count), bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence
    )
    if counts is None:
        return (0.0, 0.0)
    return _percentile_interval(counts[:, 0] / n, confidence)


@dataclass(frozen=True, slots=True)
class Outcomes:
    """Win / tie / lose of a group of items (a comparison, a category, a length stratum) and its ΔWR with a
    bootstrap interval."""

    n: int
    wins: int
    ties: int
    losses: int
    delta_wr: float
    delta_wr_ci: Interval

    @classmethod
    def of(cls, items: Iterable[ItemOutcome], *, bootstrap_samples: int, seed: int, confidence: float) -> Outcomes:
        wins, ties, losses = _tally(items)
        n = wins + ties + losses
        interval = bootstrap_delta_wr(
            wins, ties, losses, bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence
        )
        return cls(n=n, wins=wins, ties=ties, losses=losses, delta_wr=_rate(wins - losses, n), delta_wr_ci=interval)

    @property
    def win_rate(self) -> float:
        return _rate(self.wins, self.n)

    @property
    def tie_rate(self) -> float:
        return _rate(self.ties, self.n)

    @property
    def lose_rate(self) -> float:
        return _rate(self.losses, self.n)

    def to_dict(self, *, rates: bool = False) -> dict[str, Any]:
        """Counts, then with ``rates`` the win, tie and lose rates, then ΔWR and its interval."""
        data: dict[str, Any] = {"n": self.n, "wins": self.wins, "ties": self.ties, "losses": self.losses}
        if rates:
            data |= {
                "win_rate": _round(self.win_rate),
                "tie_rate": _round(self.tie_rate),
                "lose_rate": _round(self.lose_rate),
            }
        return data | {"delta_wr": _round(self.delta_wr), "delta_wr_ci": _round_interval(self.delta_wr_ci)}


@dataclass(frozen=True, slots=True)
class Summary:
    """The outcomes of one comparison with its ΔWR and bootstrap interval, and judge and rewrite health.

    ``position_consistency`` is the share of items judged in both orders whose two verdicts agreed; items
    with identical answers were never shown to the judge and do not count. It is None when no item reached
    the judge.
    """

    outcomes: Outcomes
    position_consistency: float | None
    identical_answers: int
    unchanged_prompts: int
    unchanged_rate: float

    def to_dict(self) -> dict[str, Any]:
        return self.outcomes.to_dict(rates=True) | {
            "position_consistency": None if self.position_consistency is None else _round(self.position_consistency),
            "identical_answers": self.identical_answers,
            "unchanged_prompts": self.unchanged_prompts,
            "unchanged_rate": _round(self.unchanged_rate),
        }


def summarize(
    items: Sequence[ItemOutcome],
    *,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Summary:
    judged_twice = [item for item in items if item.judged_orders == 2]
    consistency = sum(item.position_consistent for item in judged_twice) / len(judged_twice) if judged_twice else None
    unchanged = sum(not item.prompt_changed for item in items)
    return Summary(
        outcomes=Outcomes.of(items, bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence),
        position_consistency=consistency,
        identical_answers=sum(item.judged_orders == 0 for item in items),
        unchanged_prompts=unchanged,
        unchanged_rate=_rate(unchanged, len(items)),
    )


def by_category(
    items: Sequence[ItemOutcome],
    *,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Outcomes]:
    """The outcomes of each category, in category order; an empty category is shown as ``(none)``."""
    groups: dict[str, list[ItemOutcome]] = {}
    for item in items:
        groups.setdefault(category_label(item.category), []).append(item)
    return {
        category: Outcomes.of(groups[category], bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence)
        for category in sorted(groups)
    }


@dataclass(frozen=True, slots=True)
class LengthStats:
    """Answer lengths in words.

    Means and medians are of the raw word counts; ``median_ratio`` is the median of the per-item ratios
    (optimized over original, an empty answer counting as one word); ``optimized_longer_share`` is the share
    of items whose optimized answer has strictly more words.
    """

    n: int
    original_mean: float
    original_median: float
    optimized_mean: float
    optimized_median: float
    median_ratio: float
    optimized_longer_share: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "original_mean": _round(self.original_mean),
            "original_median": _round(self.original_median),
            "optimized_mean": _round(self.optimized_mean),
            "optimized_median": _round(self.optimized_median),
            "median_ratio": _round(self.median_ratio),
            "optimized_longer_share": _round(self.optimized_longer_share),
        }


def length_stats(items: Sequence[ItemOutcome]) -> LengthStats:
    if not items:
        return LengthStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    original = np.array([word_count(item.original_answer) for item in items], dtype=float)
    optimized = np.array([word_count(item.optimized_answer) for item in items], dtype=float)
    ratios = np.array([length_ratio(item) for item in items], dtype=float)
    return LengthStats(
        n=len(items),
        original_mean=float(original.mean()),
        original_median=float(np.median(original)),
        optimized_mean=float(optimized.mean()),
        optimized_median=float(np.median(optimized)),
        median_ratio=float(np.median(ratios)),
        optimized_longer_share=float((optimized > original).mean()),
    )


@dataclass(frozen=True, slots=True)
class LengthControl:
    """ΔWR per length stratum, the length-controlled ΔWR and the length-verdict correlation.

    ``strata`` always has the three strata in the order shorter, similar, longer (an empty one with n = 0).
    ``length_controlled_delta_wr`` and its interval are those of the "similar" stratum, None when it is
    empty. ``length_win_correlation`` is Pearson's r between log(length ratio) and the per-item score, None
    with fewer than three items or when either has no variance.
    """

    strata: Mapping[Stratum, Outcomes]
    length_controlled_delta_wr: float | None
    length_controlled_ci: Interval | None
    length_win_correlation: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bounds": {"shorter_below": SHORTER_BELOW, "longer_above": LONGER_ABOVE},
            "strata": [{"stratum": name, **outcomes.to_dict()} for name, outcomes in self.strata.items()],
            "length_controlled_delta_wr": (
                None if self.length_controlled_delta_wr is None else _round(self.length_controlled_delta_wr)
            ),
            "length_controlled_ci": (
                None if self.length_controlled_ci is None else _round_interval(self.length_controlled_ci)
            ),
            "length_win_correlation": (
                None if self.length_win_correlation is None else _round(self.length_win_correlation)
            ),
        }


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r, or None when it is undefined (fewer than three pairs, or a constant variable)."""
    if len(xs) != len(ys):
        raise ValueError(f"pearson needs pairs, got {len(xs)} and {len(ys)} values")
    if len(xs) < 3:
        return None
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    # An exact range test, not a variance threshold: the mean of equal floats can differ from them in the
    # last bit, and a near-zero denominator built from that would yield an arbitrary r.
    if np.ptp(x) == 0 or np.ptp(y) == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    dx = x - x.mean()
    dy = y - y.mean()
    denominator = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denominator == 0.0:
        return None
    return max(-1.0, min(1.0, float((dx * dy).sum()) / denominator))


def length_controlled(
    items: Sequence[ItemOutcome],
    *,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> LengthControl:
    ratios = [length_ratio(item) for item in items]
    groups: dict[Stratum, list[ItemOutcome]] = {name: [] for name in STRATA}
    for item, ratio in zip(items, ratios, strict=True):
        groups[length_stratum(ratio)].append(item)
    strata = {
        name: Outcomes.of(groups[name], bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence)
        for name in STRATA
    }
    similar = strata["similar"]
    correlation = pearson([math.log(ratio) for ratio in ratios], [float(item_score(item)) for item in items])
    return LengthControl(
        strata=strata,
        length_controlled_delta_wr=similar.delta_wr if similar.n else None,
        length_controlled_ci=similar.delta_wr_ci if similar.n else None,
        length_win_correlation=correlation,
    )
