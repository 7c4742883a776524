"""What the optimizer model is shown.

Optimizers trained as the paper's are driven by its exact inference template (a packaged copy of the public
repository's text). Instruct models that never saw that template get the same request through their own
chat template: the template's instruction as the system turn, a worked example, then the prompt.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from bpo.engines.base import ChatMessage, GenerationRequest, SamplingParams
from bpo.models.catalogue import PromptStyle
from bpo.optimizer.spans import MARKER_RE


@cache
def reference_text(name: str) -> str:
    """A file from the paper's public repository, shipped inside the package (``bpo/resources``)."""
    return resources.files("bpo.resources").joinpath("bpo_prompts", name).read_text(encoding="utf-8")


def bpo_inference_template() -> str:
    return reference_text("optimizer_inference_template.txt")


def render_bpo_template(prompt: str) -> str:
    """The paper's ``prompt_template.format(text)``; ``format`` reads braces only in the template."""
    return bpo_inference_template().format(prompt)


CHAT_SYSTEM_INSTRUCTION = (
    "You are an expert prompt engineer. Please help me improve this prompt to get a more helpful and "
    "harmless response.\n"
    "Rewrite the user's prompt so that an AI assistant answers it better: clearer, more specific about what "
    "a good answer contains, and safe. Keep every fact, number, name and requirement of the original, its "
    "language and its intent. Do not answer the prompt. Reply with the improved prompt only."
)
PASSAGE_NOTE = (
    " A marker such as [PASSAGE 1] stands for text supplied with the prompt: keep each marker exactly as "
    "written and do not write the passage out."
)

# Written for this project (not taken from any dataset). The request is framed as a rewriting task in the user
# turn: a bare prompt as the user turn makes small instruct models answer it instead of rewriting it.
PLAIN_EXAMPLE = (
    "Give me some tips for a job interview.",
    "Give me practical tips for preparing for and succeeding in a job interview, covering research on the "
    "company, common questions and how to answer them, and how to follow up afterwards.",
)
PASSAGE_EXAMPLE = (
    "fix this function [PASSAGE 1]",
    "Find and fix the bugs in the following function, explain what was wrong, and show the corrected code: [PASSAGE 1]",
)
CHAT_EXAMPLES = (PLAIN_EXAMPLE, PASSAGE_EXAMPLE)


def chat_user_turn(prompt: str) -> str:
    return f"Original prompt: {prompt}\nRewrite it as a better prompt. Do not answer it."


def chat_assistant_turn(improved: str) -> str:
    return f"Improved prompt: {improved}"


def optimizer_request(prompt: str, style: PromptStyle, params: SamplingParams) -> GenerationRequest:
    if style == PromptStyle.BPO_TEMPLATE:
        return GenerationRequest(prompt=render_bpo_template(prompt), params=params)
    has_passages = MARKER_RE.search(prompt) is not None
    system = CHAT_SYSTEM_INSTRUCTION + (PASSAGE_NOTE if has_passages else "")
    # The passage example is shown only when it applies: otherwise small models copy its marker.
    examples = CHAT_EXAMPLES if has_passages else (PLAIN_EXAMPLE,)
    messages: list[ChatMessage] = [ChatMessage("system", system)]
    for original, improved in examples:
        messages.append(ChatMessage("user", chat_user_turn(original)))
        messages.append(ChatMessage("assistant", chat_assistant_turn(improved)))
    messages.append(ChatMessage("user", chat_user_turn(prompt)))
    return GenerationRequest(messages=tuple(messages), params=params)
