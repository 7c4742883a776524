"""The LLM step of the paper's data construction: its prompts, its output format, its filters, its layouts.

The constructor is shown the instruction, [the context,] the bad and the good response in the paper's prompt
(``construct_with_context.txt`` / ``construct_without_context.txt``, packaged verbatim from thu-coai/BPO) as a
single user turn, as the authors sent it to gpt-3.5-turbo. Its answer has the form
``Detailed Comparison Result: ... Optimized Instruction: ... [END]``. What is kept, dropped and how a context
is joined follows the authors' ``process_optimized_prompts.py``; where this module differs it says why.
"""

from __future__ import annotations

import ast
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import Any, Final

from bpo.engines.base import ChatMessage, GenerationRequest, SamplingParams
from bpo.optimizer.prompting import reference_text
from bpo.pairs.filters import KEPT, LENGTH_RATIO, NO_MARKER, PROTECTED, has_protected_marker, length_ratio_ok

WITH_CONTEXT_PROMPT: Final = "construct_with_context.txt"
WITHOUT_CONTEXT_PROMPT: Final = "construct_without_context.txt"
OPTIMIZED_MARKER: Final = "Optimized Instruction:"
COMPARISON_MARKER: Final = "Detailed Comparison Result:"
END_MARKER: Final = "[END]"
# The constructor of the pairs the BPO authors published (their comparisons and optimized prompts).
BPO_AUTHORS_MODEL: Final = "gpt-3.5-turbo (BPO authors)"


def fill_slots(template: str, values: Sequence[str]) -> str:
    """Put ``values`` into the template's ``{}`` slots in order.

    Not ``str.format``: the values are model responses full of braces (code, JSON, LaTeX), and only the
    template's own slots may be read as slots."""
    parts = template.split("{}")
    if len(parts) != len(values) + 1:
        raise ValueError(f"the template has {len(parts) - 1} slots, got {len(values)} values")
    pieces = [parts[0]]
    for value, part in zip(values, parts[1:], strict=True):
        pieces.append(value)
        pieces.append(part)
    return "".join(pieces)


def has_context(context: str | None) -> bool:
    return context is not None and bool(context.strip())


def construction_prompt(instruction: str, context: str | None, bad: str, good: str) -> str:
    # The authors chose the context prompt whenever a record had a context field, even an empty one; an empty
    # passage only teaches the constructor to "keep" a context that is not there, so it gets the plain prompt.
    if has_context(context):
        assert context is not None
        return fill_slots(reference_text(WITH_CONTEXT_PROMPT), (instruction, context, bad, good))
    return fill_slots(reference_text(WITHOUT_CONTEXT_PROMPT), (instruction, bad, good))


@cache
def prompt_version() -> str:
    """Changes whenever either prompt text does: pairs built from different prompts are different data."""
    digest = hashlib.sha256()
    for name in (WITH_CONTEXT_PROMPT, WITHOUT_CONTEXT_PROMPT):
        digest.update(name.encode() + b"\x00" + reference_text(name).encode() + b"\x00")
    return f"bpo-construct-{digest.hexdigest()[:12]}"


def construction_request(
    instruction: str, context: str | None, bad: str, good: str, params: SamplingParams
) -> GenerationRequest:
    prompt = construction_prompt(instruction, context, bad, good)
    return GenerationRequest(messages=(ChatMessage("user", prompt),), params=params)


# -- the constructor's answer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    comparison: str
    optimized: str
    # Whether the answer closed with [END]; one cut off by the token limit is parsed all the same (as the
    # authors did) and left to the length-ratio filter.
    ended: bool


def unquote(text: str) -> str:
    """A rewrite given as a quoted string literal loses its quotes (the authors ``eval``-ed it; a literal
    parser gives the same strings and runs nothing)."""
    stripped = text.strip()
    try:
        value: Any = ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return stripped
    return value.strip() if isinstance(value, str) else stripped


def strip_comparison_marker(text: str) -> str:
    head, marker, tail = text.partition(COMPARISON_MARKER)
    return (tail if marker else head).strip()


def parse_output(text: str) -> ParsedOutput | None:
    """The comparison and the optimized instruction, or None when there is no ``Optimized Instruction:``.

    As the authors: only text before the first ``[END]`` counts, and the instruction is what follows the first
    marker up to the next marker (if the model wrote a second one) or the end."""
    head = text.split(END_MARKER)[0]
    if OPTIMIZED_MARKER not in head:
        return None
    parts = head.split(OPTIMIZED_MARKER)
    return ParsedOutput(strip_comparison_marker(parts[0]), unquote(parts[1]), END_MARKER in text)


def parsed_from_bpo(extra: dict[str, Any]) -> ParsedOutput | None:
    """The stored answer of a BPO construction record, as ``parse_output`` would have read it."""
    optimized = extra.get("optimized_prompt")
    if not isinstance(optimized, str):
        return None
    comparison = extra.get("comparison")
    return ParsedOutput(strip_comparison_marker(comparison if isinstance(comparison, str) else ""),
                        unquote(optimized), True)  # fmt: skip


# -- context layouts ------------------------------------------------------------------------------------------


