"""The paper's construction prompts, output parser, context layouts and per-answer decisions."""

from __future__ import annotations

from collections import Counter

import pytest

from bpo.engines.base import SamplingParams
from bpo.optimizer.prompting import reference_text
from bpo.pairs.construct import (
    Layout,
    ParsedOutput,
    apply_layout,
    choose_layout,
    construction_prompt,
    construction_request,
    decide_output,
    fill_slots,
    join_context,
    parse_output,
    parsed_from_bpo,
    prompt_version,
    unquote,
)
from bpo.pairs.filters import KEPT, LENGTH_RATIO, NO_MARKER, PROTECTED

pytestmark = pytest.mark.unit

INSTRUCTION = "Summarize the article."
CONTEXT = "The council voted 7 to 2 to build a new library by 2026."


# -- slots ------------------------------------------------------------------------------------------------------


def test_fill_slots_in_order() -> None:
    assert fill_slots("a {} b {} c", ["1", "2"]) == "a 1 b 2 c"


def test_fill_slots_leaves_braces_in_values_alone() -> None:
    values = ['{"k": {}}', "def f(): return {}", "{0} {name} {}"]
    filled = fill_slots("x={}\ny={}\nz={}", values)
    assert filled == 'x={"k": {}}\ny=def f(): return {}\nz={0} {name} {}'


def test_fill_slots_needs_one_value_per_slot() -> None:
    with pytest.raises(ValueError, match="2 slots, got 3"):
        fill_slots("{} and {}", ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 slots, got 1"):
        fill_slots("{} and {}", ["a"])


def test_prompt_without_context_is_the_papers_text_in_slot_order() -> None:
    prompt = construction_prompt("Fix {this}", None, "bad {x}", "good {}")
    template = reference_text("construct_without_context.txt")
    head = template.split("{}")
    assert prompt.startswith(f"{head[0]}Fix {{this}}{head[1]}bad {{x}}{head[2]}good {{}}{head[3]}")
    assert prompt.index("Fix {this}") < prompt.index("bad {x}") < prompt.index("good {}")
    assert prompt.endswith("Optimized Instruction: xxx [END]")


def test_prompt_with_context_puts_context_second() -> None:
    prompt = construction_prompt(INSTRUCTION, CONTEXT, "BAD", "GOOD")
    assert prompt.startswith(f'instruction: "{INSTRUCTION}"\ncontext:\n"{CONTEXT}"\n\nbad response:\n"BAD"')
    assert 'good response:\n"GOOD"' in prompt
    assert "Don't change the context" in prompt


def test_blank_context_uses_the_plain_prompt() -> None:
    assert construction_prompt(INSTRUCTION, "  ", "b", "g") == construction_prompt(INSTRUCTION, None, "b", "g")


def test_request_is_one_user_turn_with_the_given_sampling() -> None:
    params = SamplingParams(temperature=0.9, top_p=1.0, max_tokens=300, seed=5)
    request = construction_request(INSTRUCTION, None, "b", "g", params)
    assert request.messages is not None and len(request.messages) == 1
    assert request.messages[0].role == "user"
    assert request.params == params


def test_prompt_version_is_stable_and_names_the_prompts() -> None:
    assert prompt_version() == prompt_version()
    assert prompt_version().startswith("bpo-construct-")
    assert len(prompt_version()) == len("bpo-construct-") + 12


# -- parser -----------------------------------------------------------------------------------------------------


def test_parse_full_answer() -> None:
    text = (
        "Detailed Comparison Result: The good response is specific.\n"
        "Optimized Instruction: Summarize the article in two sentences. [END]"
    )
    parsed = parse_output(text)
    assert parsed == ParsedOutput("The good response is specific.", "Summarize the article in two sentences.", True)


def test_marker_missing() -> None:
    assert parse_output("Detailed Comparison Result: fine.\nImproved prompt: Do X. [END]") is None
    assert parse_output("") is None


def test_marker_after_end_does_not_count() -> None:
    assert parse_output("Comparison [END] Optimized Instruction: too late") is None


def test_quoted_instruction_is_unquoted() -> None:
    parsed = parse_output('Detailed Comparison Result: x\nOptimized Instruction: "Write a \\"short\\" poem." [END]')
    assert parsed is not None
    assert parsed.optimized == 'Write a "short" poem.'
    single = parse_output("Optimized Instruction: 'List three facts.' [END]")
    assert single is not None and single.optimized == "List three facts."


def test_unquote_only_unquotes_whole_string_literals() -> None:
    assert unquote('  "inner quote" then more ') == '"inner quote" then more'
    assert unquote("42") == "42"
    assert unquote("['a']") == "['a']"
    assert unquote("b'bytes'") == "b'bytes'"
    assert unquote('"unterminated') == '"unterminated'
    assert unquote("__import__('os').system('true')") == "__import__('os').system('true')"


def test_end_missing_takes_the_rest() -> None:
    parsed = parse_output("Detailed Comparison Result: ok\nOptimized Instruction: Describe the water cycle in detail")
    assert parsed is not None
    assert parsed.optimized == "Describe the water cycle in detail"
    assert not parsed.ended


def test_second_marker_ends_the_instruction() -> None:
    parsed = parse_output("Optimized Instruction: First. Optimized Instruction: Second. [END]")
    assert parsed is not None and parsed.optimized == "First."


def test_comparison_without_its_marker_is_kept_whole() -> None:
    parsed = parse_output("The good one is better.\nOptimized Instruction: Do it well. [END] trailing")
    assert parsed is not None
    assert parsed.comparison == "The good one is better."
    assert parsed.ended


def test_parsed_from_bpo_record() -> None:
    parsed = parsed_from_bpo({"comparison": "Detailed Comparison Result: \n\n- better", "optimized_prompt": '"Do X."'})
    assert parsed == ParsedOutput("- better", "Do X.", True)
    assert parsed_from_bpo({"comparison": "c"}) is None


# -- layouts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        (Layout.INSTRUCTION_NEWLINE_CONTEXT, f"{INSTRUCTION}\n{CONTEXT}"),
        (Layout.CONTEXT_NEWLINE_INSTRUCTION, f"{CONTEXT}\n{INSTRUCTION}"),
        (Layout.INSTRUCTION_SPACE_CONTEXT, f"{INSTRUCTION} {CONTEXT}"),
        (Layout.CONTEXT_SPACE_INSTRUCTION, f"{CONTEXT} {INSTRUCTION}"),
        (Layout.INSTRUCTION_QUOTED_CONTEXT, f'{INSTRUCTION} "{CONTEXT}"'),
        (Layout.QUOTED_CONTEXT_INSTRUCTION, f'"{CONTEXT}" {INSTRUCTION}'),
    ],
)
def test_layouts(layout: Layout, expected: str) -> None:
    assert apply_layout(layout, INSTRUCTION, CONTEXT) == expected


