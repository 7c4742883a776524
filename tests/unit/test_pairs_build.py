"""Pair construction end to end on a scripted engine and an in-memory store: decisions, resumption, failures."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest

from bpo.engines.base import Completion, GenerationRequest, derive_seed
from bpo.errors import EngineUnavailableError, InvalidConfigurationError
from bpo.pairs.build import BuildConfig, build_pairs, decide_bpo_records, plan_construction
from bpo.pairs.construct import BPO_AUTHORS_MODEL, prompt_version
from bpo.pairs.filters import (
    EMPTY_RESPONSE,
    GENERATION_ERROR,
    IDENTICAL_RESPONSES,
    KEPT,
    LENGTH_RATIO,
    NO_MARKER,
    PROMPT_TOO_LONG,
    PROTECTED,
    SELF_BLEU,
    TOO_SHORT,
)
from bpo.pairs.generation import EngineGenerator, GenerationFailure, Outcome
from bpo.pairs.records import PreferenceRecord
from bpo.store.pairs import PairRow, StoredRecord
from tests.unit.scripted_engine import ScriptedEngine, last_user_turn

pytestmark = pytest.mark.unit

MODEL = "scripted-constructor"


class MemoryStore:
    """``DecisionStore`` in memory, with the table's uniqueness (a stored decision is never replaced)."""

    def __init__(self, records: Sequence[PreferenceRecord]) -> None:
        self.records = [
            StoredRecord(
                r.record_id,
                r.dataset,
                r.source,
                r.licence,
                r.external_id,
                r.instruction,
                r.context,
                r.chosen,
                r.rejected,
                dict(r.extra),
            )
            for r in records
        ]
        self.pairs: dict[str, PairRow] = {}
        self.add_calls = 0

    def records_with_decisions(
        self, dataset: str, constructor_model: str, prompt_version: str
    ) -> list[tuple[StoredRecord, str | None]]:
        out = []
        for record in self.records:
            if record.dataset == dataset:
                pair = self.pairs.get(f"{record.record_id}|{constructor_model}|{prompt_version}")
                out.append((record, pair.decision if pair else None))
        return out

    def add_pairs(self, pairs: Sequence[PairRow]) -> int:
        self.add_calls += 1
        added = 0
        for pair in pairs:
            key = f"{pair.record_id}|{pair.constructor_model}|{pair.prompt_version}"
            if key not in self.pairs:
                self.pairs[key] = pair
                added += 1
        return added

    def decision_of(self, instruction: str, model: str = MODEL) -> PairRow:
        for record in self.records:
            if record.instruction == instruction:
                return self.pairs[f"{record.record_id}|{model}|{prompt_version()}"]
        raise KeyError(instruction)


def record(
    instruction: str,
    chosen: str = "A detailed, helpful answer.",
    rejected: str = "Meh.",
    context: str | None = None,
    **extra: object,
) -> PreferenceRecord:
    return PreferenceRecord(
        "ds", "generic", "MIT", instruction, instruction, context, chosen, rejected, {"position": 0, **extra}
    )


def instruction_of(request: GenerationRequest) -> str:
    match = re.match(r'instruction: "(.*?)"\n', last_user_turn(request), re.DOTALL)
    assert match is not None
    return match.group(1)


# Replies keyed by instruction; anything else gets a good rewrite.
REPLIES = {
    "Tell me a joke about cats.": "Detailed Comparison Result: fine\nOptimized Instruction: Tell me a clean, "
    "funny joke about cats. [END]",
    "Explain how vaccines work.": "I think vaccines are great.",
    "Describe the city of Paris.": "Detailed Comparison Result: x\nOptimized Instruction: Paris. [END]",
    "Rewrite the function below.": "Detailed Comparison Result: x\nOptimized Instruction: Rewrite the [PROTECTED] "
    "function below. [END]",
    "Summarize this news story.": "Detailed Comparison Result: x\nOptimized Instruction: Summarize this news story "
    "in two sentences. [END]",
}


