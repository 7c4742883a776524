"""Turn a model's raw output into a candidate rewrite: the paper's ``split('[/INST]')[1].strip()``, plus the
wrappers instruct models put around an answer (labels, lead-in sentences, quotes, fences, ``[END]``), and the
chat framing a small model echoes around it: an ``Original prompt: ...`` line before its ``Improved prompt:``,
and the rewriting request itself on a line of its own after it. Any other framing left in the text is for the
guards to reject (``bpo.optimizer.guards.framing_leaked``).

The wrappers are recognised by RE2 patterns (``bpo.textscan``): linear in the output, whatever it holds.
"""

from __future__ import annotations

from bpo.optimizer.prompting import IMPROVED_LABEL, ORIGINAL_LABEL, REWRITE_REQUEST
from bpo.textscan import SPACE, WORD_CHARS, linear

_LABEL = linear(
    rf"^{SPACE}*(?:\*\*)?(?:optimi[sz]ed|improved|rewritten|revised|enhanced|better|new|refined)"
    rf"(?:{SPACE}+(?:version|prompt|instruction|request))*(?:{SPACE}+of{SPACE}+(?:the|your){SPACE}+prompt)?"
    rf"(?:\*\*)?{SPACE}*[:：](?:\*\*)?{SPACE}*",
    ignore_case=True,
)
# "Sure, here is the improved prompt:" and the like. The opening word ends at a non-word character, which is
# the first of the (at most 160) characters before "prompt" (``\b[^\n]{0,160}`` in ``re``: RE2's ``\b`` is
# ASCII-only).
_LEAD_IN_LINE = linear(
    rf"^{SPACE}*(?:sure|certainly|of course|okay|ok|here(?:'s| is| are)|below is)"
    rf"[^\n{WORD_CHARS}][^\n]{{0,159}}"
    rf"(?:prompt|version|instruction|rewrite)[^\n]{{0,60}}[:：.!]?{SPACE}*\n+",
    ignore_case=True,
)
_FENCED = linear(rf"(?s){SPACE}*```[a-zA-Z]*\n(.*?)\n```{SPACE}*")
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
    match = _FENCED.fullmatch(text)
    return match.group(1) if match else text


def strip_framing_echo(text: str) -> str:
    """Drop an echoed ``Original prompt: ...`` before the last line-initial ``Improved prompt:``, and lines that
    are exactly the rewriting request."""
    lines = text.strip().splitlines()
    improved = [i for i, line in enumerate(lines) if line.lstrip().startswith(IMPROVED_LABEL)]
    if improved and any(line.lstrip().startswith(ORIGINAL_LABEL) for line in lines[: improved[-1]]):
        lines = lines[improved[-1] :]
    request = " ".join(REWRITE_REQUEST.split()).casefold()
    return "\n".join(line for line in lines if " ".join(line.split()).casefold() != request)


def clean_rewrite(raw: str) -> str:
    text = strip_template_echo(raw)
    if "[END]" in text:
        text = text.split("[END]", 1)[0]
    text = strip_framing_echo(text).strip()
    text = _LEAD_IN_LINE.sub("", text, count=1)
    text = _LABEL.sub("", text, count=1)
    text = _unfence(text)
    return unquote(text)