class Layout(StrEnum):
    INSTRUCTION_NEWLINE_CONTEXT = "{instruction}\\n{context}"
    CONTEXT_NEWLINE_INSTRUCTION = "{context}\\n{instruction}"
    INSTRUCTION_SPACE_CONTEXT = "{instruction} {context}"
    CONTEXT_SPACE_INSTRUCTION = "{context} {instruction}"
    INSTRUCTION_QUOTED_CONTEXT = '{instruction} "{context}"'
    QUOTED_CONTEXT_INSTRUCTION = '"{context}" {instruction}'
    CONTEXT_IN_OPTIMIZED = "optimized instruction holds the context"
    NONE = "no context"


def apply_layout(layout: Layout, instruction: str, context: str) -> str:
    joined = {
        Layout.INSTRUCTION_NEWLINE_CONTEXT: f"{instruction}\n{context}",
        Layout.CONTEXT_NEWLINE_INSTRUCTION: f"{context}\n{instruction}",
        Layout.INSTRUCTION_SPACE_CONTEXT: f"{instruction} {context}",
        Layout.CONTEXT_SPACE_INSTRUCTION: f"{context} {instruction}",
        Layout.INSTRUCTION_QUOTED_CONTEXT: f'{instruction} "{context}"',
        Layout.QUOTED_CONTEXT_INSTRUCTION: f'"{context}" {instruction}',
    }.get(layout)
    if joined is None:
        raise ValueError(f"{layout!r} is not a joining layout")
    return joined.strip()


def choose_layout(instruction: str, optimized: str, key: str, seed: int) -> Layout:
    """The authors' choice: ``{instruction}\\n{context}`` when the instruction announces what follows ("follow",
    a trailing colon), otherwise one drawn with their probabilities (1/4 each for the two newline layouts, 1/16
    each with a space, 3/16 each with a quoted context). The draw is seeded by ``seed`` and the record's
    ``key``, so a record gets the same layout on every run and whatever else is in its batch."""
    if "follow" in optimized or "follow" in instruction or instruction.rstrip().endswith(":"):
        return Layout.INSTRUCTION_NEWLINE_CONTEXT
    rng = random.Random(f"{seed}\x00{key}")
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            return Layout.INSTRUCTION_NEWLINE_CONTEXT
        return Layout.CONTEXT_NEWLINE_INSTRUCTION
    if rng.random() < 0.25:
        if rng.random() < 0.5:
            return Layout.INSTRUCTION_SPACE_CONTEXT
        return Layout.CONTEXT_SPACE_INSTRUCTION
    if rng.random() < 0.5:
        return Layout.INSTRUCTION_QUOTED_CONTEXT
    return Layout.QUOTED_CONTEXT_INSTRUCTION


@dataclass(frozen=True, slots=True)
class Joined:
    x_user: str
    x_opt: str
    layout: Layout


def context_in_optimized(optimized: str, context: str) -> bool:
    return context.lower() in optimized.lower()


def join_context(instruction: str, optimized: str, context: str | None, *, key: str, seed: int) -> Joined:
    if not has_context(context):
        return Joined(instruction, optimized, Layout.NONE)
    assert context is not None
    if context_in_optimized(optimized, context):
        # Joining again would repeat the passage; the user side gets the default layout.
        return Joined(apply_layout(Layout.INSTRUCTION_NEWLINE_CONTEXT, instruction, context), optimized,
                      Layout.CONTEXT_IN_OPTIMIZED)  # fmt: skip
    layout = choose_layout(instruction, optimized, key, seed)
    return Joined(apply_layout(layout, instruction, context), apply_layout(layout, optimized, context), layout)


def user_side(instruction: str, context: str | None) -> str:
    """X_user of a record that has no rewrite (yet): the default layout."""
    if not has_context(context):
        return instruction
    assert context is not None
    return apply_layout(Layout.INSTRUCTION_NEWLINE_CONTEXT, instruction, context)


# -- the decision on one answer -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputDecision:
    decision: str
    x_user: str
    # The joined rewrite when kept; the bare rewrite when a filter dropped it (to see why); None without one.
    x_opt: str | None
    comparison: str | None
    layout: Layout | None = None


def decide_output(
    instruction: str, context: str | None, parsed: ParsedOutput | None, *, key: str, seed: int
) -> OutputDecision:
    """The paper's filters on a parsed answer, in its order (marker, length ratio, ``[protected``), then the
    context join.

    The authors applied the ratio and ``[protected`` filters to records without a context only; here they apply
    to all, since a rewrite of a context task can be just as much an answer. The ratio compares the bare
    instructions, except when the rewrite holds the context itself: then it compares with instruction plus
    context, the text that rewrite stands for."""
    if parsed is None:
        return OutputDecision(NO_MARKER, user_side(instruction, context), None, None)
    optimized = parsed.optimized
    basis = instruction
    if has_context(context) and context is not None and context_in_optimized(optimized, context):
        basis = user_side(instruction, context)
    if not length_ratio_ok(basis, optimized):
        return OutputDecision(LENGTH_RATIO, user_side(instruction, context), optimized, parsed.comparison)
    if has_protected_marker(optimized):
        return OutputDecision(PROTECTED, user_side(instruction, context), optimized, parsed.comparison)
    joined = join_context(instruction, optimized, context, key=key, seed=seed)
    return OutputDecision(KEPT, joined.x_user, joined.x_opt, parsed.comparison, joined.layout)