def scripted() -> ScriptedEngine:
    def reply(request: GenerationRequest) -> str:
        instruction = instruction_of(request)
        return REPLIES.get(
            instruction, f"Detailed Comparison Result: ok\nOptimized Instruction: {instruction} Be specific. [END]"
        )

    return ScriptedEngine(reply)


MIXED = [
    record("Tell me a joke about cats."),
    record("Hi"),
    record("Explain how vaccines work."),
    record("Describe the city of Paris."),
    record("What is the capital of France?", chosen=""),
    record("Rewrite the function below."),
    record("Why is the sky blue at noon?", chosen="Same.", rejected="Same."),
    record("Summarize this news story.", context="Heavy rain closed the bridge on Monday."),
    record("Tell me a joke about cats!"),  # a near-duplicate of the first
]


async def test_every_record_gets_its_decision() -> None:
    store = MemoryStore(MIXED)
    engine = scripted()
    report = await build_pairs(store, "ds", EngineGenerator(engine, MODEL), BuildConfig(batch_size=2))
    expected = {
        "Tell me a joke about cats.": KEPT,
        "Hi": TOO_SHORT,
        "Explain how vaccines work.": NO_MARKER,
        "Describe the city of Paris.": LENGTH_RATIO,
        "What is the capital of France?": EMPTY_RESPONSE,
        "Rewrite the function below.": PROTECTED,
        "Why is the sky blue at noon?": IDENTICAL_RESPONSES,
        "Summarize this news story.": KEPT,
        "Tell me a joke about cats!": SELF_BLEU,
    }
    assert {instruction: store.decision_of(instruction).decision for instruction in expected} == expected
    assert report.decided == 9 and report.failed == 0 and report.records == 9
    assert report.decisions[KEPT] == 2
    # Only what passed the pre-filters reached the model, in batches of two.
    assert [len(batch) for batch in engine.batches] == [2, 2, 1]
    assert "Hi" not in {instruction_of(r) for r in engine.requests}

    joke = store.decision_of("Tell me a joke about cats.")
    assert joke.x_user == "Tell me a joke about cats."
    assert joke.x_opt == "Tell me a clean, funny joke about cats."
    assert joke.comparison == "fine"
    assert joke.raw_output == REPLIES["Tell me a joke about cats."]
    assert (joke.constructor_model, joke.prompt_version, joke.dataset) == (MODEL, prompt_version(), "ds")
    news = store.decision_of("Summarize this news story.")
    assert news.x_opt is not None and "Heavy rain closed the bridge on Monday." in news.x_opt
    assert "Heavy rain closed the bridge on Monday." in news.x_user


async def test_rerun_constructs_nothing_new() -> None:
    store = MemoryStore(MIXED)
    await build_pairs(store, "ds", EngineGenerator(scripted(), MODEL), BuildConfig())
    stored = dict(store.pairs)
    engine = scripted()
    report = await build_pairs(store, "ds", EngineGenerator(engine, MODEL), BuildConfig())
    assert engine.batches == []
    assert report.decided == 0 and report.already_decided == 9
    assert store.pairs == stored


async def test_another_constructor_decides_afresh() -> None:
    store = MemoryStore(MIXED)
    await build_pairs(store, "ds", EngineGenerator(scripted(), MODEL), BuildConfig())
    report = await build_pairs(store, "ds", EngineGenerator(scripted(), "other-model"), BuildConfig())
    assert report.decided == 9
    assert len(store.pairs) == 18


