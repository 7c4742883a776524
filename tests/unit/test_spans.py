from __future__ import annotations

import pytest

from bpo.optimizer.spans import MARKER_RE, SegmentedPrompt, markers_in, reassemble, segment

pytestmark = pytest.mark.unit

CODE = "```python\ndef add(a, b):\n\treturn a - b   \n\n# ünïcødé ✓\n```"
ARTICLE = (
    "Die Stadt   Zürich liegt am Zürichsee.\tIts old town has narrow lanes, guild houses and churches; "
    "the Grossmünster and Fraumünster face each other across the Limmat. Tourism, banking and insurance "
    "dominate the economy, and the city hosts the ETH, one of Europe's leading universities — founded 1855. "
    "  Trailing spaces and a non-breaking\u00a0space stay exactly as written.  \n"
)


def only_span(segmented: SegmentedPrompt) -> str:
    assert len(segmented.spans) == 1, segmented.spans
    return segmented.spans[0].text


def test_fenced_code_block_is_protected_byte_for_byte() -> None:
    prompt = f"Fix the bug in this function:\n{CODE}\nIt should add."
    segmented = segment(prompt)
    assert segmented.spans[0].kind == "code block"
    assert only_span(segmented) == CODE
    assert segmented.instruction == "Fix the bug in this function:\n[PASSAGE 1]\nIt should add."
    assert reassemble(segmented.instruction, segmented).prompt == prompt


@pytest.mark.parametrize(
    ("block", "newline"),
    [
        ("~~~\nplain tilde fence\n~~~", "\n"),
        ("  ```js\n  const x = 1;\n  ```", "\n"),
        ("```\r\nwindows line endings\r\n```", "\r\n"),
    ],
)
def test_other_fences_are_protected(block: str, newline: str) -> None:
    prompt = f"Explain this:{newline}{block}{newline}Briefly."
    segmented = segment(prompt)
    assert only_span(segmented).rstrip("\r") == block
    assert segmented.instruction.replace("\r", "") == "Explain this:\n[PASSAGE 1]\nBriefly."
    assert reassemble(segmented.instruction, segmented).prompt == prompt


@pytest.mark.parametrize(
    "quoted",
    ['"""Hello,\n   wörld!  """', "'''a\tb\n c'''"],
)
def test_triple_quoted_passage_is_protected(quoted: str) -> None:
    prompt = f"Translate {quoted} into French."
    segmented = segment(prompt)
    assert only_span(segmented) == quoted
    assert segmented.spans[0].kind == "quoted passage"
    assert segmented.instruction == "Translate [PASSAGE 1] into French."


def test_double_quoted_passage_of_any_length_is_protected() -> None:
    long_quote = '"The committee will reconvene on Tuesday, 4 March, to review the budget proposal in full."'
    prompt = f"Rewrite {long_quote} in plain English."
    segmented = segment(prompt)
    assert only_span(segmented) == long_quote
    assert segmented.instruction == "Rewrite [PASSAGE 1] in plain English."

    short = 'Is "Me and him went to the store" grammatical?'
    segmented = segment(short)
    assert only_span(segmented) == '"Me and him went to the store"'
    assert segmented.instruction == "Is [PASSAGE 1] grammatical?"
    assert segmented.spans[0].inline
    assert only_span(segment('Say "a" aloud')) == '"a"'


def test_curly_and_multiline_double_quotes_are_protected() -> None:
    curly = "“" + "Ask not what your country can do for you; ask what you can do for your country, he said." + "”"
    assert only_span(segment(f"Who said {curly}?")) == curly
    multiline = '"first line\nsecond line"'
    assert only_span(segment(f"Fix the grammar in {multiline} please")) == multiline


def test_block_quote_is_protected_and_its_newline_stays_outside() -> None:
    quote = "> We regret to inform you\n>   that the order is late.\n> Sorry."
    prompt = f"Reply politely to this email:\n{quote}\nKeep it short."
    segmented = segment(prompt)
    assert segmented.spans[0].kind == "block quote"
    assert only_span(segmented) == quote
    assert segmented.instruction == "Reply politely to this email:\n[PASSAGE 1]\nKeep it short."
    assert reassemble(segmented.instruction, segmented).prompt == prompt


def test_lead_in_passage_after_a_colon_line() -> None:
    prompt = "Summarize the following article:\n" + ARTICLE
    segmented = segment(prompt)
    assert segmented.spans[0].kind == "lead-in passage"
    assert only_span(segmented) == ARTICLE  # trailing whitespace and newline included
    assert segmented.instruction == "Summarize the following article:\n[PASSAGE 1]"
    assert reassemble(segmented.instruction, segmented).prompt == prompt
    # The same passage put back after a rewritten instruction keeps every byte, trailing newline included.
    rewritten = reassemble("Write a three-sentence summary of this article:\n[PASSAGE 1]", segmented).prompt
    assert rewritten == "Write a three-sentence summary of this article:\n" + ARTICLE


