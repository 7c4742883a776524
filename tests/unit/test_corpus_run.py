from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpo.corpus.formats import CorpusError, ResultWriter, completed_ids, read_corpus
from bpo.corpus.run import optimize_corpus
from bpo.models.catalogue import PromptStyle
from bpo.optimizer.optimizer import OptimizeParams, PromptOptimizer
from tests.unit.fakes import FakeEngine

pytestmark = pytest.mark.unit

LONG = "Explain every word of this: " + "lorem ipsum dolor sit amet " * 40

SCRIPT = {
    "Tell me about Paris.": "Tell me about Paris: its history, landmarks and food, for a first-time visitor.",
    "List uses of copper.": "List the main industrial and household uses of copper, with one example each.",
    "Give me 3 tips for a job interview.": "I'm sorry, I can't help with that.",
    "Write a haiku about rain.": "Write a haiku about rain that follows the 5-7-5 syllable pattern.",
}


def corpus_file(tmp_path: Path) -> Path:
    lines = [
        json.dumps({"id": "a", "prompt": "Tell me about Paris.", "category": "travel"}),
        json.dumps({"id": "b", "prompt": "List uses of copper."}),
        '{"id": "broken", "prompt": ',
        json.dumps({"id": "c", "prompt": "Give me 3 tips for a job interview."}),
        json.dumps({"id": "d", "prompt": LONG}),
        json.dumps({"id": "e", "prompt": "Write a haiku about rain."}),
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def test_optimize_corpus(tmp_path: Path) -> None:
    engine = FakeEngine(SCRIPT, context_length=200)
    optimizer = PromptOptimizer(engine, PromptStyle.BPO_TEMPLATE, OptimizeParams(seed=0))
    out = tmp_path / "out" / "results.jsonl"
    out.parent.mkdir()
    out.write_text(json.dumps({"id": "b", "line": 2, "optimized": "done earlier"}) + "\n", encoding="utf-8")
    reported: list[CorpusError] = []
    progress: list[int] = []
    with ResultWriter(out) as writer:
        summary = await optimize_corpus(
            optimizer,
            read_corpus(corpus_file(tmp_path)),
            writer,
            batch_size=2,
            already_done=completed_ids(out),
            on_error=reported.append,
            on_progress=progress.append,
        )

    assert (summary.done, summary.skipped, summary.failed, summary.fell_back) == (3, 1, 2, 1)
    assert sum(progress) == 6
    assert [e.line for e in reported] == [3, 5]
    assert reported[0].reason.startswith("invalid JSON")
    assert reported[1].reason.startswith("INVALID_ARGUMENT: prompt needs")
    assert summary.failures == reported
    # The already-done id is never sent; batches hold at most batch_size prompts.
    assert "List uses of copper." not in engine.prompts_seen
    assert all(len(batch) <= 2 for batch in engine.batches)

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"id": "b", "line": 2, "optimized": "done earlier"}
    written = {row["id"]: row for row in rows[1:]}
    assert list(written) == ["a", "c", "e"]
    assert written["a"]["line"] == 1
    assert written["a"]["category"] == "travel"
    assert written["a"]["optimized"] == SCRIPT["Tell me about Paris."]
    assert written["a"]["original"] == "Tell me about Paris."
    assert written["a"]["params"]["seed"] == 0
    assert "category" not in written["c"]
    assert written["c"]["optimized"] == "Give me 3 tips for a job interview."
    assert written["c"]["fallback_reason"] == "refusal"
    assert written["e"]["line"] == 6
    assert completed_ids(out) == {"a", "b", "c", "e"}


async def test_rerun_skips_everything_done(tmp_path: Path) -> None:
    corpus = corpus_file(tmp_path)
    out = tmp_path / "results.jsonl"
    for _ in range(2):
        engine = FakeEngine(SCRIPT, context_length=200)
        optimizer = PromptOptimizer(engine, PromptStyle.BPO_TEMPLATE)
        with ResultWriter(out) as writer:
            summary = await optimize_corpus(
                optimizer,
                read_corpus(corpus),
                writer,
                batch_size=8,
                already_done=completed_ids(out),
                on_error=lambda _: None,
            )
    assert (summary.done, summary.skipped, summary.failed) == (0, 4, 2)
    # Only the too-long record is retried, and it fails before reaching the engine.
    assert engine.batches == []
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4