async def test_limit_and_resume_give_the_same_decisions_as_one_run() -> None:
    records = [
        record(f"Write a short story about a {animal} who learns to {verb}.")
        for animal in ("fox", "bear", "owl")
        for verb in ("swim", "fly", "read", "sing")
    ]
    whole = MemoryStore(records)
    await build_pairs(whole, "ds", EngineGenerator(scripted(), MODEL), BuildConfig(self_bleu_threshold=40))
    resumed = MemoryStore(records)
    progress: list[int] = []
    for _ in range(4):
        report = await build_pairs(
            resumed,
            "ds",
            EngineGenerator(scripted(), MODEL),
            BuildConfig(self_bleu_threshold=40, limit=3),
            on_progress=progress.append,
        )
        assert report.decided == 3
    assert report.undecided_left == 0
    assert sum(progress) == 12
    assert {k: p.decision for k, p in resumed.pairs.items()} == {k: p.decision for k, p in whole.pairs.items()}
    assert SELF_BLEU in {p.decision for p in whole.pairs.values()}  # the threshold bites on these templates


async def test_sampling_settings_reach_the_engine() -> None:
    store = MemoryStore([record("Tell me a joke about cats.")])
    engine = scripted()
    config = BuildConfig(temperature=0.9, top_p=0.95, max_new_tokens=300, seed=11)
    await build_pairs(store, "ds", EngineGenerator(engine, MODEL), config)
    (request,) = engine.requests
    assert request.params.temperature == 0.9 and request.params.top_p == 0.95
    assert request.params.max_tokens == 300
    assert request.params.seed == derive_seed(11, store.records[0].record_id)
    assert BuildConfig().temperature == 0.9 and BuildConfig().seed is None


async def test_prompt_too_long_is_a_decision() -> None:
    store = MemoryStore([record("Tell me a joke about cats.", chosen="word " * 4000)])
    engine = ScriptedEngine(lambda request: "unused", context_length=512)
    report = await build_pairs(store, "ds", EngineGenerator(engine, MODEL), BuildConfig())
    assert store.decision_of("Tell me a joke about cats.").decision == PROMPT_TOO_LONG
    assert engine.batches == []
    assert report.decisions[PROMPT_TOO_LONG] == 1