def test_layout_strips_the_joined_text() -> None:
    assert apply_layout(Layout.INSTRUCTION_NEWLINE_CONTEXT, "Do it. ", "ctx\n") == "Do it. \nctx"
    with pytest.raises(ValueError, match="not a joining layout"):
        apply_layout(Layout.NONE, "a", "b")


def test_layout_is_deterministic_per_record_and_seed() -> None:
    first = [choose_layout(INSTRUCTION, "Summarize it.", f"record-{i}", seed=0) for i in range(50)]
    again = [choose_layout(INSTRUCTION, "Summarize it.", f"record-{i}", seed=0) for i in range(50)]
    other_seed = [choose_layout(INSTRUCTION, "Summarize it.", f"record-{i}", seed=1) for i in range(50)]
    assert first == again
    assert first != other_seed


def test_layouts_follow_the_papers_probabilities() -> None:
    counts = Counter(choose_layout(INSTRUCTION, "Summarize it.", f"r{i}", seed=3) for i in range(8000))
    expected = {
        Layout.INSTRUCTION_NEWLINE_CONTEXT: 1 / 4,
        Layout.CONTEXT_NEWLINE_INSTRUCTION: 1 / 4,
        Layout.INSTRUCTION_SPACE_CONTEXT: 1 / 16,
        Layout.CONTEXT_SPACE_INSTRUCTION: 1 / 16,
        Layout.INSTRUCTION_QUOTED_CONTEXT: 3 / 16,
        Layout.QUOTED_CONTEXT_INSTRUCTION: 3 / 16,
    }
    for layout, share in expected.items():
        assert abs(counts[layout] / 8000 - share) < 0.02, (layout, counts[layout])


