"""An evaluation's report: JSON for machines, Markdown for people, and charts for both.

Every number is recomputed here from the item outcomes by :mod:`bpo.evaluation.stats`, so the JSON, the
Markdown and the charts cannot disagree, and the JSON carries the items themselves so that any other statistic
can be computed later without rerunning a model. The caveats are written from the data (an inconsistent judge,
few items, unchanged prompts, a length effect) because a bare ΔWR invites more confidence than it deserves.

Every ΔWR is shown beside its judge's calibration (:mod:`bpo.evaluation.calibration`): the judge's accuracy on
known preference pairs, with its interval. The report warns, first among its caveats, when the judge has no
calibration or its accuracy interval includes 50%: a ΔWR from such a judge may measure nothing.

Charts are drawn with matplotlib's Agg backend: reports are written on servers and in CI, where no display
exists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bpo.evaluation.calibration import STATISTICS_NOTE, SUMMARY_HEADER, JudgeCalibrationStatus, summary_cells
from bpo.evaluation.outcomes import Comparison, ItemOutcome
from bpo.evaluation.stats import (
    DEFAULT_BOOTSTRAP_SAMPLES,
    DEFAULT_CONFIDENCE,
    LONGER_ABOVE,
    SHORTER_BELOW,
    STRATA,
    Interval,
    LengthControl,
    LengthStats,
    Outcomes,
    Summary,
    by_category,
    length_controlled,
    length_stats,
    summarize,
    word_count,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

WIN_TIE_LOSE_PNG = "win_tie_lose.png"
DELTA_WR_BY_ROUND_PNG = "delta_wr_by_round.png"
LENGTH_STRATA_PNG = "length_strata.png"

# Below this many items a ΔWR interval is too wide to separate effects of a few points.
FEW_ITEMS = 50
# Below this share of self-agreement under swapped order, most verdicts are position effects.
LOW_POSITION_CONSISTENCY = 0.5
# Failures listed per comparison in the Markdown; the JSON has them all.
MAX_FAILURES_SHOWN = 20

_CHART_TITLES = {
    WIN_TIE_LOSE_PNG: "Win / tie / lose and ΔWR per comparison",
    DELTA_WR_BY_ROUND_PNG: "ΔWR by number of rewriting rounds",
    LENGTH_STRATA_PNG: "ΔWR by answer length stratum",
}

_WIN_COLOR = "#2e7d32"
_TIE_COLOR = "#b0b0b0"
_LOSE_COLOR = "#c62828"
_STRATUM_COLORS = {"shorter": "#1f77b4", "similar": "#7f7f7f", "longer": "#ff7f0e"}
_STRATUM_RANGES = {
    "shorter": f"r < {SHORTER_BELOW:g}",
    "similar": f"{SHORTER_BELOW:g} ≤ r ≤ {LONGER_ABOVE:g}",
    "longer": f"r > {LONGER_ABOVE:g}",
}


@dataclass(frozen=True, slots=True)
class EvalReport:
    """One evaluation run: its settings and every comparison it measured.

    ``settings`` records how the run was made (set names, target, judge, judge template, optimizer models,
    limit, rounds, seed, command line); it is shown as given. ``judge_calibration`` is what is known of the
    judge's calibration; None when nobody looked it up, which the report treats as uncalibrated.
    """

    title: str
    created: str
    settings: dict[str, Any]
    comparisons: tuple[Comparison, ...]
    judge_calibration: JudgeCalibrationStatus | None = None

    def judge_warnings(self) -> list[str]:
        """Why the judge's verdicts cannot be taken at face value (no calibration, or one no better than
        chance); the report's first caveats, and what ``bpo eval`` prints on stderr."""
        if self.judge_calibration is None:
            return [
                "no calibration of this report's judge was looked up: how often its verdicts agree with people is "
                "unknown, so ΔWR cannot be trusted; run `bpo judge calibrate` for the judge and template used."
            ]
        return self.judge_calibration.warnings()

    def judge_accuracy_text(self) -> str:
        """The judge's calibrated accuracy as shown beside each ΔWR."""
        return "not calibrated" if self.judge_calibration is None else self.judge_calibration.accuracy_text()


