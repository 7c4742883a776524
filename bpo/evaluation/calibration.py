"""A judge's calibration: how often it agrees with recorded human preferences, and how far that can be trusted.

``bpo judge calibrate`` has a judge decide known preference pairs (``bpo.judging.calibration``) in both orders,
as an evaluation would, and summarises the verdicts:

- **accuracy**: agreement with the recorded preference, a tie counting half (the share of pairs the judge got
  right plus half the share it tied). A judge that guesses, or that ties everything, scores 50%; only a judge
  whose interval lies above 50% tells better answers from worse ones more often than chance. It is
  ``(1 + ΔWR) / 2`` of the judge's verdicts with "won" meaning "picked the preferred response", so its interval
  is ΔWR's bootstrap interval, mapped.
- **accuracy when decided**: the share right among the pairs the judge decided (no tie).
- **position consistency**: the share of pairs whose two orders were both read and agreed.
- **tie rate**: the share of pairs that came out tied (a tie verdict, disagreeing orders, or an unreadable order).
- **first-shown share**: of the order verdicts that picked a response, the share that picked the one shown
  first (0.5 for a judge without position bias).

Every interval is a percentile bootstrap over pairs (``bpo.evaluation.stats``), seeded. A calibration is stored
under the state directory keyed by the judge's endpoint name, its model version and its judge template (which
names the prompting variant), so that ``bpo eval`` can show it beside every ΔWR its judge produced and warn
when it is missing or no better than chance.

The project also ships its own calibrations of the embedded judges (``bpo/resources/judge_calibrations``, each
folder as ``bpo judge calibrate --out`` wrote it): a fresh platform's reports carry those, marked as shipped,
until its operator measures the judge on the platform itself, whose calibration then takes precedence.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from bpo.endpoints import Endpoints
from bpo.engines.base import EngineClient
from bpo.engines.factory import model_identity, open_engine, resolve_spec
from bpo.errors import BpoError, InvalidConfigurationError
from bpo.evaluation.stats import (
    DEFAULT_BOOTSTRAP_SAMPLES,
    DEFAULT_CONFIDENCE,
    Interval,
    bootstrap_delta_wr,
    bootstrap_share,
)
from bpo.judging.calibration import (
    KnownPairJudgement,
    PairFailure,
    judge_known_pairs,
)
from bpo.judging.pairwise import PairwiseJudge
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.pairs.records import PreferenceRecord
from bpo.settings import BpoSettings

CHANCE_ACCURACY = 0.5
CALIBRATIONS_FOLDER = "judge-calibrations"
SHIPPED_CALIBRATIONS_FOLDER = "judge_calibrations"
SHIPPED_CALIBRATION_FILE = "calibration.json"
# The shipped folders are the project's own, a handful; the bound keeps a stray tree from being walked.
MAX_SHIPPED_CALIBRATIONS = 64
# Failures listed in the Markdown; the JSON has them all.
MAX_FAILURES_SHOWN = 20


def _round(value: float) -> float:
    return round(float(value), 4) + 0.0


def _round_interval(interval: Interval) -> list[float]:
    return [_round(interval[0]), _round(interval[1])]


def _interval(value: Any) -> Interval:
    low, high = value
    return (float(low), float(high))


def _share(count: int, n: int) -> float:
    return count / n if n else 0.0


@dataclass(frozen=True, slots=True)
class CalibrationKey:
    """What a calibration is valid for: a declared judge endpoint, the model version behind it, and the judge
    template (base prompt and prompting variant) it was asked with."""

    judge: str
    model_version: str
    template: str

    def file_name(self) -> str:
        """A readable prefix and a hash of the whole key: versions hold characters no file name should."""
        digest = hashlib.sha256(json.dumps([self.judge, self.model_version, self.template]).encode()).hexdigest()
        readable = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{self.judge}__{self.template}")
        return f"{readable[:100]}__{digest[:16]}.json"

    def to_dict(self) -> dict[str, str]:
        return {"judge": self.judge, "model_version": self.model_version, "template": self.template}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationKey:
        return cls(str(data["judge"]), str(data["model_version"]), str(data["template"]))


@dataclass(frozen=True, slots=True)
class CalibrationSummary:
    """The statistics of a set of judged known pairs (module docstring). Intervals are (0, 0) without pairs;
    the rates of an empty set are 0, and the rates over decided pairs or picking verdicts None without any."""

    n: int
    correct: int
    wrong: int
    ties: int
    consistent: int
    accuracy: float
    accuracy_ci: Interval
    decided_accuracy: float | None
    decided_accuracy_ci: Interval | None
    position_consistency: float
    position_consistency_ci: Interval
    tie_rate: float
    tie_rate_ci: Interval
    first_shown_share: float | None
    unreadable_rate: float
    truncated_rate: float

    @classmethod
    def of(
        cls,
        judgements: Sequence[KnownPairJudgement],
        *,
        bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
        seed: int = 0,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> CalibrationSummary:
        n = len(judgements)
        correct = sum(j.outcome == "correct" for j in judgements)
        wrong = sum(j.outcome == "wrong" for j in judgements)
        ties = n - correct - wrong
        consistent = sum(j.position_consistent for j in judgements)
        low, high = bootstrap_delta_wr(
            correct, ties, wrong, bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence
        )
        decided = correct + wrong

        def share_ci(count: int, total: int) -> Interval:
            return bootstrap_share(count, total, bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence)

        picks_first = sum(j.first_shown_picks for j in judgements)
        picks = picks_first + sum(j.second_shown_picks for j in judgements)
        return cls(
            n=n,
            correct=correct,
            wrong=wrong,
            ties=ties,
            consistent=consistent,
            accuracy=_share(2 * correct + ties, 2 * n),
            accuracy_ci=((1.0 + low) / 2, (1.0 + high) / 2) if n else (0.0, 0.0),
            decided_accuracy=_share(correct, decided) if decided else None,
            decided_accuracy_ci=share_ci(correct, decided) if decided else None,
            position_consistency=_share(consistent, n),
            position_consistency_ci=share_ci(consistent, n),
            tie_rate=_share(ties, n),
            tie_rate_ci=share_ci(ties, n),
            first_shown_share=_share(picks_first, picks) if picks else None,
            unreadable_rate=_share(sum(j.unreadable_orders for j in judgements), 2 * n),
            truncated_rate=_share(sum(j.truncated_orders for j in judgements), 2 * n),
        )

    @property
    def accuracy_includes_chance(self) -> bool:
        """The accuracy interval includes 50%: the judge is not shown to beat chance."""
        return self.accuracy_ci[0] <= CHANCE_ACCURACY <= self.accuracy_ci[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "correct": self.correct,
            "wrong": self.wrong,
            "ties": self.ties,
            "consistent": self.consistent,
            "accuracy": _round(self.accuracy),
            "accuracy_ci": _round_interval(self.accuracy_ci),
            "decided_accuracy": None if self.decided_accuracy is None else _round(self.decided_accuracy),
            "decided_accuracy_ci": (
                None if self.decided_accuracy_ci is None else _round_interval(self.decided_accuracy_ci)
            ),
            "position_consistency": _round(self.position_consistency),
            "position_consistency_ci": _round_interval(self.position_consistency_ci),
            "tie_rate": _round(self.tie_rate),
            "tie_rate_ci": _round_interval(self.tie_rate_ci),
            "first_shown_share": None if self.first_shown_share is None else _round(self.first_shown_share),
            "unreadable_rate": _round(self.unreadable_rate),
            "truncated_rate": _round(self.truncated_rate),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationSummary:
        decided = data.get("decided_accuracy")
        decided_ci = data.get("decided_accuracy_ci")
        first_shown = data.get("first_shown_share")
        return cls(
            n=int(data["n"]),
            correct=int(data["correct"]),
            wrong=int(data["wrong"]),
            ties=int(data["ties"]),
            consistent=int(data["consistent"]),
            accuracy=float(data["accuracy"]),
            accuracy_ci=_interval(data["accuracy_ci"]),
            decided_accuracy=None if decided is None else float(decided),
            decided_accuracy_ci=None if decided_ci is None else _interval(decided_ci),
            position_consistency=float(data["position_consistency"]),
            position_consistency_ci=_interval(data["position_consistency_ci"]),
            tie_rate=float(data["tie_rate"]),
            tie_rate_ci=_interval(data["tie_rate_ci"]),
            first_shown_share=None if first_shown is None else float(first_shown),
            unreadable_rate=float(data["unreadable_rate"]),
            truncated_rate=float(data["truncated_rate"]),
        )


def by_group(
    judgements: Sequence[KnownPairJudgement],
    *,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, CalibrationSummary]:
    """The summary of each group of pairs (the data its preference was recorded in), in group order."""
    groups: dict[str, list[KnownPairJudgement]] = {}
    for judgement in judgements:
        groups.setdefault(judgement.group, []).append(judgement)
    return {
        name: CalibrationSummary.of(groups[name], bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence)
        for name in sorted(groups)
    }


@dataclass(frozen=True, slots=True)
class JudgeCalibration:
    """One calibration run: what was calibrated, how (``settings``: pair count and selection, max tokens, seed,
    bootstrap, command), what it found overall and per group, every pair's judgement, and the failures."""

    key: CalibrationKey
    judge_model: str
    created: str
    settings: Mapping[str, Any]
    summary: CalibrationSummary
    groups: Mapping[str, CalibrationSummary]
    judgements: tuple[KnownPairJudgement, ...]
    failures: tuple[PairFailure, ...] = ()
    seconds: float = 0.0

    @property
    def max_tokens(self) -> int | None:
        value = self.settings.get("max_tokens")
        return value if isinstance(value, int) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key.to_dict(),
            "judge_model": self.judge_model,
            "created": self.created,
            "settings": dict(self.settings),
            "seconds": round(self.seconds, 1),
            "summary": self.summary.to_dict(),
            "groups": [{"group": name, **summary.to_dict()} for name, summary in self.groups.items()],
            "failures": [{"pair_id": f.pair_id, "reason": f.reason} for f in self.failures],
            "judgements": [j.to_dict() for j in self.judgements],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JudgeCalibration:
        return cls(
            key=CalibrationKey.from_dict(data["key"]),
            judge_model=str(data["judge_model"]),
            created=str(data["created"]),
            settings=dict(data["settings"]),
            summary=CalibrationSummary.from_dict(data["summary"]),
            groups={str(g["group"]): CalibrationSummary.from_dict(g) for g in data["groups"]},
            judgements=tuple(KnownPairJudgement.from_dict(j) for j in data["judgements"]),
            failures=tuple(PairFailure(str(f["pair_id"]), str(f["reason"])) for f in data["failures"]),
            seconds=float(data.get("seconds", 0.0)),
        )


