"""Quoted text of any length, inline code and formulas are protected spans; quote marks that are apostrophes,
inch marks or dollar amounts are not."""

from __future__ import annotations

import pytest

from bpo.optimizer.spans import reassemble, segment

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("prompt", "instruction", "spans"),
    [
        ('Is "Me and him went to the store" grammatical?', "Is [PASSAGE 1] grammatical?",
         [("quoted passage", '"Me and him went to the store"')]),
        ("Explain the phrase 'carpe diem' to a child.", "Explain the phrase [PASSAGE 1] to a child.",
         [("quoted passage", "'carpe diem'")]),
        ("What does ‘hygge’ mean? I don’t know", "What does [PASSAGE 1] mean? I don’t know",
         [("quoted passage", "‘hygge’")]),
        ("Traduce «bonjour» y 「你好」", "Traduce [PASSAGE 1] y [PASSAGE 2]",
         [("quoted passage", "«bonjour»"), ("quoted passage", "「你好」")]),
        ("Why does `ls -la` list dot files?", "Why does [PASSAGE 1] list dot files?", [("inline code", "`ls -la`")]),
        ("Solve $x^2 + 1 = 0$ over the reals", "Solve [PASSAGE 1] over the reals", [("formula", "$x^2 + 1 = 0$")]),
        ("Evaluate $$\\int_0^1 x\\,dx$$ and \\(a+b\\)", "Evaluate [PASSAGE 1] and [PASSAGE 2]",
         [("formula", "$$\\int_0^1 x\\,dx$$"), ("formula", "\\(a+b\\)")]),
    ],
)  # fmt: skip
def test_inline_spans_are_protected(prompt: str, instruction: str, spans: list[tuple[str, str]]) -> None:
    segmented = segment(prompt)
    assert segmented.instruction == instruction
    assert [(span.kind, span.text) for span in segmented.spans] == spans
    assert all(span.inline for span in segmented.spans)
    assert reassemble(segmented.instruction, segmented).prompt == prompt


@pytest.mark.parametrize(
    "prompt",
    [
        'My 27" monitor and my 32" one flicker',
        "Don't touch the boys' toys",
        "It costs $5 and $10 with tax",
        "echo $HOME and $PATH",
        "A single ' and a single \" stay as they are",
    ],
)
def test_marks_that_quote_nothing_protect_nothing(prompt: str) -> None:
    assert segment(prompt).spans == ()


def test_a_quote_never_runs_past_its_line() -> None:
    segmented = segment("Say 'hi\nand 'bye' now")
    assert [span.text for span in segmented.spans] == ["'bye'"]


def test_blocks_are_not_inline() -> None:
    segmented = segment('Fix:\n```\ncode()\n```\nand "a\nb"')
    assert [span.inline for span in segmented.spans] == [False, False]