def test_lead_in_passage_with_a_short_trailing_instruction() -> None:
    prompt = "Summarize the following article:\n" + ARTICLE + "\nKeep it under 50 words."
    segmented = segment(prompt)
    assert segmented.instruction.startswith("Summarize the following article:\n[PASSAGE 1]")
    assert segmented.instruction.endswith("Keep it under 50 words.")
    assert "Zürich" not in segmented.instruction
    assert reassemble(segmented.instruction, segmented).prompt == prompt


def test_lead_in_needs_a_long_passage() -> None:
    prompt = "Translate the following:\nGood morning, how are you today?"
    assert segment(prompt).spans == ()
    assert segment(prompt).instruction == prompt


def test_lead_in_with_windows_line_endings() -> None:
    passage = ARTICLE.replace("\n", "\r\n")
    prompt = "Summarize the following article:\r\n" + passage
    segmented = segment(prompt)
    assert only_span(segmented) == passage


def test_explicit_context_is_kept_aside() -> None:
    segmented = segment("Answer using the context.", "  The sky is blue.\n")
    assert segmented.context == "  The sky is blue.\n"
    assert segmented.spans == ()
    assert segmented.instruction == "Answer using the context."
    assert segmented.has_protected_text
    assert segment("Answer.", " \n\t").context is None
    assert not segment("Answer.", " \n\t").has_protected_text


def test_spans_are_numbered_in_prompt_order() -> None:
    long_quote = '"' + "x" * 85 + '"'
    prompt = f"Compare {long_quote} with\n```\ncode()\n```\nand this:\n> quoted"
    segmented = segment(prompt)
    assert [span.index for span in segmented.spans] == [1, 2, 3]
    assert [span.kind for span in segmented.spans] == ["quoted passage", "code block", "block quote"]
    assert markers_in(segmented.instruction) == [1, 2, 3]
    for span in segmented.spans:
        assert span.text not in segmented.instruction
    assert reassemble(segmented.instruction, segmented).prompt == prompt


def test_markers_may_move_and_come_back_byte_for_byte() -> None:
    prompt = f"Compare\n{CODE}\nwith\n> an old quote  \nplease."
    segmented = segment(prompt)
    assert len(segmented.spans) == 2
    result = reassemble("Compare [PASSAGE 2] to the code [PASSAGE 1] and list differences.", segmented)
    assert result.prompt == f"Compare > an old quote   to the code {CODE} and list differences."
    assert result.repaired == ()


def test_lost_markers_are_appended_in_order() -> None:
    prompt = f"Compare\n{CODE}\nwith\n> an old quote\nplease."
    segmented = segment(prompt)
    spans = [span.text for span in segmented.spans]
    result = reassemble("  Compare the following two snippets and list their differences.  ", segmented)
    assert result.prompt == f"Compare the following two snippets and list their differences.\n{spans[0]}\n{spans[1]}"
    assert result.repaired == (1, 2)

    one_lost = reassemble("Compare [PASSAGE 2] with the code below.", segmented)
    assert one_lost.prompt == f"Compare {spans[1]} with the code below.\n{spans[0]}"
    assert one_lost.repaired == (1,)

    nothing_left = reassemble("", segmented)
    assert nothing_left.prompt == f"{spans[0]}\n{spans[1]}"


def test_invented_and_duplicated_markers_are_dropped() -> None:
    segmented = segment(f"Explain:\n{CODE}")
    result = reassemble("Explain [PASSAGE 1] line by line. See [PASSAGE 7] and again [PASSAGE 1].", segmented)
    assert result.prompt == f"Explain {CODE} line by line. See  and again ."
    assert result.prompt.count(CODE) == 1
    assert MARKER_RE.search(result.prompt) is None
    assert result.repaired == ()


def test_span_at_the_start_keeps_its_indentation() -> None:
    block = "    ```\n    indented()\n    ```"
    prompt = f"{block}\nWhat does this do?"
    segmented = segment(prompt)
    assert only_span(segmented) == block
    result = reassemble("  [PASSAGE 1]\nExplain what this code does, step by step.", segmented)
    assert result.prompt == f"{block}\nExplain what this code does, step by step."


def test_no_spans_round_trip() -> None:
    segmented = segment("Tell me a joke about cats.")
    assert segmented.spans == ()
    assert reassemble("  Tell me a clean joke about cats.\n", segmented).prompt == "Tell me a clean joke about cats."


def test_markers_in() -> None:
    assert markers_in("a [PASSAGE 2] b [PASSAGE 10] [passage 3] [PASSAGE x]") == [2, 10]
