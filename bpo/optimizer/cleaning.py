"""Turn a model's raw output into a candidate rewrite: the paper's ``split('[/INST]')[1].strip()``, plus the
wrappers instruct models put around an answer (labels, lead-in sentences, quotes, fences, ``[END]``)."""

from __future__ import annotations

import re

_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:optimi[sz]ed|improved|rewritten|revised|enhanced|better|new|refined)"
    r"(?:\s+(?:version|prompt|instruction|request))*(?:\s+of\s+(?:the|your)\s+prompt)?(?:\*\*)?\s*[:：]"
    r"(?:\*\*)?\s*",
    re.IGNORECASE,
)
_LEAD_IN_LINE = re.compile(
    r"^\s*(?:sure|certainly|of course|okay|ok|here(?:'s| is| are)|below is)\b[^\n]{0,160}"
    r"(?:prompt|version|instruction|rewrite)[^\n]{0,60}[:：.!]?\s*\n+",
    re.IGNORECASE,
)
_QUOTE_PAIRS = (('"', '"'), ("“", "”"), ("'", "'"), ("`", "`"))


def strip_template_echo(text: str) -> str:
    """A raw-template model may echo the prompt; the rewrite is what follows the last ``[/INST]``."""
    if "[/INST]" in text:
        text = text.rsplit("[/INST]", 1)[1]
    return text


def unquote(text: str) -> str:
    """The paper unquotes a rewrite that is one quoted string; quotes inside it are the user's."""
    stripped = text.strip()
    for left, right in _QUOTE_PAIRS:
        inner = stripped[len(left) : -len(right)]
        if (
            len(stripped) >= 2
            and stripped.startswith(left)
            and stripped.endswith(right)
            and left not in inner
            and right not in inner
        ):
            return inner.strip()
    return stripped


def _unfence(text: str) -> str:
    match = re.fullmatch(r"\s*```[a-zA-Z]*\n(.*?)\n```\s*", text, re.DOTALL)
    return match.group(1) if match else text


def clean_rewrite(raw: str) -> str:
    text = strip_template_echo(raw)
    if "[END]" in text:
        text = text.split("[END]", 1)[0]
    text = text.strip()
    text = _LEAD_IN_LINE.sub("", text, count=1)
    text = _LABEL.sub("", text, count=1)
    text = _unfence(text)
    return unquote(text)
