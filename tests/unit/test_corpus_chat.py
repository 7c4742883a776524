"""OpenAI Batch input lines and chat records (``messages``) read as corpus records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bpo.corpus.chat import CONVERSATION_HEADER
from bpo.corpus.formats import CorpusError, CorpusRecord, read_corpus

pytestmark = pytest.mark.unit


def batch_line(custom_id: Any, messages: Any, **overrides: Any) -> dict[str, Any]:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 100},
    }
    return line | overrides


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_batch_request_with_one_user_message(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "batch.jsonl", [batch_line("request-1", [{"role": "user", "content": "Hi there"}])])
    assert list(read_corpus(path)) == [CorpusRecord(1, "request-1", "Hi there", None, None)]


def test_batch_request_keeps_earlier_turns_as_a_transcript_context(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And  times 3?\n"},
    ]
    path = write_jsonl(tmp_path / "batch.jsonl", [batch_line("r", messages)])
    (record,) = list(read_corpus(path))
    assert isinstance(record, CorpusRecord)
    assert record.id == "r"
    assert record.prompt == "And  times 3?\n"  # byte for byte
    assert record.context == f"{CONVERSATION_HEADER}\n[system]\nYou are terse.\n[user]\nWhat is 2+2?\n[assistant]\n4."


def test_batch_text_content_parts_are_joined(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]
    path = write_jsonl(tmp_path / "batch.jsonl", [batch_line("r", [{"role": "user", "content": parts}])])
    (record,) = list(read_corpus(path))
    assert isinstance(record, CorpusRecord) and record.prompt == "Part one.\nPart two."


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (batch_line("", [{"role": "user", "content": "x"}]), "'custom_id' must be a non-empty string"),
        (batch_line(7, [{"role": "user", "content": "x"}]), "'custom_id' must be a non-empty string"),
        (
            batch_line("r", [{"role": "user", "content": "x"}], url="/v1/embeddings"),
            "'url' is '/v1/embeddings'; only /v1/chat/completions requests hold a prompt to optimize",
        ),
        (
            batch_line("r", [{"role": "user", "content": "x"}], method="GET"),
            "'method' is 'GET'; a Batch request is sent with 'POST'",
        ),
        (batch_line("r", [], body="text"), "'body' is str, expected an object"),
        ({"custom_id": "r", "body": {"input": "x"}}, "'body' has no 'messages'"),
        (batch_line("r", []), "body.messages is empty"),
        (batch_line("r", "hello"), "body.messages is str, expected a list of messages"),
        (batch_line("r", [{"role": "system", "content": "x"}]), "body.messages holds no user message"),
        (batch_line("r", [{"content": "x"}]), "body.messages message 1 has no 'role' string"),
        (batch_line("r", ["x"]), "body.messages message 1 is str, expected an object"),
        (
            batch_line("r", [{"role": "user", "content": "  "}]),
            "body.messages message 1 (the last user message) is empty",
        ),
        (
            batch_line("r", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Sure"}]),
            "body.messages ends with a 'assistant' message after the last user message; a Batch request is "
            "optimized as the user's last turn, so it must be the last message",
        ),
        (
            batch_line("r", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
            "body.messages message 1 has a 'image_url' content part; only text is supported",
        ),
        (
            batch_line("r", [{"role": "assistant", "content": None}, {"role": "user", "content": "q"}]),
            "body.messages message 1 has no text content",
        ),
    ],
)
def test_malformed_batch_line_fails_alone_with_its_reason(tmp_path: Path, line: Any, reason: str) -> None:
    good = batch_line("ok", [{"role": "user", "content": "fine"}])
    path = write_jsonl(tmp_path / "batch.jsonl", [good, line, good | {"custom_id": "ok2"}])
    entries = list(read_corpus(path))
    assert entries[1] == CorpusError(2, reason)
    assert [e.id for e in entries if isinstance(e, CorpusRecord)] == ["ok", "ok2"]


def test_chat_record_drops_the_reply_after_the_last_user_message(tmp_path: Path) -> None:
    record = {
        "id": "c1",
        "category": "math",
        "messages": [
            {"role": "user", "content": "Add 1 and 1."},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "Now double it."},
            {"role": "assistant", "content": "4"},
        ],
    }
    path = write_jsonl(tmp_path / "chat.jsonl", [record, {"messages": [{"role": "user", "content": "Solo"}]}])
    first, second = list(read_corpus(path))
    assert first == CorpusRecord(
        1, "c1", "Now double it.", f"{CONVERSATION_HEADER}\n[user]\nAdd 1 and 1.\n[assistant]\n2", "math"
    )
    assert second == CorpusRecord(2, "2", "Solo", None, None)


def test_chat_record_without_a_user_message_fails(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}])
    assert list(read_corpus(path)) == [CorpusError(1, "messages holds no user message")]


def test_messages_win_over_a_prompt_field_unless_a_field_is_named(tmp_path: Path) -> None:
    record = {"prompt": "first question", "messages": [{"role": "user", "content": "last question"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [record])
    (read,) = list(read_corpus(path))
    assert isinstance(read, CorpusRecord) and read.prompt == "last question"
    (named,) = list(read_corpus(path, field="prompt"))
    assert isinstance(named, CorpusRecord) and named.prompt == "first question"


def test_null_messages_count_as_absent(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "flat", "messages": None, "custom_id": None}])
    (record,) = list(read_corpus(path))
    assert isinstance(record, CorpusRecord) and record.prompt == "flat"


def test_chat_records_in_a_json_document(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "q1"}]}, {"messages": []}]))
    entries = list(read_corpus(path))
    assert entries == [CorpusRecord(1, "1", "q1", None, None), CorpusError(2, "messages is empty")]


def test_a_lone_surrogate_in_a_message_fails_its_line(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    path.write_text(
        '{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "bad \\udc00"}]}}\n', encoding="utf-8"
    )
    (error,) = list(read_corpus(path))
    assert isinstance(error, CorpusError) and error.reason.startswith("field 'prompt' is not valid Unicode")


def test_a_custom_id_is_kept_as_the_id_of_a_flat_record(tmp_path: Path) -> None:
    # A flat record, or a Batch line read with a named prompt field: the Batch output is matched by custom_id.
    batch = batch_line("req-9", [{"role": "user", "content": "q"}]) | {"note": "from the field"}
    path = write_jsonl(tmp_path / "flat.jsonl", [{"custom_id": "req-1", "prompt": "p"}, batch])
    flat, request = list(read_corpus(path))
    assert flat == CorpusRecord(1, "req-1", "p", None, None)
    assert request == CorpusRecord(2, "req-9", "q", None, None)
    assert list(read_corpus(path, field="note"))[1] == CorpusRecord(2, "req-9", "from the field", None, None)
