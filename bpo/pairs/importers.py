"""Readers for the public preference datasets, each in its published schema.

Every reader yields ``PreferenceRecord``s, ``Skipped`` for well-formed records BPO does not train on (multi-turn
conversations, ties, prompts without two ranked replies) and ``ImportIssue`` for malformed ones, with the line
each starts on; a bad record never stops the import. Files may be JSON Lines or one JSON array (line numbers
are tracked through the array too). Ids are the record's own where it has one, else a hash of its content, so a
re-import maps every record onto the row it already has. Reading is linear in the file: the one pattern (the
HH-RLHF turn marker) is RE2's (``bpo.textscan``).

Formats (``FORMATS``):
    bpo            thu-coai/BPO construction records: instruction, context, good_res, bad_res, comparison,
                   optimized_prompt, final_input, final_output, source (the data each came from)
    hh-rlhf        Anthropic HH-RLHF: chosen / rejected transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...");
                   single-turn only, the human turn is the instruction
    oasst1         OpenAssistant OASST1 messages (message_id, parent_id, role, text, rank, lang, deleted) or its
                   trees export (message_tree_id, prompt with nested replies): a prompter root with its best- and
                   worst-ranked assistant replies
    chatbot-arena  lmsys Chatbot Arena conversations (question_id, model_a, model_b, winner, conversation_a/b,
                   turn, language): single-turn battles with a winner
    alpaca-gpt4    GPT-4-LLM comparison data (user_input, completion_a, completion_b; completion_a preferred)
    generic        prompt, optional context, chosen, rejected, optional id
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bpo.errors import CorpusFormatError, InvalidConfigurationError
from bpo.pairs.records import ImportIssue, PreferenceRecord, Skipped, content_id
from bpo.textscan import linear

FORMATS: Final = ("bpo", "hh-rlhf", "oasst1", "chatbot-arena", "alpaca-gpt4", "generic")

DEFAULT_LICENCES: Final[Mapping[str, str]] = {
    "hh-rlhf": "MIT",
    "oasst1": "Apache-2.0",
    "chatbot-arena": "CC-BY-NC-4.0",
    "alpaca-gpt4": "CC-BY-NC-4.0",
}
# The BPO repository is Apache-2.0, but each record keeps the terms of the data it was built from, which are
# stricter for two of its four sources (data/SOURCES.md of the shared data).
BPO_ORIGIN_LICENCES: Final[Mapping[str, str]] = {
    "alpaca-gpt4": "CC-BY-NC-4.0",
    "Chatbot_Arena_Conversation": "CC-BY-NC-4.0",
    "oasst1": "Apache-2.0",
    "hh-rlhf": "MIT",
}
BPO_REPOSITORY_LICENCE: Final = "Apache-2.0"

ImportItem = PreferenceRecord | ImportIssue | Skipped


class _MalformedError(Exception):
    """Raised inside a converter; becomes an ``ImportIssue`` with the record's line."""


@dataclass(frozen=True, slots=True)
class ImportOptions:
    dataset: str
    licence: str | None = None
    # Kept languages, compared case-insensitively with the record's own field (OASST1 ``lang`` codes such as
    # "en", Chatbot Arena ``language`` names such as "English"); empty keeps every language.
    languages: frozenset[str] = field(default_factory=frozenset)

    def keeps_language(self, value: object) -> bool:
        return not self.languages or (isinstance(value, str) and value.lower() in self.languages)


def read_records(
    path: Path,
    fmt: str,
    dataset: str,
    *,
    licence: str | None = None,
    languages: Iterable[str] = (),
) -> Iterator[ImportItem]:
    """Every record of ``path`` read as ``fmt`` into ``dataset``; ``licence`` overrides the format's own."""
    if fmt not in FORMATS:
        raise InvalidConfigurationError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not dataset.strip():
        raise InvalidConfigurationError("a dataset name is required")
    if fmt == "generic" and not licence:
        raise InvalidConfigurationError("format 'generic' carries no licence of its own: give --licence")
    if not path.is_file():
        raise CorpusFormatError(f"no such file: {path}")
    options = ImportOptions(dataset, licence, frozenset(lang.lower() for lang in languages))
    values = iter_json_values(path)
    if fmt == "oasst1":
        yield from _read_oasst1(values, options)
        return
    convert = _CONVERTERS[fmt]
    for item in values:
        if isinstance(item, ImportIssue):
            yield item
            continue
        line, value = item
        try:
            if not isinstance(value, dict):
                raise _MalformedError(f"expected a JSON object, got {type(value).__name__}")
            yield convert(value, line, options)
        except _MalformedError as exc:
            yield ImportIssue(line, str(exc))


# -- JSON Lines or one JSON array, with line numbers ---------------------------------------------------------


