"""Generate stage: rewrites topic -> target model answers original and optimized -> Postgres -> answers topic."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from google.protobuf.message import Message

from bpo.engines.registry import EndpointKey, EngineRegistry
from bpo.generation.answers import AnswerGenerator, AnswerInput, AnswerPairResult
from bpo.messages import from_json, to_json
from bpo.pipeline.stage import Stage, StageContext, Work
from bpo.v1 import bpo_pb2 as pb


def answer_pair(rewrite: pb.Rewrite, result: AnswerPairResult, target_model: str) -> pb.AnswerPair:
    return pb.AnswerPair(
        rewrite=rewrite,
        original_answer=result.original_answer,
        optimized_answer=result.optimized_answer,
        target_model=target_model,
        tokens_in=result.tokens_in,
        tokens_out=result.tokens_out,
        latency_s=result.latency_s,
    )


class GenerateStage(Stage[pb.Rewrite]):
    name = "generate"
    message_type = pb.Rewrite

    def __init__(self, ctx: StageContext, engines: EngineRegistry) -> None:
        super().__init__(ctx)
        self._engines = engines

    def item_of(self, payload: pb.Rewrite) -> pb.PromptItem:
        return payload.item

    def stored_output(self, row: dict[str, object], payload: pb.Rewrite) -> Message | None:
        stored = row.get("answers")
        if not isinstance(stored, dict):
            return None
        return from_json(stored, pb.AnswerPair)

    async def process(self, work: Sequence[Work[pb.Rewrite]]) -> list[tuple[Work[pb.Rewrite], Exception]]:
        groups: dict[tuple[EndpointKey, int], list[Work[pb.Rewrite]]] = {}
        for w in work:
            groups.setdefault((w.job.target, w.job.target_max_new_tokens), []).append(w)
        for (target, max_new_tokens), members in groups.items():
            engine = await self._engines.get(target)
            generator = AnswerGenerator(engine, max_new_tokens=max_new_tokens)
            inputs = [
                AnswerInput(w.payload.item.prompt, w.payload.optimized, w.payload.item.context or None) for w in members
            ]
            results = await generator.answer_pairs(inputs)
            for w, result in zip(members, results, strict=True):
                pair = answer_pair(w.payload, result, engine.identity.name)
                self.ctx.metrics.tokens.labels("target", "in").inc(pair.tokens_in)
                self.ctx.metrics.tokens.labels("target", "out").inc(pair.tokens_out)
                await asyncio.to_thread(self._store_and_forward, w, pair)
        return []

    def _store_and_forward(self, w: Work[pb.Rewrite], pair: pb.AnswerPair) -> None:
        self.write_once_and_forward(
            w,
            pair,
            lambda: self.ctx.store.record_answers(
                w.item_id,
                to_json(pair),
                tokens_in=pair.tokens_in,
                tokens_out=pair.tokens_out,
                final=w.job.is_last(self.name),
            ),
        )
