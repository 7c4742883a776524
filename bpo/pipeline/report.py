"""A job's report from what Postgres holds: counts, win / tie / lose, ΔWR per category, tokens, failures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bpo.endpoints import EndpointConfig
from bpo.messages import STAGE_VALUES
from bpo.v1 import bpo_pb2 as pb


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def build_report(job: pb.Job, rows: dict[str, Any], prices: Mapping[str, EndpointConfig] | None = None) -> pb.JobReport:
    """``prices``: the declared endpoint of each role (rewrite, target, judge), whose prices cost the tokens."""
    totals = rows["totals"]
    judged = int(totals["judged"])
    wins, ties, losses = int(totals["wins"]), int(totals["ties"]), int(totals["losses"])
    identical = int(totals["identical_answers"])
    report = pb.JobReport(
        job=job,
        items=int(totals["items"]),
        rewritten=int(totals["rewritten"]),
        kept_original=int(totals["kept_original"]),
        cache_hits=int(totals["cache_hits"]),
        judged=judged,
        wins=wins,
        ties=ties,
        losses=losses,
        win_rate=_rate(wins, judged),
        tie_rate=_rate(ties, judged),
        lose_rate=_rate(losses, judged),
        delta_wr=_rate(wins - losses, judged),
        # Identical answers tie without a judge call: they say nothing about the judge's position bias.
        position_consistency=_rate(int(totals["consistent"]), judged - identical),
        identical_answers=identical,
        failed=int(rows["failed"]),
        rejected=int(rows["rejected"]),
    )
    for row in rows["categories"]:
        cat_judged = int(row["judged"])
        report.categories.append(
            pb.CategoryResult(
                category=row["category"],
                judged=cat_judged,
                wins=int(row["wins"]),
                ties=int(row["ties"]),
                losses=int(row["losses"]),
                delta_wr=_rate(int(row["wins"]) - int(row["losses"]), cat_judged),
            )
        )
    for role in ("rewrite", "target", "judge"):
        tokens_in, tokens_out = int(totals[f"{role}_in"]), int(totals[f"{role}_out"])
        endpoint = (prices or {}).get(role)
        cost = endpoint.cost_usd(tokens_in, tokens_out) if endpoint is not None else 0.0
        report.tokens.append(pb.TokenUsage(role=role, tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=cost))
    for reason in rows["failure_reasons"]:
        report.failure_reasons.append(
            pb.FailureReason(
                stage=STAGE_VALUES.get(reason["stage"] or "", pb.STAGE_UNSPECIFIED),
                reason=reason["reason"] or "",
                count=int(reason["count"]),
                sample_lines=[int(line) for line in reason["lines"]],
            )
        )
    for failure in rows["failures"]:
        report.failures.append(
            pb.ItemFailure(
                item_id=failure["item_id"],
                source_id=failure["source_id"],
                line=int(failure["line"]),
                stage=STAGE_VALUES.get(failure["stage"] or "", pb.STAGE_UNSPECIFIED),
                reason=failure["reason"] or "",
            )
        )
    return report