class FlakyGenerator:
    """Fails chosen instructions transiently or for good; answers the rest."""

    def __init__(self, transient: set[str], permanent: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.transient, self.permanent = transient, permanent

    @property
    def name(self) -> str:
        return MODEL

    @property
    def max_in_flight(self) -> int:
        return 3

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for request in requests:
            instruction = instruction_of(request)
            if instruction in self.transient:
                outcomes.append(GenerationFailure("engine restarting", "UNAVAILABLE"))
            elif instruction in self.permanent:
                outcomes.append(GenerationFailure("bad request", "INVALID_ARGUMENT"))
            else:
                text = f"Optimized Instruction: {instruction} In detail. [END]"
                outcomes.append(Completion(text, 10, 10, "stop", 0.1))
        return outcomes


async def test_transient_failures_stay_undecided_for_the_next_run() -> None:
    records = [
        record("Tell me a joke about cats."),
        record("Explain how vaccines work."),
        record("Describe the city of Paris."),
    ]
    store = MemoryStore(records)
    report = await build_pairs(
        store, "ds", FlakyGenerator({"Explain how vaccines work."}, {"Describe the city of Paris."}), BuildConfig()
    )
    assert report.failed == 1 and report.errors == ["UNAVAILABLE: engine restarting"]
    assert len(store.pairs) == 2
    assert store.decision_of("Describe the city of Paris.").decision == GENERATION_ERROR
    report = await build_pairs(store, "ds", FlakyGenerator(set()), BuildConfig())
    assert report.decided == 1 and report.failed == 0
    assert store.decision_of("Explain how vaccines work.").decision == KEPT


class DeadAfter:
    """Answers ``good`` batches, then fails the whole next batch, as a vanished worker pool does."""

    def __init__(self, good: int) -> None:
        self.good = good
        self.calls = 0

    @property
    def name(self) -> str:
        return MODEL

    @property
    def max_in_flight(self) -> int:
        return 1

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        self.calls += 1
        if self.calls > self.good:
            raise EngineUnavailableError("no worker answered")
        return [
            Completion(f"Optimized Instruction: {instruction_of(r)} Please. [END]", 1, 1, "stop", 0.0) for r in requests
        ]


async def test_a_failed_batch_stops_the_run_and_keeps_what_was_stored() -> None:
    records = [record(f"Explain topic number {n} in simple words.") for n in range(6)]
    store = MemoryStore(records)
    with pytest.raises(EngineUnavailableError, match="no worker answered"):
        await build_pairs(store, "ds", DeadAfter(good=1), BuildConfig(batch_size=2, self_bleu_threshold=100))
    assert len(store.pairs) == 2
    report = await build_pairs(store, "ds", DeadAfter(good=10), BuildConfig(batch_size=2, self_bleu_threshold=100))
    assert report.decided == 4 and report.already_decided == 2


async def test_unknown_dataset() -> None:
    with pytest.raises(InvalidConfigurationError, match="no records"):
        await build_pairs(MemoryStore(MIXED), "nope", EngineGenerator(scripted(), MODEL), BuildConfig())


def test_plan_seeds_self_bleu_with_records_that_passed_before() -> None:
    first, duplicate = record("Tell me a joke about cats."), record("Tell me a joke about cats!")
    store = MemoryStore([first, duplicate])
    rows = store.records_with_decisions("ds", MODEL, "v")
    # The first was decided (kept) by an earlier run; the second must still be compared with it.
    plan = plan_construction([(rows[0][0], KEPT), rows[1]], BuildConfig(), MODEL, "v")
    assert [p.decision for p in plan.decided_now] == [SELF_BLEU]
    assert plan.already_decided == 1 and plan.to_construct == []
    # A record dropped by a pre-filter before does not count as kept.
    plan = plan_construction([(rows[0][0], TOO_SHORT), rows[1]], BuildConfig(), MODEL, "v")
    assert plan.decided_now == [] and [r.instruction for r in plan.to_construct] == ["Tell me a joke about cats!"]
    # An earlier record left undecided (its model call failed) is compared only with what came before it, as in
    # the run that first let it through; the later near-duplicate kept since does not drop it now.
    plan = plan_construction([rows[0], (rows[1][0], KEPT)], BuildConfig(), MODEL, "v")
    assert plan.decided_now == [] and [r.instruction for r in plan.to_construct] == ["Tell me a joke about cats."]


def test_published_bpo_pairs_use_the_authors_joins() -> None:
    kept = record(
        "Convert the date into ISO 8601 format",
        context="November 25, 2020",
        optimized_prompt="Convert the given date into ISO 8601 format (YYYY-MM-DD).",
        comparison="Detailed Comparison Result: the good one is right.",
        final_input="Convert the date into ISO 8601 format\nNovember 25, 2020",
        final_output="Convert the given date into ISO 8601 format (YYYY-MM-DD).\nNovember 25, 2020",
    )
    too_long = record(
        "Design a drinking game",
        optimized_prompt=" ".join(["word"] * 30),
        comparison="c",
        final_input="Design a drinking game",
        final_output=" ".join(["word"] * 30),
    )
    no_output = record("What is the boiling point of water?")
    store = MemoryStore([kept, too_long, no_output])
    report = decide_bpo_records(store, "ds", BuildConfig())
    assert report.decisions == {KEPT: 1, LENGTH_RATIO: 1, NO_MARKER: 1}
    pair = store.decision_of("Convert the date into ISO 8601 format", BPO_AUTHORS_MODEL)
    assert pair.x_user == "Convert the date into ISO 8601 format\nNovember 25, 2020"
    assert pair.x_opt == "Convert the given date into ISO 8601 format (YYYY-MM-DD).\nNovember 25, 2020"
    assert pair.comparison == "the good one is right."
    assert pair.raw_output is None
    assert decide_bpo_records(store, "ds", BuildConfig()).decided == 0
