"""Data augmentation (the paper's Section 5): an instruction dataset with answers to the optimized instructions.

The paper optimized Alpaca's instructions with BPO, regenerated the answers, and fine-tuned on the result.
Each output line keeps the dataset's own instruction and input, so the file trains like the original, with
the answer to the optimized instruction as ``output``; the optimized instruction and the answer to the
original one ride along for inspection and for training on either.
"""

from __future__ import annotations

from typing import Any


def alpaca_record(item: dict[str, Any]) -> dict[str, Any] | None:
    """An exported job item (rewrite and generate stages done) as an Alpaca record; ``None`` when it failed."""
    answers = item.get("answers")
    if not isinstance(answers, dict) or item.get("status") == "failed":
        return None
    rewrite = item.get("rewrite") or {}
    record: dict[str, Any] = {
        "instruction": item["prompt"],
        "input": item.get("context") or "",
        "output": answers.get("optimized_answer", ""),
        "optimized_instruction": rewrite.get("optimized", item["prompt"]),
        "original_output": answers.get("original_answer", ""),
        "source_id": item.get("source_id", ""),
    }
    if rewrite.get("fallback_reason"):
        # The optimizer kept the instruction as it was; the output answers the original instruction.
        record["fallback_reason"] = rewrite["fallback_reason"]
    return record
