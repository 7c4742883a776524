"""Chat-shaped corpus records: a conversation (``messages``) and an OpenAI Batch request line.

The prompt is the last user message, the instruction the optimizer rewrites. The turns before it are the
record's ``context``, kept byte for byte: the optimizer never sees the context as text to rewrite and refuses a
rewrite that copies it, and the target and the judge read it after the prompt (``{prompt}\\n{context}``, the
layout of ``bpo.generation.answers``). So that they read it as the conversation it was, the earlier turns are
written out as a transcript under one header line, oldest first, each turn its role in brackets on a line of
its own and then its text::

    Earlier turns of this conversation, oldest first:
    [system]
    You are a terse assistant.
    [user]
    What is 2+2?
    [assistant]
    4.

Roles and texts are kept; other message fields (``name``, tool calls) are not, and a turn without text (an
assistant turn that only called tools) fails the record with a reason rather than being dropped. A message's
content is a string or a list of text parts (joined with a newline); any other part (an image) fails the record.

A chat record is a conversation a data set recorded, which often ends with the assistant's reply: turns after
the last user message are that reply, not part of the question, and are not sent. A Batch request is what its
author meant to send: one that does not end with a user message would be answered after the assistant's turn,
which a prompt cannot reproduce, and it fails with a reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CONVERSATION_HEADER = "Earlier turns of this conversation, oldest first:"
# The one endpoint whose requests are prompts; a Batch file for another endpoint is refused line by line.
BATCH_CHAT_URL = "/v1/chat/completions"
BATCH_METHOD = "POST"
# A record with both an id and a body is a Batch request line rather than a flat record.
BATCH_ID_FIELD = "custom_id"
BATCH_BODY_FIELD = "body"
BATCH_FIELDS = (BATCH_ID_FIELD, "method", "url", BATCH_BODY_FIELD)
MESSAGES_FIELD = "messages"
USER_ROLE = "user"


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    prompt: str
    context: str | None


# A field that is null counts as absent: a Parquet row has every column of its file, null where unset.
def is_batch_request(record: dict[str, Any]) -> bool:
    return record.get(BATCH_ID_FIELD) is not None and record.get(BATCH_BODY_FIELD) is not None


def is_conversation(record: dict[str, Any]) -> bool:
    return record.get(MESSAGES_FIELD) is not None


def batch_request_prompt(record: dict[str, Any]) -> tuple[str, ChatPrompt]:
    """The ``custom_id`` and the prompt of one Batch input line; ``ValueError`` says what is wrong with it."""
    custom_id = record[BATCH_ID_FIELD]
    if not isinstance(custom_id, str) or not custom_id.strip():
        raise ValueError("'custom_id' must be a non-empty string")
    method = record.get("method") or BATCH_METHOD
    if method != BATCH_METHOD:
        raise ValueError(f"'method' is {method!r}; a Batch request is sent with {BATCH_METHOD!r}")
    url = record.get("url") or BATCH_CHAT_URL
    if url != BATCH_CHAT_URL:
        raise ValueError(f"'url' is {url!r}; only {BATCH_CHAT_URL} requests hold a prompt to optimize")
    body = record[BATCH_BODY_FIELD]
    if not isinstance(body, dict):
        raise ValueError(f"'body' is {type(body).__name__}, expected an object")
    if MESSAGES_FIELD not in body:
        raise ValueError("'body' has no 'messages'")
    messages = _message_list(body[MESSAGES_FIELD], "body.messages")
    last_user = _last_user_index(messages, "body.messages")
    if last_user != len(messages) - 1:
        role = messages[-1].get("role")
        raise ValueError(
            f"body.messages ends with a {role!r} message after the last user message; a Batch request is "
            "optimized as the user's last turn, so it must be the last message"
        )
    return custom_id, _split(messages, last_user, "body.messages")


def conversation_prompt(record: dict[str, Any]) -> ChatPrompt:
    """The prompt of a chat record (``messages``); ``ValueError`` says what is wrong with it."""
    messages = _message_list(record[MESSAGES_FIELD], MESSAGES_FIELD)
    return _split(messages, _last_user_index(messages, MESSAGES_FIELD), MESSAGES_FIELD)


def _message_list(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError(f"{where} is {type(value).__name__}, expected a list of messages")
    if not value:
        raise ValueError(f"{where} is empty")
    for position, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"{where} message {position} is {type(message).__name__}, expected an object")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"{where} message {position} has no 'role' string")
    return value


def _last_user_index(messages: Sequence[dict[str, Any]], where: str) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == USER_ROLE:
            return index
    raise ValueError(f"{where} holds no user message")


def _split(messages: Sequence[dict[str, Any]], last_user: int, where: str) -> ChatPrompt:
    prompt = _text_of(messages[last_user], last_user + 1, where)
    if not prompt.strip():
        raise ValueError(f"{where} message {last_user + 1} (the last user message) is empty")
    if last_user == 0:
        return ChatPrompt(prompt, None)
    turns = [
        f"[{message['role']}]\n{_text_of(message, position, where)}"
        for position, message in enumerate(messages[:last_user], start=1)
    ]
    return ChatPrompt(prompt, "\n".join((CONVERSATION_HEADER, *turns)))


def _text_of(message: dict[str, Any], position: int, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"{where} message {position} has a {kind!r} content part; only text is supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"{where} message {position} has no text content")