@dataclass(frozen=True, slots=True)
class _Bootstrap:
    """The interval settings every renderer takes: with the same ones a report renders to the same numbers."""

    samples: int = DEFAULT_BOOTSTRAP_SAMPLES
    seed: int = 0
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def label(self) -> str:
        return f"{100 * self.confidence:g}%"


@dataclass(frozen=True, slots=True)
class ComparisonStats:
    """Every statistic of one comparison; ``label`` names it in tables and charts."""

    comparison: Comparison
    summary: Summary
    categories: Mapping[str, Outcomes]
    lengths: LengthStats
    length_control: LengthControl
    label: str = ""


def comparison_stats(
    comparison: Comparison,
    *,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    label: str = "",
) -> ComparisonStats:
    items = comparison.items
    return ComparisonStats(
        comparison=comparison,
        summary=summarize(items, bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence),
        categories=by_category(items, bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence),
        lengths=length_stats(items),
        length_control=length_controlled(items, bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence),
        label=label or _base_label(comparison),
    )


def _base_label(comparison: Comparison) -> str:
    return f"{comparison.set_name} · {comparison.variant} · r{comparison.rounds}"


def _analyze(report: EvalReport, boot: _Bootstrap) -> list[ComparisonStats]:
    labels = [_base_label(c) for c in report.comparisons]
    # Two comparisons of one set, variant and rounds differ by optimizer model; say which is which.
    labels = [
        f"{label} ({c.optimizer_model})" if labels.count(label) > 1 else label
        for label, c in zip(labels, report.comparisons, strict=True)
    ]
    return [
        comparison_stats(
            c,
            bootstrap_samples=boot.samples,
            seed=boot.seed,
            confidence=boot.confidence,
            label=label,
        )
        for c, label in zip(report.comparisons, labels, strict=True)
    ]


def _round_series(stats: Sequence[ComparisonStats]) -> list[tuple[str, str, list[ComparisonStats]]]:
    """(set, variant, comparisons in round order) for each set and variant measured after 2+ round counts."""
    groups: dict[tuple[str, str], list[ComparisonStats]] = {}
    for s in stats:
        groups.setdefault((s.comparison.set_name, s.comparison.variant), []).append(s)
    return [
        (set_name, variant, sorted(group, key=lambda s: s.comparison.rounds))
        for (set_name, variant), group in sorted(groups.items())
        if len({s.comparison.rounds for s in group}) > 1
    ]


# --- JSON -------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Settings come from callers as they are; make them something ``json.dumps`` accepts, losslessly where
    JSON can say it."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((_jsonable(item) for item in value), key=str)
    return str(value)


def _item_dict(item: ItemOutcome) -> dict[str, Any]:
    return {
        "item_id": item.item_id,
        "source_id": item.source_id,
        "category": item.category,
        "prompt": item.prompt,
        "optimized_prompt": item.optimized_prompt,
        "winner": item.winner,
        "verdicts": list(item.verdicts),
        "judged_orders": item.judged_orders,
        "position_consistent": item.position_consistent,
        "original_answer_words": word_count(item.original_answer),
        "optimized_answer_words": word_count(item.optimized_answer),
        "rounds_done": item.rounds_done,
        "fallback_reason": item.fallback_reason,
    }


def _comparison_dict(s: ComparisonStats) -> dict[str, Any]:
    c = s.comparison
    return {
        "set_name": c.set_name,
        "variant": c.variant,
        "optimizer_model": c.optimizer_model,
        "rounds": c.rounds,
        "job_id": c.job_id,
        "failed": c.failed,
        "failures": list(c.failures),
        "summary": s.summary.to_dict(),
        "categories": [{"category": name, **category.to_dict()} for name, category in s.categories.items()],
        "lengths": s.lengths.to_dict(),
        "length_control": s.length_control.to_dict(),
        "items": [_item_dict(item) for item in c.items],
    }


def _round_entry(s: ComparisonStats) -> dict[str, Any]:
    summary = s.summary.to_dict()
    return {
        "rounds": s.comparison.rounds,
        "optimizer_model": s.comparison.optimizer_model,
        "job_id": s.comparison.job_id,
        "n": summary["n"],
        "delta_wr": summary["delta_wr"],
        "delta_wr_ci": summary["delta_wr_ci"],
        "unchanged_rate": summary["unchanged_rate"],
        "kept_by_this_round": s.comparison.kept_by_last_round,
    }


