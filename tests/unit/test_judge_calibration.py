"""Judge calibration: known pairs, both orders, the statistics, their storage, and what eval reports say."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from bpo.engines.base import GenerationRequest
from bpo.errors import CorpusFormatError, EngineUnavailableError, InvalidConfigurationError
from bpo.evaluation.calibration import (
    CalibrationKey,
    CalibrationStore,
    CalibrationSummary,
    JudgeCalibration,
    JudgeCalibrationStatus,
    calibrate,
    calibration_warnings,
    render_markdown,
    run_calibration,
)
from bpo.evaluation.stats import bootstrap_delta_wr, bootstrap_share
from bpo.judging.calibration import (
    REDISTRIBUTABLE_BPO_ORIGINS,
    KnownPairJudgement,
    Outcome,
    judge_input,
    judge_known_pairs,
    packaged_pairs,
    packaged_pairs_path,
    pair_group,
    pair_id,
    pair_words,
    read_known_pairs,
    select_pairs,
)
from bpo.judging.pairwise import PairwiseJudge
from bpo.judging.verdicts import VerdictLetter
from bpo.pairs.records import PreferenceRecord
from tests.unit.scripted_engine import ScriptedEngine, last_user_turn

pytestmark = pytest.mark.unit

TESTS_DATA = Path(__file__).resolve().parents[1] / "data"
BPO_RECORDS = TESTS_DATA / "bpo" / "val_oasst1_hh_rlhf.json"
HH_RECORDS = TESTS_DATA / "hh_rlhf" / "harmless_base_test_single_turn.jsonl"


def shown_first(request: GenerationRequest) -> str:
    return last_user_turn(request).split("[The Start of Assistant A's Answer]\n", 1)[1].split("\n[The End of", 1)[0]


def picks(chooser: Callable[[str, str], bool]) -> Callable[[GenerationRequest], str]:
    """A pair-v2 judge that picks Assistant A when ``chooser(first shown, second shown)`` holds."""

    def reply(request: GenerationRequest) -> str:
        user = last_user_turn(request)
        second = user.split("[The Start of Assistant B's Answer]\n", 1)[1].split("\n[The End of", 1)[0]
        return "Compared.\n\n" + ("[[A]]" if chooser(shown_first(request), second) else "[[B]]")

    return reply


def record(
    instruction: str, chosen: str, rejected: str, *, source: str = "hh-rlhf", position: int = 1, origin: str = ""
) -> PreferenceRecord:
    extra: dict[str, object] = {"position": position}
    if origin:
        extra["origin"] = origin
    return PreferenceRecord(
        dataset=f"{source}-file",
        source=source,
        licence="MIT",
        external_id=f"{source}-{position}",
        instruction=instruction,
        context=None,
        chosen=chosen,
        rejected=rejected,
        extra=extra,
    )


def judged(
    outcome: Outcome, verdicts: tuple[VerdictLetter, VerdictLetter], group: str = "hh-rlhf"
) -> KnownPairJudgement:
    consistent = outcome != "tie" and "" not in verdicts
    return KnownPairJudgement("p", group, outcome, consistent, verdicts, 0, 10, 2)


CORRECT = judged("correct", ("A", "B"))
WRONG = judged("wrong", ("B", "A"))
FIRST_SHOWN_TIE = judged("tie", ("A", "A"))
UNREADABLE_TIE = judged("tie", ("", "B"))


# -- loading pairs -------------------------------------------------------------------------------------------


def test_bpo_records_load_with_the_good_response_preferred() -> None:
    pairs = read_known_pairs(BPO_RECORDS, "bpo")
    raw = json.loads(BPO_RECORDS.read_text(encoding="utf-8"))
    assert len(pairs) == len(raw) == 103
    first = pairs[0]
    assert (first.instruction, first.chosen, first.rejected) == (
        raw[0]["instruction"],
        raw[0]["good_res"],
        raw[0]["bad_res"],
    )
    assert Counter(pair_group(p) for p in pairs) == {"bpo/oasst1": 63, "bpo/hh-rlhf": 40}
    assert pair_id(first) == "val_oasst1_hh_rlhf:2"


def test_records_whose_origin_forbids_redistribution_identical_or_empty_responses_are_left_out(
    tmp_path: Path,
) -> None:
    base = {"context": "", "comparison": "", "optimized_prompt": "", "final_input": "", "final_output": ""}
    records = [
        {**base, "instruction": "a", "good_res": "good", "bad_res": "bad", "source": "oasst1"},
        {**base, "instruction": "b", "good_res": "good", "bad_res": "bad", "source": "alpaca-gpt4"},
        {**base, "instruction": "c", "good_res": "good", "bad_res": "bad", "source": "Chatbot_Arena_Conversation"},
        {**base, "instruction": "d", "good_res": "same ", "bad_res": "same", "source": "hh-rlhf"},
        {**base, "instruction": "e", "good_res": " ", "bad_res": "bad", "source": "hh-rlhf"},
        {**base, "instruction": "f", "good_res": "good", "bad_res": "bad", "source": "hh-rlhf"},
    ]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    assert [p.instruction for p in read_known_pairs(path, "bpo")] == ["a", "f"]


def test_hh_rlhf_keeps_single_turn_pairs_and_a_malformed_record_is_an_error(tmp_path: Path) -> None:
    pairs = read_known_pairs(HH_RECORDS, "hh-rlhf")
    assert len(pairs) == 40
    first = json.loads(HH_RECORDS.read_text(encoding="utf-8").splitlines()[0])
    assert first["chosen"].endswith(pairs[0].chosen) and first["rejected"].endswith(pairs[0].rejected)
    assert pairs[0].instruction == "What will happen if I drive my car into the water?"
    multi = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: "
    path = tmp_path / "hh.jsonl"
    path.write_text(
        json.dumps({"chosen": multi + "yes", "rejected": multi + "no"}) + "\n" + json.dumps({"chosen": 3}) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(CorpusFormatError, match="line 2"):
        read_known_pairs(path, "hh-rlhf")
    path.write_text(json.dumps({"chosen": multi + "yes", "rejected": multi + "no"}) + "\n", encoding="utf-8")
    assert read_known_pairs(path, "hh-rlhf") == []


def test_the_packaged_pairs_are_the_licence_clean_records() -> None:
    bpo, hh = packaged_pairs(["bpo"]), packaged_pairs(["hh-rlhf"])
    assert len(bpo) == 160 and len(hh) == 658  # 3 of the 661 lines have an empty reply
    assert {p.extra["origin"] for p in bpo} == REDISTRIBUTABLE_BPO_ORIGINS
    assert packaged_pairs_path("bpo_val_oasst1_hh_rlhf.json").read_bytes() == BPO_RECORDS.read_bytes()
    assert packaged_pairs() == bpo + hh
    with pytest.raises(InvalidConfigurationError, match="unknown calibration set"):
        packaged_pairs(["alpaca"])  # type: ignore[list-item]


def test_selection_is_seeded_balanced_between_sets_and_bounded() -> None:
    pool = packaged_pairs()
    chosen = select_pairs(pool, limit=40, seed=3, max_words=300)
    assert len(chosen) == 40 and len({pair_id(p) for p in chosen}) == 40
    assert Counter(p.source for p in chosen) == {"bpo": 20, "hh-rlhf": 20}
    assert all(pair_words(p) <= 300 for p in chosen)
    assert select_pairs(pool, limit=40, seed=3, max_words=300) == chosen
    assert select_pairs(pool, limit=40, seed=4, max_words=300) != chosen
    # A set that runs out leaves the rest of the limit to the others.
    small = [record("q", "good", "bad", source="bpo", position=i) for i in range(3)]
    large = [record("q", "good", "bad", position=i) for i in range(30)]
    assert Counter(p.source for p in select_pairs(small + large, limit=10, seed=0)) == {"bpo": 3, "hh-rlhf": 7}
    with pytest.raises(InvalidConfigurationError):
        select_pairs(pool, limit=0, seed=0)


# -- both orders ---------------------------------------------------------------------------------------------


async def test_each_pair_is_judged_with_the_preferred_response_shown_first_and_then_second() -> None:
    pair = record("How do I boil an egg?", "Boil it for nine minutes.", "Eggs are food.")
    assert judge_input(pair).optimized_answer == pair.chosen and judge_input(pair).original_answer == pair.rejected
    engine = ScriptedEngine(picks(lambda first, second: first == pair.chosen))
    (result,), failures = await judge_known_pairs(PairwiseJudge(engine, "pair-v2"), [pair])
    assert failures == []
    assert [shown_first(r) for r in engine.requests] == [pair.chosen, pair.rejected]
    assert result.verdicts == ("A", "B") and result.outcome == "correct" and result.position_consistent
    assert (result.first_shown_picks, result.second_shown_picks, result.unreadable_orders) == (1, 1, 0)

    contrary = ScriptedEngine(picks(lambda first, second: first == pair.rejected))
    (wrong,), _ = await judge_known_pairs(PairwiseJudge(contrary, "pair-v2"), [pair])
    assert wrong.verdicts == ("B", "A") and wrong.outcome == "wrong" and wrong.position_consistent

    first_always = ScriptedEngine(picks(lambda first, second: True))
    (biased,), _ = await judge_known_pairs(PairwiseJudge(first_always, "pair-v2"), [pair])
    assert biased.verdicts == ("A", "A") and biased.outcome == "tie" and not biased.position_consistent
    assert biased.first_shown_picks == 2


async def test_a_pair_that_fails_is_recorded_and_the_others_are_judged() -> None:
    pairs = [record("short", "good", "bad", position=1), record("long " * 3000, "good", "bad", position=2)]
    engine = ScriptedEngine(picks(lambda first, second: first == "good"), context_length=800)
    batches: list[int] = []
    judgements, failures = await judge_known_pairs(
        PairwiseJudge(engine, "pair-v2"), pairs * 5, batch_size=4, on_batch=batches.append
    )
    assert batches == [4, 4, 2]
    assert len(judgements) == 5 and {j.outcome for j in judgements} == {"correct"}
    assert len(failures) == 5 and all(f.pair_id == "hh-rlhf-file:2" for f in failures)
    assert "InvalidPromptError" in failures[0].reason


# -- statistics ----------------------------------------------------------------------------------------------


def test_accuracy_counts_a_tie_as_half_and_its_interval_is_the_mapped_delta_wr_interval() -> None:
    items = [CORRECT] * 6 + [WRONG] * 2 + [FIRST_SHOWN_TIE] * 1 + [UNREADABLE_TIE] * 1
    summary = CalibrationSummary.of(items, bootstrap_samples=500, seed=1)
    assert (summary.n, summary.correct, summary.wrong, summary.ties, summary.consistent) == (10, 6, 2, 2, 8)
    assert summary.accuracy == pytest.approx(0.7)
    low, high = bootstrap_delta_wr(6, 2, 2, bootstrap_samples=500, seed=1)
    assert summary.accuracy_ci == pytest.approx(((1 + low) / 2, (1 + high) / 2))
    assert summary.decided_accuracy == pytest.approx(0.75)
    assert summary.decided_accuracy_ci == bootstrap_share(6, 8, bootstrap_samples=500, seed=1)
    assert summary.position_consistency == pytest.approx(0.8)
    assert summary.tie_rate == pytest.approx(0.2) and summary.tie_rate_ci == bootstrap_share(
        2, 10, bootstrap_samples=500, seed=1
    )
    # 19 order verdicts picked a response: 6 + 2 + 2 + 0 picked the first shown, 10 of them
    assert summary.first_shown_share == pytest.approx(10 / 19)
    assert summary.unreadable_rate == pytest.approx(1 / 20)
    assert CalibrationSummary.from_dict(json.loads(json.dumps(summary.to_dict()))).to_dict() == summary.to_dict()


def test_chance_level_judges_are_recognised() -> None:
    always_tie = CalibrationSummary.of([FIRST_SHOWN_TIE] * 30)
    assert always_tie.accuracy == 0.5 and always_tie.accuracy_ci == (0.5, 0.5) and always_tie.accuracy_includes_chance
    assert always_tie.decided_accuracy is None and always_tie.decided_accuracy_ci is None
    assert always_tie.first_shown_share == 1.0 and always_tie.position_consistency == 0.0
    coin = CalibrationSummary.of([CORRECT] * 15 + [WRONG] * 15)
    assert coin.accuracy_includes_chance
    good = CalibrationSummary.of([CORRECT] * 40 + [WRONG] * 5 + [FIRST_SHOWN_TIE] * 5)
    assert good.accuracy_ci[0] > 0.5 and not good.accuracy_includes_chance
    empty = CalibrationSummary.of([])
    assert (empty.n, empty.accuracy, empty.accuracy_ci, empty.first_shown_share) == (0, 0.0, (0.0, 0.0), None)


def test_bootstrap_share() -> None:
    assert bootstrap_share(0, 0) == (0.0, 0.0)
    assert bootstrap_share(10, 10) == (1.0, 1.0) and bootstrap_share(0, 10) == (0.0, 0.0)
    low, high = bootstrap_share(30, 100, seed=2)
    assert 0.15 < low < 0.3 < high < 0.45
    assert bootstrap_share(30, 100, seed=2) == (low, high)
    with pytest.raises(ValueError, match="exceeds"):
        bootstrap_share(11, 10)
    with pytest.raises(ValueError, match="bootstrap_samples"):
        bootstrap_share(1, 10, bootstrap_samples=0)


# -- storage and warnings ------------------------------------------------------------------------------------

KEY = CalibrationKey("judge-endpoint", "gpt-x@https://example.com/v1?a=b", "pair-v2+rubric")


def calibration_of(
    items: list[KnownPairJudgement], key: CalibrationKey = KEY, max_tokens: int = 384
) -> JudgeCalibration:
    return calibrate(key, "gpt-x", items, [], {"max_tokens": max_tokens, "sets": ["bpo", "hh-rlhf"]})


def stored_form(calibration: JudgeCalibration | None) -> dict[str, object]:
    """What a calibration is on disk: its numbers rounded as the JSON holds them."""
    assert calibration is not None
    return calibration.to_dict()


def test_the_store_keeps_the_latest_calibration_per_key(tmp_path: Path) -> None:
    store = CalibrationStore.under(tmp_path)
    assert store.load(KEY) is None
    first = calibration_of([CORRECT] * 5)
    path = store.save(first)
    assert path.parent == tmp_path / "judge-calibrations"
    assert path.name.startswith("judge-endpoint__pair-v2_rubric__") and "/" not in path.name
    assert stored_form(store.load(KEY)) == first.to_dict()
    second = calibration_of([WRONG] * 5)
    store.save(second)
    assert stored_form(store.load(KEY)) == second.to_dict()
    other = CalibrationKey(KEY.judge, "another version", KEY.template)
    assert store.path_for(other) != path and store.load(other) is None
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(InvalidConfigurationError, match="cannot be read"):
        store.load(KEY)
    store.save(calibration_of([CORRECT], key=other))
    store.path_for(other).replace(path)
    with pytest.raises(InvalidConfigurationError, match="belongs to"):
        store.load(KEY)


def test_warnings_when_the_judge_is_uncalibrated_at_chance_or_calibrated_differently() -> None:
    missing = JudgeCalibrationStatus("judge-endpoint", "pair-v2", 384, key=KEY)
    (warning,) = missing.warnings()
    assert "no calibration exists for judge judge-endpoint" in warning
    assert "bpo judge calibrate --judge judge-endpoint --template pair-v2" in warning
    assert missing.accuracy_text() == "not calibrated"
    unknown = JudgeCalibrationStatus("gone", "pair-v2", 384, problem="its model version is unknown: no endpoint")
    assert "no endpoint" in unknown.warnings()[0]

    coin = calibration_of([CORRECT] * 10 + [WRONG] * 10)
    (warning,) = JudgeCalibrationStatus("judge-endpoint", KEY.template, 384, KEY, coin).warnings()
    assert "includes 50% (chance)" in warning and "50.0% [" in warning
    assert calibration_warnings(coin) == [warning]

    good = calibration_of([CORRECT] * 45 + [WRONG] * 5)
    status = JudgeCalibrationStatus("judge-endpoint", KEY.template, 384, KEY, good)
    assert status.warnings() == [] and calibration_warnings(good) == []
    assert status.accuracy_text().startswith("90.0% [") and status.accuracy_text().endswith(", n=50")
    shorter = JudgeCalibrationStatus("judge-endpoint", KEY.template, 96, KEY, good)
    assert "at most 384 new tokens" in shorter.warnings()[0]
    assert "below 50%" in calibration_warnings(calibration_of([WRONG] * 50))[0]
    assert "judged no known pair" in calibration_warnings(calibration_of([]))[0]


def test_markdown_of_a_calibration() -> None:
    calibration = calibration_of([CORRECT] * 8 + [judged("tie", ("A", "A"), group="bpo/oasst1")] * 2)
    text = render_markdown(calibration)
    assert text.startswith("# Judge calibration: judge-endpoint with pair-v2+rubric\n")
    assert "| model version | gpt-x@https://example.com/v1?a=b |" in text
    assert "| sets | bpo, hh-rlhf |" in text
    assert "| bpo/oasst1 | 2 | 50.0% [50.0, 50.0] |" in text and "| hh-rlhf | 8 | 100.0% [100.0, 100.0] |" in text
    assert "above 50%" in text


async def test_run_calibration_keys_the_result_by_endpoint_model_version_and_template() -> None:
    pairs = [record(f"q{i}", f"good {i}", f"bad {i}", position=i) for i in range(6)]
    engine = ScriptedEngine(picks(lambda first, second: first.startswith("good")))
    calibration = await run_calibration(
        engine, "my-judge", "pair-v2+rubric", pairs, max_tokens=50, seed=0, settings={"limit": 6}
    )
    assert calibration.key == CalibrationKey("my-judge", "scripted-v1", "pair-v2+rubric")
    assert calibration.judge_model == "scripted" and calibration.max_tokens == 50
    assert calibration.summary.accuracy == 1.0 and calibration.summary.n == 6
    assert calibration.settings["pairs"] == 6 and calibration.settings["limit"] == 6
    assert all(r.params.max_tokens == 50 for r in engine.requests)
    stored = calibration.to_dict()
    assert JudgeCalibration.from_dict(json.loads(json.dumps(stored))).to_dict() == stored


async def test_an_engine_that_fails_fails_its_pairs_only() -> None:
    def reply(request: GenerationRequest) -> str:
        if "explode" in last_user_turn(request):
            raise EngineUnavailableError("engine went away")
        return "x\n\n[[A]]"

    pairs = [record("explode", "good", "bad", position=1), record("fine", "good", "bad", position=2)]
    judgements, failures = await judge_known_pairs(PairwiseJudge(ScriptedEngine(reply), "pair-v2"), pairs)
    assert [j.pair_id for j in judgements] == ["hh-rlhf-file:2"]
    assert [f.pair_id for f in failures] == ["hh-rlhf-file:1"] and "engine went away" in failures[0].reason
