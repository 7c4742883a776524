"""Formulas, negated constraints and named things: read from the original, held against the rewrite."""

from __future__ import annotations

import pytest

from bpo.corpus.formats import CorpusRecord, builtin_dataset_path, read_corpus
from bpo.optimizer.facts import (
    MAX_CHECKED,
    Entity,
    dropped_constraints,
    entities,
    formulas,
    missing_entities,
    missing_formulas,
    negated_constraints,
)
from bpo.optimizer.guards import FallbackReason, check_rewrite
from bpo.optimizer.spans import segment

pytestmark = pytest.mark.unit


def check(original: str, rewrite: str) -> FallbackReason | None:
    return check_rewrite(original, rewrite, truncated=False)


# -- formulas ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Integrate x^2 * sin(x) dx", ["x^2*sin(x)"]),
        ("Solve 3x + 5 = 20 for x.", ["3x+5=20"]),
        ("Expand (a + b)^2 = a^2 + 2ab + b^2 please", ["(a+b)^2=a^2+2ab+b^2"]),
        ("Find the derivative of 3x^2 + 2x - 5.", ["3x^2+2x-5"]),
        ("Is a < b when a = 2?", ["a<b", "a=2"]),
        ("Simplify \\frac{1}{2} + x²", ["\\frac{1}{2}+x²"]),
        ("Calcula la integral de x^2 * ln(x)", ["x^2*ln(x)"]),
        ("计算 x^2 + 3x 的导数", ["x^2+3x"]),
        ("Use C++ for 1/3 of it", ["C++", "1/3"]),
    ],
)
def test_formulas_are_read_without_their_spacing(text: str, expected: list[str]) -> None:
    assert formulas(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Write **bold** text and offer and/or choices",
        "I have 3 apples - give me 2",
        "A well-known e-mail trick",
        "Plan a trip to Lisbon",
    ],
)
def test_prose_holds_no_formula(text: str) -> None:
    assert formulas(text) == []


def test_a_rewrite_may_respace_a_formula_but_not_change_it() -> None:
    original = "Integrate x^2 * sin(x) dx"
    assert missing_formulas(original, "Compute the integral of x^2*sin(x) with respect to x, step by step.") == []
    assert missing_formulas(original, "Compute the integral of `x^2 * sin(x)` dx.") == []
    # The issue's failure: the product of two functions became a power.
    assert missing_formulas(original, "Compute the integral of x^3 with respect to x.") == ["x^2*sin(x)"]
    assert check(original, "Compute the integral of x^3 with respect to x, showing each step.") is (
        FallbackReason.FORMULA_ALTERED
    )
    assert check(original, "Compute the indefinite integral of x^2 * sin(x) dx, showing each step.") is None


# -- negated constraints -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Plan a 3-day trip to Lisbon without a car.", ["without car"]),
        ("Write a recipe with no dairy and avoid nuts, except almonds.", ["no dairy", "avoid nut", "except almond"]),
        ("Don't mention the price. Do not use jargon.", ["don't price", "not jargon"]),
        ("Never use the passive voice", ["never passive voice"]),
        ("Give me a sugar-free, non-alcoholic drink recipe", ["sugar-free sugar", "non-alcoholic alcoholic"]),
        ("List fruits other than bananas", ["than banana"]),
        ("Escribe un plan de viaje sin coche y no incluyas museos.", ["sin coche", "no museo"]),
        ("Schreibe ein Rezept ohne Zucker", ["ohne zucker"]),
        ("帮我规划一个不开车的三天旅行，不要辣的食物", ["不 开车", "不要 辣"]),
    ],
)
def test_negated_constraints_are_read(text: str, expected: list[str]) -> None:
    assert [str(constraint) for constraint in negated_constraints(text)] == expected


@pytest.mark.parametrize(
    "text",
    [
        "Not only cats but also dogs",
        "No matter what, reply kindly",
        "这两种方法有什么不同",
        "非常好的问题，我们不断学习",
    ],
)
def test_idioms_are_not_constraints(text: str) -> None:
    assert negated_constraints(text) == []