def _rounds_dict(stats: Sequence[ComparisonStats]) -> list[dict[str, Any]]:
    return [
        {"set_name": set_name, "variant": variant, "rounds": [_round_entry(s) for s in series]}
        for set_name, variant, series in _round_series(stats)
    ]


def _judge_accuracy_dict(report: EvalReport) -> dict[str, Any] | None:
    calibration = None if report.judge_calibration is None else report.judge_calibration.calibration
    if calibration is None:
        return None
    summary = calibration.summary.to_dict()
    return {"accuracy": summary["accuracy"], "accuracy_ci": summary["accuracy_ci"], "pairs": summary["n"]}


def _report_dict(report: EvalReport, boot: _Bootstrap, stats: Sequence[ComparisonStats]) -> dict[str, Any]:
    judge_accuracy = _judge_accuracy_dict(report)
    return {
        "title": report.title,
        "created": report.created,
        "settings": _jsonable(report.settings),
        "judge_calibration": None if report.judge_calibration is None else report.judge_calibration.to_dict(),
        "judge_warnings": report.judge_warnings(),
        "statistics": {
            "bootstrap_samples": boot.samples,
            "bootstrap_seed": boot.seed,
            "confidence": boot.confidence,
            "length_strata_bounds": {"shorter_below": SHORTER_BELOW, "longer_above": LONGER_ABOVE},
        },
        "comparisons": [_comparison_dict(s) | {"judge_accuracy": judge_accuracy} for s in stats],
        "rounds": _rounds_dict(stats),
    }


