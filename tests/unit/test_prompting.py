from __future__ import annotations

from pathlib import Path

import pytest

import bpo
from bpo.engines.base import SamplingParams
from bpo.models.catalogue import PromptStyle
from bpo.optimizer.prompting import (
    CHAT_EXAMPLES,
    CHAT_SYSTEM_INSTRUCTION,
    chat_assistant_turn,
    chat_user_turn,
    optimizer_request,
    render_bpo_template,
)

pytestmark = pytest.mark.unit

TEMPLATE_FILE = Path(bpo.__file__).parent / "resources" / "bpo_prompts" / "optimizer_inference_template.txt"
PAPER_TEMPLATE = (
    "[INST] You are an expert prompt engineer. Please help me improve this prompt to get a more helpful and "
    "harmless response:\n{} [/INST]"
)


def test_packaged_template_is_the_papers() -> None:
    assert TEMPLATE_FILE.read_text(encoding="utf-8") == PAPER_TEMPLATE


@pytest.mark.parametrize(
    "prompt",
    [
        "Tell me about Paris.",
        "Format {x} and {} and {0} and {name!r} and }{ as literal braces.",
        "multi\nline\n\tprompt with ünïcødé ✓  ",
        "",
    ],
)
def test_bpo_template_renders_as_the_papers_format(prompt: str) -> None:
    rendered = render_bpo_template(prompt)
    assert rendered == TEMPLATE_FILE.read_text(encoding="utf-8").format(prompt)
    assert rendered == PAPER_TEMPLATE.replace("{}", prompt)


def test_bpo_style_request_is_a_raw_prompt() -> None:
    params = SamplingParams(temperature=0.3, top_p=0.8, max_tokens=77, seed=5)
    request = optimizer_request("Give me {braces}", PromptStyle.BPO_TEMPLATE, params)
    assert request.messages is None
    assert request.prompt == PAPER_TEMPLATE.replace("{}", "Give me {braces}")
    assert request.params == params


def test_chat_style_request_with_a_passage_has_system_two_examples_and_user() -> None:
    params = SamplingParams(max_tokens=12)
    prompt = "Summarize [PASSAGE 1] {x}"
    request = optimizer_request(prompt, PromptStyle.CHAT_INSTRUCTION, params)
    assert request.prompt is None
    assert request.messages is not None
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert request.messages[0].content.startswith(CHAT_SYSTEM_INSTRUCTION)
    assert "[PASSAGE 1]" in request.messages[0].content
    assert len(CHAT_EXAMPLES) == 2
    assert [m.content for m in request.messages[1:5]] == [
        turn
        for original, improved in CHAT_EXAMPLES
        for turn in (chat_user_turn(original), chat_assistant_turn(improved))
    ]
    assert request.messages[-1].content == chat_user_turn(prompt)
    assert request.params == params


def test_chat_style_request_without_passages_leaves_out_the_passage_example() -> None:
    request = optimizer_request("Tell me about {Paris}.", PromptStyle.CHAT_INSTRUCTION, SamplingParams())
    assert request.messages is not None
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.messages[0].content == CHAT_SYSTEM_INSTRUCTION
    assert all("[PASSAGE" not in m.content for m in request.messages)
    assert request.messages[-1].content == chat_user_turn("Tell me about {Paris}.")
    assert "Tell me about {Paris}." in request.messages[-1].content


def test_passage_example_keeps_its_marker() -> None:
    assert any("[PASSAGE 1]" in original and "[PASSAGE 1]" in improved for original, improved in CHAT_EXAMPLES)
