"""Generate stage: rewrites topic -> target model answers original and optimized -> Postgres -> answers topic."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from google.protobuf.message import Message

from bpo.engines.registry import EngineRegistry
from bpo.generation.answers import AnswerGenerator, AnswerInput, AnswerPairResult
from bpo.messages import from_json, to_json
from bpo.pipeline.jobspec import ResolvedJob
from bpo.pipeline.stage import Done, Outcome, Stage, StageContext, Work, outcome_of
from bpo.store.repository import StageWrite
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
    role = "target"

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

    def endpoint_of(self, job: ResolvedJob) -> str:
        return job.target

    def group_key(self, work: Work[pb.Rewrite]) -> Hashable:
        return (work.job.target, work.job.target_max_new_tokens)

    async def run_group(self, members: Sequence[Work[pb.Rewrite]]) -> list[Outcome]:
        job = members[0].job
        engine = await self._engines.get(job.target)
        generator = AnswerGenerator(engine, max_new_tokens=job.target_max_new_tokens)
        inputs = [
            AnswerInput(w.payload.item.prompt, w.payload.optimized, w.payload.item.context or None) for w in members
        ]
        outcomes: list[Outcome] = []
        for w, result in zip(members, await generator.answer_each(inputs), strict=True):
            if isinstance(result, Exception):
                outcomes.append(outcome_of(result))
                continue
            pair = answer_pair(w.payload, result, engine.identity.name)
            self.ctx.metrics.tokens.labels("target", "in").inc(pair.tokens_in)
            self.ctx.metrics.tokens.labels("target", "out").inc(pair.tokens_out)
            write = StageWrite(w.item_id, to_json(pair), pair.tokens_in, pair.tokens_out, w.job.is_last(self.name))
            outcomes.append(Done(pair, write))
        return outcomes