def report_dict(
    report: EvalReport,
    *,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """The whole report, items included, as plain JSON values."""
    boot = _Bootstrap(bootstrap_samples, seed, confidence)
    return _report_dict(report, boot, _analyze(report, boot))


# --- Markdown ---------------------------------------------------------------------------------------------


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def _points(delta: float) -> str:
    # Adding 0.0 after rounding keeps a tiny negative ΔWR from printing as "-0.0".
    return f"{round(100 * delta, 1) + 0.0:+.1f}"


def _delta_ci(delta: float, ci: Interval) -> str:
    return f"{_points(delta)} [{_points(ci[0])}, {_points(ci[1])}]"


def _count_pct(count: int, n: int) -> str:
    return f"{count} ({_pct(count / n if n else 0.0)})"


def _outcome_cells(outcomes: Outcomes) -> tuple[object, ...]:
    """The n, win, tie, lose and ΔWR columns of a group of items."""
    n = outcomes.n
    return (
        n,
        _count_pct(outcomes.wins, n),
        _count_pct(outcomes.ties, n),
        _count_pct(outcomes.losses, n),
        _delta_ci(outcomes.delta_wr, outcomes.delta_wr_ci),
    )


def _cell(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def _setting_text(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(str(v) for v in value) if value else "—"
    if isinstance(value, dict):
        return json.dumps(_jsonable(value), ensure_ascii=False, sort_keys=True)
    if value is None or value == "":
        return "—"
    return str(value)


def _lc_text(control: LengthControl) -> str:
    if control.length_controlled_delta_wr is None or control.length_controlled_ci is None:
        return "—"
    delta = _delta_ci(control.length_controlled_delta_wr, control.length_controlled_ci)
    return f"{delta}, n={control.strata['similar'].n}"


def _correlation_text(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _calibration_lines(report: EvalReport) -> list[str]:
    status = report.judge_calibration
    if status is None:
        return ["Not looked up for this report."]
    calibration = status.calibration
    if calibration is None:
        version = "" if status.key is None else f", model version {status.key.model_version}"
        why = f": {status.problem}" if status.problem else ""
        return [f"None stored for judge {status.judge} with template {status.template}{version}{why}."]
    summary = calibration.summary
    rows = [
        (
            status.judge,
            status.template,
            calibration.key.model_version,
            summary.n,
            *summary_cells(summary),
            "—" if calibration.max_tokens is None else calibration.max_tokens,
            calibration.created,
            status.source,
        )
    ]
    header = (
        "judge", "template", "model version", "known pairs", *SUMMARY_HEADER, "max tokens", "calibrated", "by",
    )  # fmt: skip
    return [*_table(header, rows), "", STATISTICS_NOTE]


def _caveats(report: EvalReport, boot: _Bootstrap, stats: Sequence[ComparisonStats]) -> list[str]:
    conf = boot.label
    caveats = [f"**Judge**: {warning}" for warning in report.judge_warnings()]
    for s in stats:
        summary, c = s.summary, s.comparison
        if summary.outcomes.n == 0:
            caveats.append(f"{s.label}: no judged items, so nothing can be concluded from it.")
            continue
        consistency = summary.position_consistency
        if consistency is not None and consistency < LOW_POSITION_CONSISTENCY:
            caveats.append(
                f"{s.label}: the judge gave the same verdict with the answers swapped on only {_pct(consistency)} "
                "of the items it read, so the judge is unreliable here: most of its verdicts are position effects "
                "(they count as ties), and ΔWR says little about the prompts."
            )
        low, high = summary.outcomes.delta_wr_ci
        if summary.outcomes.n < FEW_ITEMS:
            caveats.append(
                f"{s.label}: only {summary.outcomes.n} items, so the CI is wide ({conf} CI spans "
                f"{100 * (high - low):.1f} points)."
            )
        if low <= 0.0 <= high:
            caveats.append(f"{s.label}: the {conf} CI of ΔWR includes zero; no difference is established.")
        if summary.unchanged_rate >= 0.5:
            caveats.append(
                f"{s.label}: {_pct(summary.unchanged_rate)} of the prompts came back unchanged; their answers "
                "differ only by sampling, which pulls ΔWR towards zero."
            )
        correlation = s.length_control.length_win_correlation
        if correlation is not None and correlation >= 0.2 and s.lengths.optimized_longer_share > 0.5:
            caveats.append(
                f"{s.label}: optimized answers were longer on {_pct(s.lengths.optimized_longer_share)} of the items "
                f"and the verdict rises with the length ratio (r = {correlation:+.2f}); judges favour longer "
                f"answers, so compare the length-controlled ΔWR ({_lc_text(s.length_control)})."
            )
        if summary.identical_answers:
            caveats.append(
                f"{s.label}: {summary.identical_answers} items had identical answers and count as ties without a "
                "judge call."
            )
        if c.failed:
            caveats.append(f"{s.label}: {c.failed} items failed and are not counted.")
    return caveats


def _markdown(report: EvalReport, boot: _Bootstrap, stats: Sequence[ComparisonStats], charts: Sequence[Path]) -> str:
    conf = boot.label
    lines = [f"# {report.title}", "", f"Created {report.created}.", "", "## Settings", ""]
    if report.settings:
        lines += _table(("setting", "value"), [(key, _setting_text(v)) for key, v in report.settings.items()])
    else:
        lines.append("No settings recorded.")

    rows: list[Sequence[object]]
    header: Sequence[str]
    judge_accuracy = report.judge_accuracy_text()
    lines += ["", "## Results", ""]
    if not stats:
        lines.append("No comparisons.")
    else:
        rows = [
            (
                s.comparison.set_name,
                s.comparison.variant,
                s.comparison.rounds,
                *_outcome_cells(s.summary.outcomes),
                judge_accuracy,
                "—" if s.summary.position_consistency is None else _pct(s.summary.position_consistency),
                _count_pct(s.summary.unchanged_prompts, s.summary.outcomes.n),
                _lc_text(s.length_control),
            )
            for s in stats
        ]
        header = (
            "set", "variant", "rounds", "n", "win", "tie", "lose", f"ΔWR [{conf} CI]", "judge accuracy [95% CI]",
            "position consistency", "unchanged prompts", "length-controlled ΔWR",
        )  # fmt: skip
        lines += _table(header, rows)
        lines += [
            "",
            f"ΔWR is win rate minus lose rate in percentage points; intervals are {conf} percentile bootstrap "
            f"intervals over items ({boot.samples} resamples, seed {boot.seed}). Judge accuracy is the judge's "
            "agreement with recorded human preferences on known pairs (`bpo judge calibrate`; a tie counts half, "
            "chance is 50%). Position consistency is the share of judged items whose verdict survived swapping "
            "the answers.",
        ]
    lines += ["", "## Judge calibration", ""]
    lines += _calibration_lines(report)

    if stats:
        lines += ["", "## Categories"]
        for s in stats:
            lines += ["", f"### {s.label}", ""]
            rows = [(name, *_outcome_cells(category)) for name, category in s.categories.items()]
            header = ("category", "n", "win", "tie", "lose", f"ΔWR [{conf} CI]")
            lines += _table(header, rows) if rows else ["No items."]

        lines += ["", "## Answer lengths", "", "In whitespace-separated words.", ""]
        rows = [
            (
                s.label,
                f"{s.lengths.original_mean:.1f}",
                f"{s.lengths.original_median:g}",
                f"{s.lengths.optimized_mean:.1f}",
                f"{s.lengths.optimized_median:g}",
                f"{s.lengths.median_ratio:.2f}",
                _pct(s.lengths.optimized_longer_share),
            )
            for s in stats
        ]
        header = (
            "comparison", "original mean", "original median", "optimized mean", "optimized median",
            "median ratio", "optimized longer",
        )  # fmt: skip
        lines += _table(header, rows)

        lines += [
            "",
            "## Length strata",
            "",
            "r = optimized answer words / original answer words (an empty answer counts as one word). Judges favour "
            "longer answers; the ΔWR of the similar stratum is the length-controlled ΔWR.",
            "",
        ]
        rows = []
        for s in stats:
            cells: list[object] = [s.label]
            for name in STRATA:
                stratum = s.length_control.strata[name]
                cells.append(
                    f"{_delta_ci(stratum.delta_wr, stratum.delta_wr_ci)} (n={stratum.n})" if stratum.n else "— (n=0)"
                )
            cells.append(_correlation_text(s.length_control.length_win_correlation))
            rows.append(cells)
        header = ("comparison", *(f"{name} ({_STRATUM_RANGES[name]})" for name in STRATA), "r(log ratio, score)")
        lines += _table(header, rows)

    series = _round_series(stats)
    if series:
        lines += ["", "## Rounds", ""]
        rows = [
            (
                set_name,
                variant,
                s.comparison.rounds,
                s.summary.outcomes.n,
                _delta_ci(s.summary.outcomes.delta_wr, s.summary.outcomes.delta_wr_ci),
                judge_accuracy,
                _pct(s.summary.unchanged_rate),
                "—" if s.comparison.kept_by_last_round is None else _pct(s.comparison.kept_by_last_round),
            )
            for set_name, variant, group in series
            for s in group
        ]
        header = (
            "set", "variant", "rounds", "n", f"ΔWR [{conf} CI]", "judge accuracy [95% CI]", "same as original",
            "kept by this round",
        )  # fmt: skip
        lines += _table(header, rows)
        lines += [
            "",
            "*Same as original*: the prompt after this many rounds equals the user's. *Kept by this round*: the "
            "round returned its input unchanged (round 1's input is the original).",
        ]

    lines += ["", "## Failures", ""]
    failing = [s for s in stats if s.comparison.failed or s.comparison.failures]
    if not failing:
        lines.append("None.")
    for s in failing:
        c = s.comparison
        lines.append(f"- {s.label}: {c.failed} failed")
        lines += [f"  - {_cell(failure)}" for failure in c.failures[:MAX_FAILURES_SHOWN]]
        if len(c.failures) > MAX_FAILURES_SHOWN:
            lines.append(f"  - … and {len(c.failures) - MAX_FAILURES_SHOWN} more (see report.json)")

    if charts:
        lines += ["", "## Charts", ""]
        for path in charts:
            lines += [f"![{_CHART_TITLES.get(path.name, path.stem)}]({path.name})", ""]
        lines.pop()

    lines += ["", "## Caveats", ""]
    caveats = _caveats(report, boot, stats)
    lines += [f"- {caveat}" for caveat in caveats] if caveats else ["None that the data shows."]
    return "\n".join(lines) + "\n"


def render_markdown(
    report: EvalReport,
    *,
    charts: Sequence[Path] = (),
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> str:
    """The report as Markdown; ``charts`` (files next to the Markdown) are linked by file name."""
    boot = _Bootstrap(bootstrap_samples, seed, confidence)
    return _markdown(report, boot, _analyze(report, boot), charts)


# --- Charts -----------------------------------------------------------------------------------------------


def _error(delta: float, ci: Interval) -> tuple[float, float]:
    # A percentile interval need not contain the point estimate; an error bar cannot be negative.
    return max(0.0, 100 * (delta - ci[0])), max(0.0, 100 * (ci[1] - delta))


def _chart_win_tie_lose(stats: Sequence[ComparisonStats], conf: str, path: Path) -> Path:
    from matplotlib import pyplot as plt

    k = len(stats)
    y = np.arange(k)
    win = np.array([100 * s.summary.outcomes.win_rate for s in stats])
    tie = np.array([100 * s.summary.outcomes.tie_rate for s in stats])
    lose = np.array([100 * s.summary.outcomes.lose_rate for s in stats])
    fig, (bars, delta) = plt.subplots(
        1, 2, sharey=True, figsize=(11, 1.6 + 0.5 * k), gridspec_kw={"width_ratios": [3, 1.5]}, layout="constrained"
    )
    try:
        for values, left, color, name in (
            (win, 0, _WIN_COLOR, "win"),
            (tie, win, _TIE_COLOR, "tie"),
            (lose, win + tie, _LOSE_COLOR, "lose"),
        ):
            bars.barh(y, values, left=left, color=color, label=name, height=0.6)
            for row, (value, start) in enumerate(zip(values, np.broadcast_to(left, values.shape), strict=True)):
                if value >= 8:  # narrower segments have no room for a label
                    bars.text(
                        start + value / 2,
                        row,
                        f"{value:.0f}%",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if name != "tie" else "black",
                    )
        for row, s in enumerate(stats):
            if s.summary.outcomes.n == 0:
                bars.text(1, row, "no items", va="center", fontsize=8)
        bars.set_yticks(y, [f"{s.label} (n={s.summary.outcomes.n})" for s in stats])
        bars.set_xlim(0, 100)
        bars.set_xlabel("share of items (%)")
        bars.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        bars.invert_yaxis()

        delta.axvline(0, color="#555555", linestyle="--", linewidth=1)
        for row, s in enumerate(stats):
            if s.summary.outcomes.n == 0:
                continue
            point = 100 * s.summary.outcomes.delta_wr
            low, high = _error(s.summary.outcomes.delta_wr, s.summary.outcomes.delta_wr_ci)
            delta.errorbar(point, row, xerr=[[low], [high]], fmt="o", color="black", capsize=3)
            text = _delta_ci(s.summary.outcomes.delta_wr, s.summary.outcomes.delta_wr_ci)
            delta.annotate(text, (point, row), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
        delta.set_xlabel(f"ΔWR (points, {conf} CI)")
        delta.grid(axis="x", alpha=0.3)
        fig.suptitle("Optimized vs original answers")
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _chart_rounds(series: Sequence[tuple[str, str, list[ComparisonStats]]], conf: str, path: Path) -> Path:
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), layout="constrained")
    try:
        # Lines of different sets at the same round would hide each other's error bars; spread them a little.
        spread = 0.08
        for index, (set_name, variant, group) in enumerate(series):
            offset = (index - (len(series) - 1) / 2) * spread
            xs = [s.comparison.rounds + offset for s in group]
            ys = [100 * s.summary.outcomes.delta_wr for s in group]
            errors = [_error(s.summary.outcomes.delta_wr, s.summary.outcomes.delta_wr_ci) for s in group]
            ax.errorbar(
                xs,
                ys,
                yerr=[[e[0] for e in errors], [e[1] for e in errors]],
                marker="o",
                capsize=3,
                label=f"{set_name} · {variant}",
            )
        ax.axhline(0, color="#555555", linestyle="--", linewidth=1)
        ax.set_xticks(sorted({s.comparison.rounds for _, _, group in series for s in group}))
        ax.set_xlabel("rewriting rounds")
        ax.set_ylabel(f"ΔWR (points, {conf} CI)")
        fig.suptitle("ΔWR by number of rewriting rounds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(ncols=min(len(series), 3), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _annotate_n(ax: Axes, x: float, top: float, n: int) -> None:
    ax.annotate(
        f"n={n}", (x, top), textcoords="offset points", xytext=(0, 3 if top >= 0 else -10), ha="center", fontsize=7
    )


def _chart_strata(stats: Sequence[ComparisonStats], conf: str, path: Path) -> Path:
    from matplotlib import pyplot as plt

    k = len(stats)
    width = 0.8 / len(STRATA)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.8 * k + 2), 5.5), layout="constrained")
    try:
        for j, name in enumerate(STRATA):
            xs: list[float] = []
            heights: list[float] = []
            errors: list[tuple[float, float]] = []
            for i, s in enumerate(stats):
                stratum = s.length_control.strata[name]
                x = i + (j - (len(STRATA) - 1) / 2) * width
                if stratum.n == 0:
                    _annotate_n(ax, x, 0.0, 0)
                    continue
                error = _error(stratum.delta_wr, stratum.delta_wr_ci)
                xs.append(x)
                heights.append(100 * stratum.delta_wr)
                errors.append(error)
                top = 100 * stratum.delta_wr + (error[1] if stratum.delta_wr >= 0 else -error[0])
                _annotate_n(ax, x, top, stratum.n)
            ax.bar(
                xs,
                heights,
                width,
                yerr=[[e[0] for e in errors], [e[1] for e in errors]],
                capsize=3,
                color=_STRATUM_COLORS[name],
                label=f"{name} ({_STRATUM_RANGES[name]})",
            )
        ax.axhline(0, color="#555555", linewidth=1)
        # Fixed rather than autoscaled: an empty stratum has only its "n=0" label, which autoscaling ignores.
        ax.set_xlim(-0.6, k - 0.4)
        crowded = k > 3  # long labels side by side overlap unless slanted
        labels = [s.label for s in stats]
        ax.set_xticks(range(k), labels, rotation=20 if crowded else 0, ha="right" if crowded else "center")
        ax.set_ylabel(f"ΔWR (points, {conf} CI)")
        fig.suptitle("ΔWR by answer length ratio r (optimized / original words)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(ncols=len(STRATA), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _render_charts(boot: _Bootstrap, stats: Sequence[ComparisonStats], out_dir: Path) -> list[Path]:
    import matplotlib

    # Selected before pyplot draws anything: reports are written where no display exists.
    matplotlib.use("Agg")
    if not stats:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    conf = boot.label
    paths = [_chart_win_tie_lose(stats, conf, out_dir / WIN_TIE_LOSE_PNG)]
    series = _round_series(stats)
    if series:
        paths.append(_chart_rounds(series, conf, out_dir / DELTA_WR_BY_ROUND_PNG))
    paths.append(_chart_strata(stats, conf, out_dir / LENGTH_STRATA_PNG))
    return paths


def render_charts(
    report: EvalReport,
    out_dir: Path,
    *,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> list[Path]:
    """Write the PNG charts into ``out_dir`` and return their paths (none when there is no comparison).

    ``win_tie_lose.png`` and ``length_strata.png`` always; ``delta_wr_by_round.png`` only when some set and
    variant was measured after two or more round counts.
    """
    boot = _Bootstrap(bootstrap_samples, seed, confidence)
    return _render_charts(boot, _analyze(report, boot), out_dir)


def write_report(
    report: EvalReport,
    out_dir: Path,
    *,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the charts into ``out_dir``; the paths by name.

    The names are ``json``, ``markdown`` and each chart's file stem (``win_tie_lose``, ...).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    boot = _Bootstrap(bootstrap_samples, seed, confidence)
    stats = _analyze(report, boot)
    charts = _render_charts(boot, stats, out_dir)
    json_path = out_dir / "report.json"
    json_path.write_text(
        json.dumps(_report_dict(report, boot, stats), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    markdown_path = out_dir / "report.md"
    markdown_path.write_text(_markdown(report, boot, stats, charts), encoding="utf-8")
    return {"json": json_path, "markdown": markdown_path, **{path.stem: path for path in charts}}