@pytest.mark.parametrize(
    ("instruction", "optimized"),
    [
        ("Answer the questions that follow", "Answer them."),
        ("Translate it.", "Translate the text that follows into French."),
        ("Classify the sentiment of the following:", "Classify the sentiment."),
        ("Rewrite this:  ", "Rewrite it formally."),
    ],
)
def test_announced_context_always_follows_the_instruction(instruction: str, optimized: str) -> None:
    layouts = {choose_layout(instruction, optimized, f"r{i}", seed=0) for i in range(40)}
    assert layouts == {Layout.INSTRUCTION_NEWLINE_CONTEXT}


def test_join_without_context() -> None:
    joined = join_context(INSTRUCTION, "Summarize it well.", None, key="k", seed=0)
    assert (joined.x_user, joined.x_opt, joined.layout) == (INSTRUCTION, "Summarize it well.", Layout.NONE)


def test_join_applies_the_same_layout_to_both_sides() -> None:
    for i in range(30):
        joined = join_context(INSTRUCTION, "Summarize it in one sentence.", CONTEXT, key=f"k{i}", seed=0)
        assert joined.x_user == apply_layout(joined.layout, INSTRUCTION, CONTEXT)
        assert joined.x_opt == apply_layout(joined.layout, "Summarize it in one sentence.", CONTEXT)


def test_join_when_the_rewrite_already_contains_the_context() -> None:
    optimized = f"Summarize this article in one sentence: {CONTEXT.upper()}"
    joined = join_context(INSTRUCTION, optimized, CONTEXT, key="k", seed=0)
    assert joined.layout == Layout.CONTEXT_IN_OPTIMIZED
    assert joined.x_opt == optimized  # not joined again
    assert joined.x_user == f"{INSTRUCTION}\n{CONTEXT}"


# -- decisions --------------------------------------------------------------------------------------------------


def parsed(optimized: str) -> ParsedOutput:
    return ParsedOutput("comparison", optimized, True)


def test_decide_no_marker() -> None:
    decided = decide_output(INSTRUCTION, CONTEXT, None, key="k", seed=0)
    assert decided.decision == NO_MARKER
    assert decided.x_opt is None
    assert decided.x_user == f"{INSTRUCTION}\n{CONTEXT}"


def test_decide_kept_joins_the_context() -> None:
    decided = decide_output(INSTRUCTION, CONTEXT, parsed("Summarize the article in two sentences."), key="k", seed=0)
    assert decided.decision == KEPT
    assert decided.layout is not None and decided.layout not in (Layout.NONE, Layout.CONTEXT_IN_OPTIMIZED)
    assert decided.x_opt is not None and CONTEXT in decided.x_opt and CONTEXT in decided.x_user
    assert decided.comparison == "comparison"


def test_decide_length_ratio_on_the_bare_instruction() -> None:
    # Three words may grow to 18 but not to 19, whatever the context's length.
    assert (
        decide_output("Summarize the article.", CONTEXT, parsed(" ".join(["w"] * 18)), key="k", seed=0).decision == KEPT
    )
    dropped = decide_output("Summarize the article.", CONTEXT, parsed(" ".join(["w"] * 19)), key="k", seed=0)
    assert dropped.decision == LENGTH_RATIO
    assert dropped.x_opt == " ".join(["w"] * 19)  # kept for inspection, not joined


def test_decide_length_ratio_counts_the_context_a_rewrite_contains() -> None:
    optimized = f"Summarize the following article in two sentences: {CONTEXT}"
    assert decide_output(INSTRUCTION, CONTEXT, parsed(optimized), key="k", seed=0).decision == KEPT


def test_decide_protected() -> None:
    decided = decide_output("Fix the code below.", None, parsed("Fix the [PROTECTED] code below."), key="k", seed=0)
    assert decided.decision == PROTECTED


def test_decide_ratio_is_checked_before_protected() -> None:
    long = "[protected] " + " ".join(["w"] * 40)
    assert decide_output("Fix the code.", None, parsed(long), key="k", seed=0).decision == LENGTH_RATIO
