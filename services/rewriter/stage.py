"""Rewrite stage: prompts topic -> optimizer workers (behind the rewrite cache) -> Postgres -> rewrites topic."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence

from google.protobuf.message import Message

from bpo.errors import error_for_status
from bpo.messages import from_json, to_json
from bpo.pipeline.jobspec import ResolvedJob
from bpo.pipeline.optimizer_models import OptimizerModels
from bpo.pipeline.rewriting import CachedRewriter
from bpo.pipeline.stage import Done, Outcome, Stage, StageContext, Work, outcome_of
from bpo.store.repository import StageWrite
from bpo.v1 import bpo_pb2 as pb


class RewriteStage(Stage[pb.PromptItem]):
    name = "rewrite"
    message_type = pb.PromptItem
    role = "optimizer"

    def __init__(self, ctx: StageContext, rewriter: CachedRewriter, models: OptimizerModels) -> None:
        super().__init__(ctx)
        self._rewriter = rewriter
        self._models = models

    def item_of(self, payload: pb.PromptItem) -> pb.PromptItem:
        return payload

    def stored_output(self, row: dict[str, object], payload: pb.PromptItem) -> Message | None:
        stored = row.get("rewrite")
        if not isinstance(stored, dict):
            return None
        return from_json(stored, pb.Rewrite)

    def endpoint_of(self, job: ResolvedJob) -> str:
        return job.optimizer_model

    def group_key(self, work: Work[pb.PromptItem]) -> Hashable:
        return (work.job.optimizer_model, work.job.params)

    async def run_group(self, members: Sequence[Work[pb.PromptItem]]) -> list[Outcome]:
        job = members[0].job
        # A name the workers do not serve fails the items (a job admitted earlier may name a model since
        # withdrawn); a served one with no live worker right now parks them, instead of queueing a task nobody
        # takes and waiting out its timeout.
        model = await asyncio.to_thread(self._models.resolve, job.optimizer_model)
        await asyncio.to_thread(self._models.require_live, model)
        outcomes: list[Outcome] = []
        for w, outcome in zip(
            members, await self._rewriter.rewrite([w.payload for w in members], model, job.params), strict=True
        ):
            if outcome.failure is not None:
                outcomes.append(outcome_of(error_for_status(outcome.failure.status_code, outcome.failure.error)))
                continue
            rewrite = outcome.rewrite
            assert rewrite is not None
            extra = {"cache_hit": rewrite.cache_hit, "fallback_reason": rewrite.fallback_reason or None}
            final = w.job.is_last(self.name)
            write = StageWrite(w.item_id, to_json(rewrite), rewrite.tokens_in, rewrite.tokens_out, final, extra)
            outcomes.append(Done(rewrite, write))
        return outcomes