@pytest.mark.parametrize(
    ("original", "kept", "lost"),
    [
        (
            "Plan a 3-day trip to Lisbon without a car.",
            "Create a 3-day Lisbon itinerary that does not require a car, using public transport.",
            "Create a detailed 3-day Lisbon itinerary with day trips by rental car.",
        ),
        (
            "Write a recipe with no dairy.",
            "Write a dairy-free dinner recipe with a list of ingredients and steps.",
            "Write a creamy dinner recipe with cheese and butter.",
        ),
        (
            "Escribe un plan de viaje sin coche.",
            "Escribe un plan de viaje detallado de tres días sin coche, usando transporte público.",
            "Escribe un plan de viaje detallado de tres días en coche.",
        ),
        (
            "帮我规划一个不开车的三天旅行",
            "请为我制定一个三天的旅行计划，全程不需要开车，使用公共交通。",
            "请为我制定一个三天的自驾旅行计划，包括路线和住宿。",
        ),
    ],
)
def test_a_rewrite_must_keep_each_constraint_negated(original: str, kept: str, lost: str) -> None:
    assert dropped_constraints(original, kept) == []
    assert dropped_constraints(original, lost) != []
    assert check(original, lost) is FallbackReason.DROPPED_CONSTRAINT


def test_a_constraint_moved_out_of_its_negation_is_dropped() -> None:
    original = "Suggest a weekend plan without a car."
    assert dropped_constraints(original, "Suggest a weekend plan by car, without stress.") != []


# -- named things ------------------------------------------------------------------------------------------


def test_entities_of_every_kind() -> None:
    text = (
        "Explain kubernetes to a new engineer at Acme Corp in New York City using Node.js, GPT-4, my_var, "
        "getUserName and C++; mail bob@example.com. Is Paris bigger than London?"
    )
    assert entities(text) == [
        Entity("kubernetes", exact=False),
        Entity("Acme Corp", exact=False),
        Entity("New York City", exact=False),
        Entity("Node.js", exact=True),
        Entity("GPT-4", exact=True),
        Entity("my_var", exact=True),
        Entity("getUserName", exact=True),
        Entity("C++", exact=True),
        Entity("bob@example.com", exact=True),
        Entity("Paris", exact=False),
        Entity("London", exact=False),
    ]


@pytest.mark.parametrize(
    "text",
    ["Write a poem about the sea.", "Tell Me About It", "I think e.g. this is fine", "WHAT IS THIS"],
)
def test_sentence_starts_and_plain_words_are_not_entities(text: str) -> None:
    assert entities(text) == []


def test_the_issues_kubernetes_case() -> None:
    # Through the openai engine, SmolLM2 turned "explain kubernetes" into this.
    assert missing_entities("explain kubernetes", "Explain kube-cocos-2038") == [Entity("kubernetes", exact=False)]
    assert check("explain kubernetes", "Explain kube-cocos-2038") is FallbackReason.DROPPED_ENTITY
    assert check("explain kubernetes", "Explain how Kubernetes schedules and scales containers.") is None


def test_identifiers_are_kept_byte_for_byte_and_names_in_any_case() -> None:
    original = "Why does getUserName fail in new york?"
    assert missing_entities(original, "Explain why getUserName fails in New York.") == []
    assert missing_entities(original, "Explain why get_user_name fails in New York.") == [
        Entity("getUserName", exact=True)
    ]


def test_only_the_first_facts_are_checked() -> None:
    many = " ".join(f"item_{number}" for number in range(MAX_CHECKED + 10))
    assert len(entities(many)) == MAX_CHECKED
    assert len(missing_entities(many, "")) == MAX_CHECKED


# -- a prompt kept as written ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "rewrite"),
    [
        # Punctuation inside a formula's run ("--:" in a Markdown table) once made it unfindable in its own text.
        ("Fill in the table:\n| Normal | Silly |\n| --: | :-- |\n| hello | henlo |", None),
        # Brackets around a name's last word ("Marg (Allahabad)") once made it unfindable in its own text.
        ("What is the Mahatma Gandhi Marg (Allahabad)?", "Describe the Mahatma Gandhi Marg in Allahabad."),
        ("Is St. Louis bigger than Kansas City?", "Compare the size of St. Louis and Kansas City."),
    ],
)
def test_facts_read_with_punctuation_are_found_in_their_own_text(original: str, rewrite: str | None) -> None:
    for candidate in (original, rewrite or original):
        assert missing_formulas(original, candidate) == []
        assert missing_entities(original, candidate) == []
    assert missing_entities(original, "Describe the road.") != []


@pytest.mark.parametrize("name", ["vicuna", "dolly", "self-instruct", "bpo-test"])
def test_no_shipped_prompt_loses_a_fact_to_itself(name: str) -> None:
    """A rewrite identical to the instruction keeps every fact the guards read from it: a guard that rejects
    that reads facts in a way it cannot find again."""
    records = [record for record in read_corpus(builtin_dataset_path(name)) if isinstance(record, CorpusRecord)]
    assert records
    for record in records:
        instruction = segment(record.prompt, record.context).instruction
        assert missing_formulas(instruction, instruction) == [], record.prompt
        assert missing_entities(instruction, instruction) == [], record.prompt
        assert dropped_constraints(instruction, instruction) == [], record.prompt
