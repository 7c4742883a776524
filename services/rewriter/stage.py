"""Rewrite stage: prompts topic -> optimizer workers (behind the rewrite cache) -> Postgres -> rewrites topic."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from google.protobuf.message import Message

from bpo.errors import error_for_status
from bpo.messages import from_json, to_json
from bpo.pipeline.rewriting import CachedRewriter
from bpo.pipeline.stage import PermanentItemError, Stage, StageContext, Work
from bpo.v1 import bpo_pb2 as pb


class RewriteStage(Stage[pb.PromptItem]):
    name = "rewrite"
    message_type = pb.PromptItem

    def __init__(self, ctx: StageContext, rewriter: CachedRewriter) -> None:
        super().__init__(ctx)
        self._rewriter = rewriter

    def item_of(self, payload: pb.PromptItem) -> pb.PromptItem:
        return payload

    def stored_output(self, row: dict[str, object], payload: pb.PromptItem) -> Message | None:
        stored = row.get("rewrite")
        if not isinstance(stored, dict):
            return None
        return from_json(stored, pb.Rewrite)

    async def process(self, work: Sequence[Work[pb.PromptItem]]) -> list[tuple[Work[pb.PromptItem], Exception]]:
        failures: list[tuple[Work[pb.PromptItem], Exception]] = []
        groups: dict[tuple[str, object], list[Work[pb.PromptItem]]] = {}
        for w in work:
            groups.setdefault((w.job.optimizer_model, w.job.params), []).append(w)
        for (model, _), members in groups.items():
            params = members[0].job.params
            outcomes = await self._rewriter.rewrite([w.payload for w in members], model, params)
            for w, outcome in zip(members, outcomes, strict=True):
                if outcome.failure is not None:
                    error = error_for_status(outcome.failure.status_code, outcome.failure.error)
                    if outcome.failure.status_code == "INVALID_ARGUMENT":
                        error = PermanentItemError(outcome.failure.error)
                    failures.append((w, error))
                    continue
                rewrite = outcome.rewrite
                assert rewrite is not None
                await asyncio.to_thread(self._store_and_forward, w, rewrite)
        return failures

    def _store_and_forward(self, w: Work[pb.PromptItem], rewrite: pb.Rewrite) -> None:
        self.write_once_and_forward(
            w,
            rewrite,
            lambda: self.ctx.store.record_rewrite(
                w.item_id,
                to_json(rewrite),
                tokens_in=rewrite.tokens_in,
                tokens_out=rewrite.tokens_out,
                cache_hit=rewrite.cache_hit,
                fallback_reason=rewrite.fallback_reason or None,
                final=w.job.is_last(self.name),
            ),
        )
