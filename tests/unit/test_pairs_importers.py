"""Each importer on tiny inputs in its public schema (samples under tests/data/pairs), malformed records included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpo.errors import CorpusFormatError, InvalidConfigurationError
from bpo.pairs.importers import iter_json_values, read_records, split_hh_pair
from bpo.pairs.records import ImportIssue, PreferenceRecord, Skipped, record_id_for

pytestmark = pytest.mark.unit

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "pairs"
ImportItem = PreferenceRecord | ImportIssue | Skipped


def read(path: Path, fmt: str, **kwargs: object) -> list[ImportItem]:
    return list(read_records(path, fmt, "sample", **kwargs))  # type: ignore[arg-type]


def records(items: list[ImportItem]) -> list[PreferenceRecord]:
    return [item for item in items if isinstance(item, PreferenceRecord)]


def issues(items: list[ImportItem]) -> list[tuple[int, str]]:
    return [(item.line, item.reason) for item in items if isinstance(item, ImportIssue)]


def skipped(items: list[ImportItem]) -> list[tuple[int, str]]:
    return [(item.line, item.reason) for item in items if isinstance(item, Skipped)]


def write_jsonl(tmp_path: Path, rows: list[object], name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# -- reading JSON ---------------------------------------------------------------------------------------------


def test_json_array_elements_carry_their_line(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[\n  {"a": 1},\n\n  {"b": "x\\ny"},\n  3\n]\n', encoding="utf-8")
    assert list(iter_json_values(path)) == [(2, {"a": 1}), (4, {"b": "x\ny"}), (5, 3)]


def test_broken_json_array_reports_the_line_and_stops(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[{"a": 1},\n{"b": oops},\n{"c": 3}]', encoding="utf-8")
    values = list(iter_json_values(path))
    assert values[0] == (1, {"a": 1})
    assert isinstance(values[1], ImportIssue) and values[1].line == 2
    assert len(values) == 2


def test_unclosed_json_array(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[{"a": 1},\n', encoding="utf-8")
    values = list(iter_json_values(path))
    assert values[0] == (1, {"a": 1})
    assert isinstance(values[1], ImportIssue) and "not closed" in values[1].reason


def test_jsonl_skips_blank_lines_and_reports_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{nope\n{"b": 2}\n', encoding="utf-8")
    values = list(iter_json_values(path))
    assert values[0] == (1, {"a": 1}) and values[2] == (4, {"b": 2})
    assert isinstance(values[1], ImportIssue) and values[1].line == 3


def test_unknown_format_missing_file_and_generic_without_licence(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigurationError, match="unknown format"):
        read(SAMPLES / "generic.jsonl", "parquet")
    with pytest.raises(CorpusFormatError, match="no such file"):
        read(tmp_path / "missing.jsonl", "hh-rlhf")
    with pytest.raises(InvalidConfigurationError, match="--licence"):
        read(SAMPLES / "generic.jsonl", "generic")


# -- bpo --------------------------------------------------------------------------------------------------------


def bpo_row(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "instruction": "Give two examples of customer service.",
        "context": "",
        "good_res": "Example 1: ... Example 2: ...",
        "bad_res": "Be nice.",
        "comparison": "Detailed Comparison Result: the good one is specific.",
        "optimized_prompt": "Give two specific examples of outstanding customer service.",
        "final_input": "Give two examples of customer service.",
        "final_output": "Give two specific examples of outstanding customer service.",
        "source": "alpaca-gpt4",
    }
    return row | overrides


def test_bpo_records_keep_origin_licence_and_published_output(tmp_path: Path) -> None:
    path = tmp_path / "val.json"
    rows = [
        bpo_row(),
        bpo_row(instruction="Forward this email.", context="Dear Anne, ...", source="oasst1"),
        bpo_row(instruction="Hi", context=None, source="Chatbot_Arena_Conversation", good_model="vicuna-13b"),
        bpo_row(instruction="What is rabies?", source="hh-rlhf"),
        bpo_row(instruction="Mystery", source="elsewhere"),
        bpo_row(good_res=None),
    ]
    # One element per line after the opening bracket: element i starts on line i + 2.
    path.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n", encoding="utf-8")
    items = read(path, "bpo")
    got = records(items)
    assert [r.licence for r in got] == [
        "CC-BY-NC-4.0",
        "Apache-2.0",
        "CC-BY-NC-4.0",
        "MIT",
        "Apache-2.0 (underlying data: unknown)",
    ]
    assert {r.source for r in got} == {"bpo"}
    first, with_context, arena = got[0], got[1], got[2]
    assert first.context is None  # an empty context is no context
    assert with_context.context == "Dear Anne, ..."
    assert first.chosen == "Example 1: ... Example 2: ..." and first.rejected == "Be nice."
    assert first.extra["origin"] == "alpaca-gpt4"
    assert first.extra["optimized_prompt"].startswith("Give two specific")
    assert first.extra["final_output"] == rows[0]["final_output"]
    assert arena.extra["good_model"] == "vicuna-13b"
    assert [r.position for r in got] == [2, 3, 4, 5, 6]
    assert issues(items) == [(7, "field 'good_res' is NoneType, expected a string")]


def test_licence_override(tmp_path: Path) -> None:
    path = tmp_path / "val.json"
    path.write_text(json.dumps([bpo_row()]), encoding="utf-8")
    (record,) = records(read(path, "bpo", licence="CC0-1.0"))
    assert record.licence == "CC0-1.0"


def test_record_ids_are_deterministic_and_per_dataset(tmp_path: Path) -> None:
    path = tmp_path / "val.json"
    path.write_text(json.dumps([bpo_row(), bpo_row(bad_res="Other.")]), encoding="utf-8")
    first = records(read(path, "bpo"))
    again = records(read(path, "bpo"))
    other = records(list(read_records(path, "bpo", "another-dataset")))
    assert [r.record_id for r in first] == [r.record_id for r in again]
    assert len({r.record_id for r in first}) == 2
    assert {r.record_id for r in first}.isdisjoint(r.record_id for r in other)
    assert first[0].record_id == record_id_for("sample", first[0].external_id)


# -- hh-rlhf ----------------------------------------------------------------------------------------------------


def hh(human: str, chosen: str, rejected: str, earlier: str = "") -> dict[str, str]:
    return {
        "chosen": f"{earlier}\n\nHuman: {human}\n\nAssistant: {chosen}",
        "rejected": f"{earlier}\n\nHuman: {human}\n\nAssistant: {rejected}",
    }


def test_hh_rlhf_single_turn_only(tmp_path: Path) -> None:
    rows: list[object] = [
        hh("How do I pick a lock?", "I can't help with that, but a locksmith can.", "Use a tension wrench."),
        hh("And a safe?", "No.", "Drill it.", earlier="\n\nHuman: Hi\n\nAssistant: Hello!"),
        {"chosen": "no turns here", "rejected": "none"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: different\n\nAssistant: c"},
        {"chosen": "\n\nHuman: x"},
    ]
    items = read(write_jsonl(tmp_path, rows), "hh-rlhf")
    (record,) = records(items)
    assert record.instruction == "How do I pick a lock?"
    assert record.chosen == "I can't help with that, but a locksmith can."
    assert record.rejected == "Use a tension wrench."
    assert (record.source, record.licence, record.context) == ("hh-rlhf", "MIT", None)
    assert skipped(items) == [(2, "not single-turn")]
    assert [line for line, _ in issues(items)] == [3, 4, 5]


def test_hh_rlhf_reply_with_a_stray_human_marker_stays_one_reply() -> None:
    chosen = "\n\nHuman: Can you help me?\n\nAssistant: No."
    rejected = "\n\nHuman: Can you help me?\n\nAssistant: Sure.  Human: thanks\n\nAssistant: Here is how."
    conversation, good, bad = split_hh_pair(chosen, rejected)
    assert conversation == [("Human", "Can you help me?")]
    assert (good, bad) == ("No.", "Sure.  Human: thanks\n\nAssistant: Here is how.")


# -- oasst1 -----------------------------------------------------------------------------------------------------


def test_oasst1_messages_best_and_worst_ranked_replies() -> None:
    items = read(SAMPLES / "oasst1_messages.jsonl", "oasst1")
    bread, german = records(items)
    assert bread.instruction == "How do I bake sourdough bread at home?"
    assert bread.chosen.startswith("Sourdough needs a starter")  # rank 0
    assert bread.rejected == "Mix flour, water and yeast and bake it."  # rank 2; the deleted rank-3 reply is ignored
    assert (bread.external_id, bread.source, bread.licence) == ("p-1", "oasst1", "Apache-2.0")
    assert bread.extra["chosen_message_id"] == "a-1" and bread.extra["rejected_message_id"] == "a-2"
    assert bread.position == 3  # the prompt's own line, though its replies came first
    assert german.extra["lang"] == "de"
    assert skipped(items) == [(7, "fewer than two differently ranked assistant replies")]
    assert issues(items) == [(12, "missing field 'role'")]


def test_oasst1_language_filter() -> None:
    items = read(SAMPLES / "oasst1_messages.jsonl", "oasst1", languages=["EN"])
    assert [r.external_id for r in records(items)] == ["p-1"]
    assert (9, "language") in skipped(items)


def test_oasst1_trees_export() -> None:
    items = read(SAMPLES / "oasst1_trees.jsonl", "oasst1")
    (record,) = records(items)
    assert record.instruction == "Explain what a hash map is to a beginner programmer."
    assert record.chosen.startswith("A hash map stores values")
    assert record.rejected == "It maps hashes."
    assert skipped(items) == [(2, "fewer than two differently ranked assistant replies")]  # both rank 0
    assert issues(items) == [(3, "unknown role 'moderator'")]


# -- chatbot-arena ----------------------------------------------------------------------------------------------


def test_chatbot_arena_single_turn_with_a_winner() -> None:
    items = read(SAMPLES / "chatbot_arena.jsonl", "chatbot-arena")
    a_wins, b_wins, spanish = records(items)
    assert a_wins.external_id == "q-0001"
    assert a_wins.chosen.startswith("1. Put your phone") and a_wins.rejected == "Study hard."
    assert (a_wins.extra["chosen_model"], a_wins.extra["rejected_model"]) == ("vicuna-13b", "alpaca-13b")
    assert b_wins.chosen == '{"name": "Mara Lind", "age": 34}' and b_wins.rejected == "name: Bob"
    assert b_wins.extra["chosen_model"] == "gpt-3.5-turbo"
    assert (b_wins.source, b_wins.licence) == ("chatbot-arena", "CC-BY-NC-4.0")
    assert spanish.extra["language"] == "Spanish"
    assert skipped(items) == [(3, "tie"), (4, "tie"), (5, "not single-turn")]
    assert issues(items) == [(6, "unknown winner 'model_c'")]


def test_chatbot_arena_language_filter() -> None:
    items = read(SAMPLES / "chatbot_arena.jsonl", "chatbot-arena", languages=["english"])
    assert [r.external_id for r in records(items)] == ["q-0001", "q-0002"]
    assert (7, "language") in skipped(items)


def test_chatbot_arena_mismatched_user_turns(tmp_path: Path) -> None:
    row = json.loads((SAMPLES / "chatbot_arena.jsonl").read_text().splitlines()[0])
    row["conversation_b"][0]["content"] = "Something else"
    assert issues(read(write_jsonl(tmp_path, [row]), "chatbot-arena")) == [
        (1, "conversation_a and conversation_b start from different user turns")
    ]


# -- alpaca-gpt4 ------------------------------------------------------------------------------------------------


def test_alpaca_gpt4_completion_a_is_chosen() -> None:
    items = read(SAMPLES / "alpaca_gpt4_comparison.json", "alpaca-gpt4")
    got = records(items)
    assert [r.instruction for r in got] == [
        "Give three tips for staying healthy.",
        "Format this dictionary as Python code: name Ada, born 1815.",
        "Name the largest planet in the solar system.",
    ]
    assert got[1].chosen == 'person = {"name": "Ada", "born": 1815}' and got[1].rejected == "{name: Ada}"
    assert {(r.source, r.licence) for r in got} == {("alpaca-gpt4", "CC-BY-NC-4.0")}
    assert [r.position for r in got] == [2, 7, 16]
    assert issues(items) == [(12, "missing field 'completion_b'")]


# -- generic ----------------------------------------------------------------------------------------------------


def test_generic_jsonl() -> None:
    items = read(SAMPLES / "generic.jsonl", "generic", licence="CC0-1.0")
    summary, code, colour = records(items)
    assert summary.external_id == "g-1" and summary.context is not None and summary.context.startswith("The river")
    assert code.external_id.startswith("sha256:") and code.context is None
    assert colour.external_id == "5" and colour.context is None
    assert {(r.source, r.licence) for r in (summary, code, colour)} == {("generic", "CC0-1.0")}
    assert [line for line, _ in issues(items)] == [3, 5]
    assert issues(items)[1] == (5, "missing field 'rejected'")


def test_generic_rejects_wrong_types(tmp_path: Path) -> None:
    rows: list[object] = [
        {"prompt": 3, "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "id": {"x": 1}},
        {"prompt": "p", "context": ["x"], "chosen": "a", "rejected": "b"},
        ["not", "an", "object"],
    ]
    items = read(write_jsonl(tmp_path, rows), "generic", licence="MIT")
    assert [reason for _, reason in issues(items)] == [
        "field 'prompt' is int, expected a string",
        "field 'id' is dict, expected a string or integer",
        "field 'context' is list, expected a string or null",
        "expected a JSON object, got list",
    ]


def test_content_after_a_json_array_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[{"a": 1}]\n[{"b": 2}]\n', encoding="utf-8")
    values = list(iter_json_values(path))
    assert values[0] == (1, {"a": 1})
    assert isinstance(values[1], ImportIssue) and values[1].line == 2 and "after the JSON array" in values[1].reason