def iter_json_values(path: Path) -> Iterator[tuple[int, Any] | ImportIssue]:
    with path.open(encoding="utf-8-sig") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith("["):
        yield from _array_values(path.read_text(encoding="utf-8-sig"))
        return
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield ImportIssue(number, f"not valid JSON: {exc.msg} (column {exc.colno})")


# Whitespace is skipped a window at a time with str.lstrip (the same characters as ``re``'s ``\s``).
_WHITESPACE_WINDOW = 256


def _array_values(text: str) -> Iterator[tuple[int, Any] | ImportIssue]:
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0

    def line_at(index: int) -> int:
        # Counted incrementally: counting from the start for every element would be quadratic in the file size.
        nonlocal line, counted_to
        line += text.count("\n", counted_to, index)
        counted_to = index
        return line

    def skip(index: int) -> int:
        while index < len(text):
            window = text[index : index + _WHITESPACE_WINDOW]
            rest = window.lstrip()
            index += len(window) - len(rest)
            if rest:
                break
        return index

    index = skip(0) + 1  # past the opening bracket
    while True:
        index = skip(index)
        if index >= len(text):
            yield ImportIssue(line_at(len(text)), "the JSON array is not closed")
            return
        if text[index] == "]":
            rest = skip(index + 1)
            if rest < len(text):
                yield ImportIssue(line_at(rest), "unexpected content after the JSON array; it was not read")
            return
        start = line_at(index)
        try:
            value, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            # Inside one array a syntax error leaves no reliable place to resume from.
            yield ImportIssue(exc.lineno, f"not valid JSON: {exc.msg}; the rest of the array was not read")
            return
        yield start, value
        index = skip(index)
        if index < len(text) and text[index] == ",":
            index += 1
        elif index < len(text) and text[index] != "]":
            yield ImportIssue(line_at(index), "expected ',' or ']' between array elements; the rest was not read")
            return


# -- field helpers --------------------------------------------------------------------------------------------


