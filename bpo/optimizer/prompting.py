"""What the optimizer model is shown.

Optimizers trained as the paper's are driven by its exact inference template (a packaged copy of the public
repository's text). Instruct models that never saw that template get the same request through their own
chat template: the template's instruction as the system turn, worked examples, then the prompt. The system
turn also carries what the guards hold a rewrite to (facts, exclusions, language, the paper's safety
enhancement), and notes for this prompt: its passage markers, its language when that is not English, and a
safety note when the prompt asks for something harmful (``bpo.optimizer.safety``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib import resources
from types import MappingProxyType

from bpo.engines.base import ChatMessage, GenerationRequest, SamplingParams
from bpo.models.catalogue import PromptStyle
from bpo.optimizer.language import LANGUAGE_NAMES, LanguageProfile, profile
from bpo.optimizer.safety import assess
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
    "a good answer contains, and safe. Keep every fact, number, name, formula and requirement of the original, "
    "and every exclusion it states (what to avoid, leave out or do without), its language and its intent. "
    "If the prompt asks for something harmful, illegal or hurtful, never make it more effective: turn it into a "
    "request for safe, legal and helpful information on the same subject. Do not answer the prompt. Reply with "
    "the improved prompt only."
)
PASSAGE_NOTE = (
    " A marker such as [PASSAGE 1] stands for text supplied with the prompt: keep each marker exactly as "
    "written and do not write the passage out."
)
LANGUAGE_NOTE = " The original prompt is in {language}: write the improved prompt in {language}."
SAFETY_NOTE = (
    " This prompt asks for something that could cause harm: rewrite it into a request for the safe, legal and "
    "helpful version of what it is about, and add nothing that would make the harmful request more effective."
)
ORIGINAL_LABEL = "Original prompt:"
IMPROVED_LABEL = "Improved prompt:"
REWRITE_REQUEST = "Rewrite it as a better prompt. Do not answer it."

# Written for this project (not taken from any dataset). The request is framed as a rewriting task in the user
# turn: a bare prompt as the user turn makes small instruct models answer it instead of rewriting it.
PLAIN_EXAMPLE = (
    "Give me some tips for a job interview.",
    "Give me practical tips for preparing for and succeeding in a job interview, covering research on the "
    "company, common questions and how to answer them, and how to follow up afterwards.",
)
# The same example in the languages the optimizer is told apart (``bpo.optimizer.language``): a small model
# follows the language of its example more than the instruction to keep the prompt's.
PLAIN_EXAMPLES_BY_LANGUAGE: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "es": (
            "Dame consejos para una entrevista de trabajo.",
            "Dame consejos prácticos para preparar y superar una entrevista de trabajo: cómo investigar la "
            "empresa, qué preguntas son habituales y cómo responderlas, y cómo hacer el seguimiento después.",
        ),
        "fr": (
            "Donne-moi des conseils pour un entretien d'embauche.",
            "Donne-moi des conseils pratiques pour préparer et réussir un entretien d'embauche : comment se "
            "renseigner sur l'entreprise, quelles questions sont fréquentes et comment y répondre, et comment "
            "assurer le suivi ensuite.",
        ),
        "de": (
            "Gib mir Tipps für ein Vorstellungsgespräch.",
            "Gib mir praktische Tipps, wie ich mich auf ein Vorstellungsgespräch vorbereite und es erfolgreich "
            "meistere: wie ich mich über das Unternehmen informiere, welche Fragen häufig gestellt werden und wie "
            "ich sie beantworte, und wie ich danach nachfasse.",
        ),
        "han": (
            "给我一些求职面试的建议。",
            "请给我一些准备和顺利通过求职面试的实用建议，包括如何了解公司、常见问题及回答方法，以及面试后如何跟进。",
        ),
        "japanese": (
            "就職面接のアドバイスをください。",
            "就職面接の準備と成功のための実践的なアドバイスをください。会社の調べ方、よくある質問とその答え方、"
            "面接後のフォローアップの方法を含めてください。",
        ),
        "cyrillic": (
            "Дай советы для собеседования на работу.",
            "Дай практические советы, как подготовиться к собеседованию на работу и успешно его пройти: как "
            "изучить компанию, какие вопросы задают чаще всего и как на них отвечать, и что делать после "
            "собеседования.",
        ),
    }
)
PASSAGE_EXAMPLE = (
    "fix this function [PASSAGE 1]",
    "Find and fix the bugs in the following function, explain what was wrong, and show the corrected code: [PASSAGE 1]",
)
# The paper's safety enhancement: the harmless, helpful version of an unsafe request.
SAFETY_EXAMPLE = (
    "How can I get into my neighbour's wifi without paying?",
    "My internet is too expensive. What are legal and affordable ways to get internet access at home, such as "
    "low-cost plans, public Wi-Fi, or asking my neighbour whether they would share their connection with "
    "permission?",
)
CHAT_EXAMPLES = (PLAIN_EXAMPLE, PASSAGE_EXAMPLE)


def chat_user_turn(prompt: str) -> str:
    return f"{ORIGINAL_LABEL} {prompt}\n{REWRITE_REQUEST}"


def chat_assistant_turn(improved: str) -> str:
    return f"{IMPROVED_LABEL} {improved}"


def _language_key(language: LanguageProfile) -> str:
    return language.language or "" if language.system == "latin" else language.system


def chat_system_turn(prompt: str) -> str:
    """The instruction, and the notes that apply to this prompt: its passages, its language, its safety."""
    language = profile(prompt)
    system = CHAT_SYSTEM_INSTRUCTION
    if MARKER_RE.search(prompt) is not None:
        system += PASSAGE_NOTE
    if language.name is not None and language.name != LANGUAGE_NAMES["en"]:
        system += LANGUAGE_NOTE.format(language=language.name)
    if assess(prompt).unsafe:
        system += SAFETY_NOTE
    return system


def chat_examples(prompt: str) -> tuple[tuple[str, str], ...]:
    """Worked examples for this prompt: the plain one in its language, and the passage and safety examples only
    where they apply (otherwise small models copy their marker, or refuse a harmless prompt)."""
    plain = PLAIN_EXAMPLES_BY_LANGUAGE.get(_language_key(profile(prompt)), PLAIN_EXAMPLE)
    examples = [plain]
    if MARKER_RE.search(prompt) is not None:
        examples.append(PASSAGE_EXAMPLE)
    if assess(prompt).unsafe:
        examples.append(SAFETY_EXAMPLE)
    return tuple(examples)


def optimizer_request(prompt: str, style: PromptStyle, params: SamplingParams) -> GenerationRequest:
    if style == PromptStyle.BPO_TEMPLATE:
        return GenerationRequest(prompt=render_bpo_template(prompt), params=params)
    messages: list[ChatMessage] = [ChatMessage("system", chat_system_turn(prompt))]
    for original, improved in chat_examples(prompt):
        messages.append(ChatMessage("user", chat_user_turn(original)))
        messages.append(ChatMessage("assistant", chat_assistant_turn(improved)))
    messages.append(ChatMessage("user", chat_user_turn(prompt)))
    return GenerationRequest(messages=tuple(messages), params=params)


def framing_texts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every text the optimizer is shown besides the user's prompt: its instructions, notes, labels and
    template, then its worked examples' improved prompts. A rewrite that repeats one of them leaked its framing
    (``bpo.optimizer.guards``). The examples' originals are left out: they are written like users' prompts
    ("fix this function [PASSAGE 1]"), so a faithful rewrite of a user's similar prompt may say the same; a
    model that echoes one is caught by its label or by the drift guard instead."""
    instructions = (
        CHAT_SYSTEM_INSTRUCTION,
        PASSAGE_NOTE,
        SAFETY_NOTE,
        *(LANGUAGE_NOTE.format(language=name) for name in LANGUAGE_NAMES.values()),
        ORIGINAL_LABEL,
        IMPROVED_LABEL,
        REWRITE_REQUEST,
        bpo_inference_template(),
    )
    examples = (PLAIN_EXAMPLE, *PLAIN_EXAMPLES_BY_LANGUAGE.values(), PASSAGE_EXAMPLE, SAFETY_EXAMPLE)
    return instructions, tuple(improved for _, improved in examples)
