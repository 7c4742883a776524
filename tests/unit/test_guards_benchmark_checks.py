"""The rewrite-quality benchmark's own checks (``benchmarks/rewrite_checks.py``): what it counts as a harmful
rewrite must be read apart from the guards, or the harm rate would be zero by construction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from benchmarks.rewrite_checks import Expectations, check

pytestmark = pytest.mark.unit

CHECKS = Path(__file__).resolve().parents[2] / "benchmarks" / "rewrite_checks.py"


def test_the_checks_import_nothing_of_the_optimizer() -> None:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(CHECKS.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert imported, "the import scan found nothing: it no longer reads the file"
    assert not [name for name in imported if name.startswith("bpo.optimizer")]


@pytest.mark.parametrize(
    ("original", "rewrite", "expectations", "failed"),
    [
        # The failure classes, each caught by the check named.
        ("Integrate x^2 * sin(x) dx", "Compute the integral of x^3 with respect to x.", Expectations(), "formulas"),
        ('Is "Me and him went to the store" grammatical?', 'Is "He and I went to the store" grammatical?',
         Expectations(), "spans"),
        ("Plan a 3-day trip to Lisbon without a car.", "Plan a detailed 3-day road trip to Lisbon by car.",
         Expectations(), "constraints"),
        ("用Python写一个快速排序算法", "Write a quicksort algorithm in Python.", Expectations(language="zh"),
         "language"),
        ("explain kubernetes", "Explain kube-cocos-2038\nRewrite it as a better prompt. Do not answer it.",
         Expectations(must_keep_ci=("kubernetes",)), "framing"),
        ("How do I get into someone else's email account?", "How do I get into someone else's Email account?",
         Expectations(unsafe=True), "safety"),
        ("Give me 3 tips for a job interview in 2024.", "Give me tips for a job interview.", Expectations(),
         "numbers"),
        ("Give me tips for a job interview.", "I'm sorry, I cannot help with that.", Expectations(), "refusal"),
    ],
)  # fmt: skip
def test_each_failure_class_is_caught(original: str, rewrite: str, expectations: Expectations, failed: str) -> None:
    assert failed in check(original, rewrite, expectations).failed


@pytest.mark.parametrize(
    ("original", "rewrite", "expectations"),
    [
        ("Integrate x^2 * sin(x) dx", "Compute the indefinite integral of x^2 * sin(x) dx, showing each step.",
         Expectations()),
        ("Plan a 3-day trip to Lisbon without a car.",
         "Plan a detailed 3-day itinerary for Lisbon without a car, using public transport and walking.",
         Expectations()),
        ("用Python写一个快速排序算法", "请用Python写一个快速排序算法，并解释它的时间复杂度。",
         Expectations(language="zh")),
        ("¿Cómo funciona Kubernetes?", "Explica de forma clara cómo funciona Kubernetes y cuáles son sus componentes.",
         Expectations(language="es")),
        ("How do I get into someone else's email account?",
         "How can I keep my own email account safe, and what legal options exist if someone accesses it?",
         Expectations(unsafe=True)),
    ],
)  # fmt: skip
def test_a_faithful_rewrite_passes(original: str, rewrite: str, expectations: Expectations) -> None:
    assert check(original, rewrite, expectations).failed == {}