def _text(record: Mapping[str, Any], name: str) -> str:
    if name not in record:
        raise _MalformedError(f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise _MalformedError(f"field {name!r} is {type(value).__name__}, expected a string")
    return value


def _optional_text(record: Mapping[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _MalformedError(f"field {name!r} is {type(value).__name__}, expected a string or null")
    return value if value.strip() else None


def _record(
    options: ImportOptions,
    source: str,
    licence: str,
    external_id: str,
    instruction: str,
    context: str | None,
    chosen: str,
    rejected: str,
    line: int,
    extra: Mapping[str, Any] | None = None,
) -> PreferenceRecord:
    return PreferenceRecord(
        dataset=options.dataset,
        source=source,
        licence=options.licence or licence,
        external_id=external_id,
        instruction=instruction,
        context=context,
        chosen=chosen,
        rejected=rejected,
        extra={"position": line, **(extra or {})},
    )


# -- bpo ------------------------------------------------------------------------------------------------------

_BPO_EXTRA_FIELDS = ("comparison", "optimized_prompt", "final_input", "final_output", "good_model", "bad_model")


def _from_bpo(record: Mapping[str, Any], line: int, options: ImportOptions) -> ImportItem:
    instruction = _text(record, "instruction")
    context = _optional_text(record, "context")
    good, bad = _text(record, "good_res"), _text(record, "bad_res")
    origin = _optional_text(record, "source") or ""
    extra: dict[str, Any] = {"origin": origin, "via": f"thu-coai/BPO ({BPO_REPOSITORY_LICENCE})"}
    for name in _BPO_EXTRA_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise _MalformedError(f"field {name!r} is {type(value).__name__}, expected a string")
        if value is not None:
            extra[name] = value
    licence = BPO_ORIGIN_LICENCES.get(origin, f"{BPO_REPOSITORY_LICENCE} (underlying data: unknown)")
    external_id = content_id(instruction, context, good, bad)
    return _record(options, "bpo", licence, external_id, instruction, context, good, bad, line, extra)


# -- hh-rlhf --------------------------------------------------------------------------------------------------

_HH_TURN = linear(r"\n\n(Human|Assistant):")
_HH_LAST_ASSISTANT = "\n\nAssistant:"


def split_transcript(transcript: str) -> list[tuple[str, str]]:
    """``[(speaker, text), ...]`` of an HH-RLHF transcript; text is stripped."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise _MalformedError("the transcript does not start with a '\\n\\nHuman:' turn")
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def split_hh_pair(chosen: str, rejected: str) -> tuple[list[tuple[str, str]], str, str]:
    """The shared conversation and the two final assistant replies of an HH-RLHF pair.

    The two transcripts share everything up to the final ``Assistant:`` marker of ``chosen``; what follows it
    is each one's reply (the usual reading of the data: one rejected transcript in harmless-base/test has a
    stray ``Human:`` inside its reply, which stays part of that reply)."""
    cut = chosen.rfind(_HH_LAST_ASSISTANT)
    if cut < 0:
        raise _MalformedError("the chosen transcript has no '\\n\\nAssistant:' turn")
    prefix = chosen[: cut + len(_HH_LAST_ASSISTANT)]
    conversation = split_transcript(prefix + " ")[:-1]
    if not rejected.startswith(prefix):
        raise _MalformedError("chosen and rejected transcripts differ before their final assistant turn")
    return conversation, chosen[len(prefix) :].strip(), rejected[len(prefix) :].strip()


def _from_hh(record: Mapping[str, Any], line: int, options: ImportOptions) -> ImportItem:
    chosen_text, rejected_text = _text(record, "chosen"), _text(record, "rejected")
    try:
        conversation, chosen, rejected = split_hh_pair(chosen_text, rejected_text)
    except _MalformedError:
        # A multi-turn pair is out of scope whatever else is wrong with it.
        if chosen_text.count(_HH_LAST_ASSISTANT) > 1:
            return Skipped(line, "not single-turn")
        raise
    if [speaker for speaker, _ in conversation] != ["Human"]:
        return Skipped(line, "not single-turn")
    external_id = content_id(chosen_text, rejected_text)
    return _record(options, "hh-rlhf", DEFAULT_LICENCES["hh-rlhf"], external_id, conversation[0][1], None, chosen,
                   rejected, line)  # fmt: skip


# -- chatbot-arena --------------------------------------------------------------------------------------------


def _arena_turns(record: Mapping[str, Any], name: str) -> list[tuple[str, str]]:
    conversation = record.get(name)
    if not isinstance(conversation, list):
        raise _MalformedError(f"field {name!r} must be a list of {{role, content}} messages")
    turns = []
    for message in conversation:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _MalformedError(f"{name} holds a message without a string 'role'")
        turns.append((message["role"], _text(message, "content")))
    return turns


def _from_arena(record: Mapping[str, Any], line: int, options: ImportOptions) -> ImportItem:
    question_id = record.get("question_id")
    if not isinstance(question_id, str | int) or isinstance(question_id, bool) or not str(question_id).strip():
        raise _MalformedError("missing field 'question_id'")
    winner = _text(record, "winner")
    if winner not in ("model_a", "model_b", "tie", "tie (bothbad)"):
        raise _MalformedError(f"unknown winner {winner!r}")
    turns_a, turns_b = _arena_turns(record, "conversation_a"), _arena_turns(record, "conversation_b")
    turn = record.get("turn", len(turns_a) // 2)
    if (
        turn != 1
        or [r for r, _ in turns_a] != ["user", "assistant"]
        or [r for r, _ in turns_b] != ["user", "assistant"]
    ):
        return Skipped(line, "not single-turn")
    if winner.startswith("tie"):
        return Skipped(line, "tie")
    if not options.keeps_language(record.get("language")):
        return Skipped(line, "language")
    if turns_a[0][1] != turns_b[0][1]:
        raise _MalformedError("conversation_a and conversation_b start from different user turns")
    model_a, model_b = str(record.get("model_a", "")), str(record.get("model_b", ""))
    a_won = winner == "model_a"
    chosen, rejected = (turns_a[1][1], turns_b[1][1]) if a_won else (turns_b[1][1], turns_a[1][1])
    extra = {
        "model_a": model_a,
        "model_b": model_b,
        "winner": winner,
        "chosen_model": model_a if a_won else model_b,
        "rejected_model": model_b if a_won else model_a,
        "language": record.get("language"),
    }
    return _record(options, "chatbot-arena", DEFAULT_LICENCES["chatbot-arena"], str(question_id), turns_a[0][1],
                   None, chosen, rejected, line, extra)  # fmt: skip


# -- alpaca-gpt4 ----------------------------------------------------------------------------------------------


def _from_alpaca(record: Mapping[str, Any], line: int, options: ImportOptions) -> ImportItem:
    instruction = _text(record, "user_input")
    chosen, rejected = _text(record, "completion_a"), _text(record, "completion_b")
    external_id = content_id(instruction, chosen, rejected)
    return _record(options, "alpaca-gpt4", DEFAULT_LICENCES["alpaca-gpt4"], external_id, instruction, None, chosen,
                   rejected, line)  # fmt: skip


# -- generic --------------------------------------------------------------------------------------------------


def _from_generic(record: Mapping[str, Any], line: int, options: ImportOptions) -> ImportItem:
    instruction = _text(record, "prompt")
    context = _optional_text(record, "context")
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    own_id = record.get("id")
    if own_id is not None and (not isinstance(own_id, str | int) or isinstance(own_id, bool)):
        raise _MalformedError(f"field 'id' is {type(own_id).__name__}, expected a string or integer")
    external_id = str(own_id) if own_id is not None else content_id(instruction, context, chosen, rejected)
    assert options.licence is not None  # read_records refuses generic input without one
    return _record(options, "generic", options.licence, external_id, instruction, context, chosen, rejected, line)


_CONVERTERS = {
    "bpo": _from_bpo,
    "hh-rlhf": _from_hh,
    "chatbot-arena": _from_arena,
    "alpaca-gpt4": _from_alpaca,
    "generic": _from_generic,
}


# -- oasst1 ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Message:
    message_id: str
    parent_id: str | None
    role: str
    text: str
    rank: float | None
    lang: str | None
    deleted: bool
    tree_id: str | None
    line: int


def _oasst_message(raw: Mapping[str, Any], line: int) -> _Message:
    message_id = raw.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        raise _MalformedError("missing field 'message_id'")
    parent_id = raw.get("parent_id")
    if parent_id is not None and not isinstance(parent_id, str):
        raise _MalformedError("field 'parent_id' must be a string or null")
    role = _text(raw, "role")
    if role not in ("prompter", "assistant"):
        raise _MalformedError(f"unknown role {role!r}")
    rank = raw.get("rank")
    if rank is not None and (not isinstance(rank, int | float) or isinstance(rank, bool)):
        raise _MalformedError(f"field 'rank' is {type(rank).__name__}, expected a number or null")
    lang = raw.get("lang")
    tree_id = raw.get("message_tree_id")
    return _Message(
        message_id=message_id,
        parent_id=parent_id,
        role=role,
        text=_text(raw, "text"),
        rank=float(rank) if rank is not None else None,
        lang=lang if isinstance(lang, str) else None,
        deleted=bool(raw.get("deleted", False)),
        tree_id=tree_id if isinstance(tree_id, str) else None,
        line=line,
    )


def _flatten_tree(node: Mapping[str, Any], line: int, parent_id: str | None, out: list[_Message]) -> None:
    message = _oasst_message(node, line)
    # The trees export may leave parent_id out of nested replies; the nesting says it.
    if message.parent_id is None and parent_id is not None:
        message.parent_id = parent_id
    out.append(message)
    replies = node.get("replies", [])
    if not isinstance(replies, list):
        raise _MalformedError("field 'replies' must be a list")
    for reply in replies:
        if not isinstance(reply, dict):
            raise _MalformedError("a reply must be a JSON object")
        _flatten_tree(reply, line, message.message_id, out)


def _read_oasst1(values: Iterator[tuple[int, Any] | ImportIssue], options: ImportOptions) -> Iterator[ImportItem]:
    # Replies may come before or after their prompt in a messages file: pair up only once everything is read.
    messages: list[_Message] = []
    for item in values:
        if isinstance(item, ImportIssue):
            yield item
            continue
        line, value = item
        try:
            if not isinstance(value, dict):
                raise _MalformedError(f"expected a JSON object, got {type(value).__name__}")
            if isinstance(value.get("prompt"), dict):
                tree: list[_Message] = []
                _flatten_tree(value["prompt"], line, None, tree)
                messages.extend(tree)
            else:
                messages.append(_oasst_message(value, line))
        except _MalformedError as exc:
            yield ImportIssue(line, str(exc))
    replies: dict[str, list[_Message]] = {}
    for message in messages:
        if message.parent_id is not None:
            replies.setdefault(message.parent_id, []).append(message)
    roots = sorted((m for m in messages if m.parent_id is None and m.role == "prompter"), key=lambda m: m.line)
    for root in roots:
        yield _oasst_pair(root, replies.get(root.message_id, []), options)


def _oasst_pair(root: _Message, children: Sequence[_Message], options: ImportOptions) -> ImportItem:
    if root.deleted:
        return Skipped(root.line, "deleted prompt")
    if not options.keeps_language(root.lang):
        return Skipped(root.line, "language")
    ranked = sorted(
        (c for c in children if c.role == "assistant" and not c.deleted and c.rank is not None),
        key=lambda c: (c.rank, c.message_id),
    )
    if len(ranked) < 2 or ranked[0].rank == ranked[-1].rank:
        return Skipped(root.line, "fewer than two differently ranked assistant replies")
    best, worst = ranked[0], ranked[-1]
    extra = {
        "lang": root.lang,
        "message_tree_id": root.tree_id,
        "chosen_message_id": best.message_id,
        "rejected_message_id": worst.message_id,
        "chosen_rank": best.rank,
        "rejected_rank": worst.rank,
    }
    return _record(options, "oasst1", DEFAULT_LICENCES["oasst1"], root.message_id, root.text, None, best.text,
                   worst.text, root.line, extra)  # fmt: skip