def calibrate(
    key: CalibrationKey,
    judge_model: str,
    judgements: Sequence[KnownPairJudgement],
    failures: Sequence[PairFailure],
    settings: Mapping[str, Any],
    *,
    seconds: float = 0.0,
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> JudgeCalibration:
    """The calibration of these judgements; ``settings`` gains the bootstrap settings."""
    return JudgeCalibration(
        key=key,
        judge_model=judge_model,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        settings={**settings, "bootstrap_samples": bootstrap_samples, "bootstrap_seed": seed, "confidence": confidence},
        summary=CalibrationSummary.of(
            judgements, bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence
        ),
        groups=by_group(judgements, bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence),
        judgements=tuple(judgements),
        failures=tuple(failures),
        seconds=seconds,
    )


async def run_calibration(
    engine: EngineClient,
    judge_endpoint: str,
    template: str,
    pairs: Sequence[PreferenceRecord],
    *,
    max_tokens: int,
    seed: int,
    settings: Mapping[str, Any],
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    on_batch: Callable[[int], None] | None = None,
) -> JudgeCalibration:
    """Judge ``pairs`` with ``engine`` (serving the endpoint ``judge_endpoint``) and ``template`` in both orders.

    ``seed`` seeds a voting template's samples and the bootstrap; ``settings`` (how the pairs were chosen, the
    command) are recorded with the result, along with ``max_tokens``, ``seed`` and the pair count.
    """
    judge = PairwiseJudge(engine, template, max_new_tokens=max_tokens, seed=seed)
    started = time.perf_counter()
    judgements, failures = await judge_known_pairs(judge, pairs, on_batch=on_batch)
    return calibrate(
        CalibrationKey(judge_endpoint, engine.identity.version, judge.template),
        engine.identity.name,
        judgements,
        failures,
        {**settings, "pairs": len(pairs), "max_tokens": max_tokens, "seed": seed},
        seconds=time.perf_counter() - started,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )


async def calibrate_endpoint(
    settings: BpoSettings,
    judge: str,
    template: str,
    pairs: Sequence[PreferenceRecord],
    *,
    max_tokens: int,
    seed: int,
    run_settings: Mapping[str, Any],
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    on_batch: Callable[[int], None] | None = None,
) -> JudgeCalibration:
    """``run_calibration`` with the engine of the declared endpoint ``judge``, built in this process as the
    judge service builds it, and closed afterwards."""
    endpoints = Endpoints.from_settings(settings)
    engine_settings = endpoints.engine_settings(endpoints.get(judge, "judge"))
    async with open_engine(engine_settings, ModelCatalogue(), ModelPreparer(settings.models_dir)) as engine:
        return await run_calibration(
            engine,
            judge,
            template,
            pairs,
            max_tokens=max_tokens,
            seed=seed,
            settings={**run_settings, "engine": engine_settings.name},
            bootstrap_samples=bootstrap_samples,
            on_batch=on_batch,
        )


class CalibrationStore:
    """Calibrations as JSON files in one folder (``<state dir>/judge-calibrations``), the latest per key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def under(cls, state_dir: Path) -> CalibrationStore:
        return cls(state_dir / CALIBRATIONS_FOLDER)

    def path_for(self, key: CalibrationKey) -> Path:
        return self.directory / key.file_name()

    def save(self, calibration: JudgeCalibration) -> Path:
        """Replace the key's calibration atomically: a reader sees the old file or the new one, never half."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(calibration.key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(calibration.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        temporary.replace(path)
        return path

    def load(self, key: CalibrationKey) -> JudgeCalibration | None:
        """The key's calibration, None when there is none; a file that cannot be read is an error."""
        path = self.path_for(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            calibration = JudgeCalibration.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidConfigurationError(f"judge calibration {path} cannot be read ({exc}); delete it") from exc
        if calibration.key != key:
            raise InvalidConfigurationError(f"judge calibration {path} belongs to {calibration.key}, not {key}")
        return calibration


class ShippedCalibrations:
    """The calibrations the project measured and ships, one folder each (``calibration.json`` and
    ``calibration.md`` as ``bpo judge calibrate --out`` writes them). They describe a model version with a
    template on an engine, whatever a platform calls its judge endpoint."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def packaged(cls) -> ShippedCalibrations:
        return cls(Path(str(resources.files("bpo.resources").joinpath(SHIPPED_CALIBRATIONS_FOLDER))))

    def all(self) -> list[JudgeCalibration]:
        """Every shipped calibration, in folder order; one that cannot be read is an error (a packaging bug)."""
        paths = sorted(self.directory.glob(f"*/{SHIPPED_CALIBRATION_FILE}"))
        if len(paths) > MAX_SHIPPED_CALIBRATIONS:
            raise InvalidConfigurationError(
                f"{self.directory} holds {len(paths)} calibrations, more than {MAX_SHIPPED_CALIBRATIONS}"
            )
        calibrations = []
        for path in paths:
            try:
                calibrations.append(JudgeCalibration.from_dict(json.loads(path.read_text(encoding="utf-8"))))
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidConfigurationError(f"shipped judge calibration {path} cannot be read ({exc})") from exc
        return calibrations

    def find(self, model_version: str, template: str, engine: str, max_tokens: int) -> JudgeCalibration | None:
        """The shipped calibration of this model version, template and engine; of several, the one measured
        with ``max_tokens`` new tokens a judgement, else the one with the most."""
        matches = [
            calibration
            for calibration in self.all()
            if calibration.key.model_version == model_version
            and calibration.key.template == template
            and calibration.settings.get("engine") == engine
        ]
        if not matches:
            return None
        return max(matches, key=lambda c: (c.max_tokens == max_tokens, c.max_tokens or 0))


# --- presentation -------------------------------------------------------------------------------------------


def percent(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def rate_ci(rate: float | None, interval: Interval | None) -> str:
    """``62.0% [55.0, 69.0]``, or "—" without a rate."""
    if rate is None or interval is None:
        return "—"
    return f"{percent(rate)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def summary_cells(summary: CalibrationSummary) -> tuple[str, ...]:
    """The accuracy, accuracy-when-decided, position-consistency, tie-rate and first-shown columns."""
    return (
        rate_ci(summary.accuracy, summary.accuracy_ci),
        rate_ci(summary.decided_accuracy, summary.decided_accuracy_ci),
        rate_ci(summary.position_consistency, summary.position_consistency_ci),
        rate_ci(summary.tie_rate, summary.tie_rate_ci),
        "—" if summary.first_shown_share is None else percent(summary.first_shown_share),
    )


SUMMARY_HEADER = (
    "accuracy [95% CI]",
    "accuracy when decided",
    "position consistency",
    "tie rate",
    "first-shown picks",
)

STATISTICS_NOTE = (
    "Accuracy: agreement with the recorded human preference, a tie counting half (chance: 50%). Accuracy when "
    "decided: among pairs not tied. Position consistency: both orders read and agreeing. Tie rate: tie verdicts, "
    "disagreeing orders and unreadable orders. First-shown picks: of the order verdicts that picked a response, "
    "the share that picked the one shown first (0.5 without position bias). Intervals: percentile bootstrap over "
    "pairs."
)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def render_markdown(calibration: JudgeCalibration) -> str:
    key, summary = calibration.key, calibration.summary
    lines = [
        f"# Judge calibration: {key.judge} with {key.template}",
        "",
        f"Created {calibration.created}; {summary.n} known pairs judged in both orders in {calibration.seconds:.0f} s.",
        "",
        "## Settings",
        "",
    ]
    settings = {"judge endpoint": key.judge, "judge model": calibration.judge_model, "model version":
                key.model_version, "judge template": key.template, **calibration.settings}  # fmt: skip
    lines += markdown_table(("setting", "value"), [(name, _setting_text(value)) for name, value in settings.items()])
    lines += ["", "## Result", ""]
    lines += markdown_table(("pairs", *SUMMARY_HEADER, "unreadable orders", "truncated orders"), [
        (summary.n, *summary_cells(summary), percent(summary.unreadable_rate), percent(summary.truncated_rate))
    ])  # fmt: skip
    lines += ["", STATISTICS_NOTE, "", "## By source of the preference", ""]
    lines += markdown_table(
        ("source", "pairs", *SUMMARY_HEADER),
        [(name, group.n, *summary_cells(group)) for name, group in calibration.groups.items()],
    )
    lines += ["", "## Verdict", ""]
    warnings = calibration_warnings(calibration)
    lines += [f"- {warning}" for warning in warnings] or [
        "- The accuracy interval lies above 50%: this judge agrees with people more often than chance."
    ]
    if calibration.failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {f.pair_id}: {f.reason}" for f in calibration.failures[:MAX_FAILURES_SHOWN]]
        if len(calibration.failures) > MAX_FAILURES_SHOWN:
            lines.append(f"- … and {len(calibration.failures) - MAX_FAILURES_SHOWN} more (see the JSON)")
    return "\n".join(lines) + "\n"


def _setting_text(value: object) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "—"
    return "—" if value is None or value == "" else str(value)


def calibration_warnings(calibration: JudgeCalibration) -> list[str]:
    """Why this calibration does not vouch for its judge; empty when its accuracy interval is above chance."""
    key, summary = calibration.key, calibration.summary
    if summary.n == 0:
        return [f"judge {key.judge} ({key.template}) judged no known pair: its accuracy is unknown."]
    if summary.accuracy_includes_chance or summary.accuracy_ci[1] < CHANCE_ACCURACY:
        return [
            f"judge {key.judge} ({key.template}) agreed with recorded human preferences at "
            f"{rate_ci(summary.accuracy, summary.accuracy_ci)} on {summary.n} known pairs: the interval "
            f"{'includes' if summary.accuracy_includes_chance else 'lies below'} 50% (chance), so its verdicts "
            "are not shown to be better than a coin flip."
        ]
    return []


@dataclass(frozen=True, slots=True)
class JudgeCalibrationStatus:
    """What an evaluation knows of its judge's calibration: the key it looked up (None, with ``problem``,
    when the judge's model version could not be determined here), the calibration found, if any, and the max
    new tokens the evaluation gave its judge."""

    judge: str
    template: str
    eval_max_tokens: int
    key: CalibrationKey | None = None
    calibration: JudgeCalibration | None = None
    problem: str | None = None
    shipped: bool = False

    @property
    def source(self) -> str:
        """Who measured the calibration: this platform's operator, or the project (shipped with bpo)."""
        if self.calibration is None:
            return "none"
        return "shipped with bpo" if self.shipped else "this platform"

    def accuracy_text(self) -> str:
        """The cell shown beside each ΔWR: the accuracy and its interval, or why there is none."""
        if self.calibration is None:
            return "not calibrated"
        summary = self.calibration.summary
        origin = f", {self.source}" if self.shipped else ""
        return f"{rate_ci(summary.accuracy, summary.accuracy_ci)}, n={summary.n}{origin}"

    def warnings(self) -> list[str]:
        command = f"bpo judge calibrate --judge {self.judge} --template {self.template}"
        if self.calibration is None:
            version = f" (model version {self.key.model_version})" if self.key is not None else ""
            why = f" ({self.problem})" if self.problem else ""
            return [
                f"no calibration exists for judge {self.judge} with template {self.template}{version}{why}: how "
                f"often its verdicts agree with people is unknown, so ΔWR cannot be trusted; run `{command}`."
            ]
        warnings = calibration_warnings(self.calibration)
        calibrated_tokens = self.calibration.max_tokens
        if calibrated_tokens is not None and calibrated_tokens != self.eval_max_tokens:
            warnings.append(
                f"judge {self.judge} was calibrated with at most {calibrated_tokens} new tokens a judgement and "
                f"judged this evaluation with {self.eval_max_tokens}: the calibration may not carry over."
            )
        return warnings

    def to_dict(self) -> dict[str, Any]:
        calibration = self.calibration
        return {
            "judge": self.judge,
            "template": self.template,
            "model_version": None if self.key is None else self.key.model_version,
            "eval_max_tokens": self.eval_max_tokens,
            "problem": self.problem,
            "source": self.source,
            "calibration": None
            if calibration is None
            else {
                "created": calibration.created,
                "max_tokens": calibration.max_tokens,
                "summary": calibration.summary.to_dict(),
            },
            "warnings": self.warnings(),
        }


def calibration_status(
    settings: BpoSettings,
    judge: str,
    template: str,
    eval_max_tokens: int,
    shipped: ShippedCalibrations | None = None,
) -> JudgeCalibrationStatus:
    """The calibration of ``judge`` (a declared endpoint) with ``template``, for the model version the endpoint
    has as declared here, found without loading the model: the one stored on this platform, else the one
    shipped for that model version, template and engine (``shipped``, default the packaged ones). The
    declarations are this machine's: a platform whose judge endpoint is declared differently has its
    calibrations under its own model version."""
    try:
        endpoints = Endpoints.from_settings(settings)
        engine_settings = endpoints.engine_settings(endpoints.get(judge, "judge"))
        spec = resolve_spec(engine_settings, ModelCatalogue())
        version = model_identity(engine_settings, spec, ModelPreparer(settings.models_dir)).version
    except BpoError as exc:
        return JudgeCalibrationStatus(judge, template, eval_max_tokens, problem=f"its model version is unknown: {exc}")
    key = CalibrationKey(judge, version, template)
    own = CalibrationStore.under(settings.state_dir).load(key)
    if own is not None:
        return JudgeCalibrationStatus(judge, template, eval_max_tokens, key=key, calibration=own)
    library = ShippedCalibrations.packaged() if shipped is None else shipped
    found = library.find(version, template, engine_settings.name, eval_max_tokens)
    return JudgeCalibrationStatus(
        judge, template, eval_max_tokens, key=key, calibration=found, shipped=found is not None
    )
