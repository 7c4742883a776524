from __future__ import annotations

import pytest

from bpo.optimizer.cleaning import clean_rewrite, strip_template_echo, unquote

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # The paper: the rewrite is what follows [/INST] (the last one, if the model echoed the template).
        (
            "[INST] improve this: hi [/INST] Write a haiku about autumn.",
            "Write a haiku about autumn.",
        ),
        ("[INST] a [/INST] b [INST] c [/INST]  Write a limerick.  ", "Write a limerick."),
        ("Write a haiku about autumn. [END] and then some chatter", "Write a haiku about autumn."),
        ("Write a haiku.[END]\n[END]", "Write a haiku."),
        ("Optimized prompt: Write a haiku about autumn.", "Write a haiku about autumn."),
        ("Improved version of your prompt:\n\nWrite a haiku.", "Write a haiku."),
        ("Rewritten Prompt： Write a haiku.", "Write a haiku."),
        ("**Improved prompt**: Write a haiku.", "Write a haiku."),
        ("**Improved prompt:** Write a haiku.", "Write a haiku."),
        (
            "Sure! Here's an improved version of your prompt:\n\nWrite a haiku about autumn leaves.",
            "Write a haiku about autumn leaves.",
        ),
        (
            "Certainly. Below is the rewritten prompt.\nList three uses of copper.",
            "List three uses of copper.",
        ),
        ('"Write a haiku about autumn."', "Write a haiku about autumn."),
        ("“Write a haiku about autumn.”", "Write a haiku about autumn."),
        ('Sure, here is the improved prompt:\n"Describe Paris."', "Describe Paris."),
        ("```\nWrite a haiku.\n```", "Write a haiku."),
        (
            "```text\nWrite a haiku.\nUse five syllables first.\n```",
            "Write a haiku.\nUse five syllables first.",
        ),
    ],
)
def test_clean_rewrite_strips_wrappers(raw: str, expected: str) -> None:
    assert clean_rewrite(raw) == expected


@pytest.mark.parametrize(
    "kept",
    [
        # Quotes inside the rewrite are the user's.
        "Explain the phrase 'carpe diem' and where it comes from.",
        'Explain what "carpe diem" means.',
        '"Hamlet" and "Macbeth": compare their endings.',
        "Sure, I can help with that.",
        "New York is large. Describe its five boroughs.",
        "Write a Python function:\n```python\ndef f(): ...\n```\nthat returns 1.",
        "`ls` and `cd`: explain both commands.",
    ],
)
def test_clean_rewrite_keeps_user_text(kept: str) -> None:
    assert clean_rewrite(kept) == kept


def test_wrapping_quotes_removed_inner_quotes_kept() -> None:
    assert clean_rewrite('“Explain the phrase "carpe diem" in detail.”') == 'Explain the phrase "carpe diem" in detail.'
    assert (
        clean_rewrite("\"Explain the phrase 'carpe diem' in detail.\"") == "Explain the phrase 'carpe diem' in detail."
    )


def test_strip_template_echo_without_inst_is_identity() -> None:
    assert strip_template_echo("  no template here ") == "  no template here "
    assert strip_template_echo("x [/INST] y [/INST] z") == " z"


def test_unquote() -> None:
    assert unquote('  "a b"  ') == "a b"
    assert unquote("'a'") == "a"
    assert unquote('"') == '"'
    assert unquote('"a" "b"') == '"a" "b"'
