"""Judge stage: answers topic -> pairwise verdict in both orders -> Postgres -> verdicts topic."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from google.protobuf.message import Message

from bpo.engines.registry import EndpointKey, EngineRegistry
from bpo.judging.pairwise import JudgeInput, JudgeTemplate, PairVerdict, PairwiseJudge
from bpo.messages import WINNER_NAMES, WINNER_VALUES, from_json, to_json
from bpo.pipeline.stage import Stage, StageContext, Work
from bpo.v1 import bpo_pb2 as pb


def question_of(item: pb.PromptItem) -> str:
    """The judge sees what the user asked: the original prompt with its context, in the paper's layout."""
    return f"{item.prompt}\n{item.context}" if item.context else item.prompt


def verdict_message(
    answers: pb.AnswerPair, verdict: PairVerdict, judge_model: str, judge_template: JudgeTemplate
) -> pb.Verdict:
    judgements = [
        pb.Judgement(
            optimized_first=j.optimized_first,
            verdict=j.verdict,
            winner=WINNER_VALUES.get(j.winner, pb.WINNER_UNSPECIFIED),
            reasoning=j.reasoning,
        )
        for j in verdict.judgements
    ]
    return pb.Verdict(
        answers=answers,
        winner=WINNER_VALUES[verdict.winner],
        judgements=judgements,
        judge_model=judge_model,
        tokens_in=verdict.tokens_in,
        tokens_out=verdict.tokens_out,
        position_consistent=verdict.position_consistent,
        identical_answers=verdict.identical_answers,
        judge_template=judge_template,
    )


class JudgeStage(Stage[pb.AnswerPair]):
    name = "judge"
    message_type = pb.AnswerPair

    def __init__(self, ctx: StageContext, engines: EngineRegistry) -> None:
        super().__init__(ctx)
        self._engines = engines

    def item_of(self, payload: pb.AnswerPair) -> pb.PromptItem:
        return payload.rewrite.item

    def stored_output(self, row: dict[str, object], payload: pb.AnswerPair) -> Message | None:
        stored = row.get("verdict")
        if not isinstance(stored, dict):
            return None
        return from_json(stored, pb.Verdict)

    async def process(self, work: Sequence[Work[pb.AnswerPair]]) -> list[tuple[Work[pb.AnswerPair], Exception]]:
        groups: dict[tuple[EndpointKey, int, JudgeTemplate], list[Work[pb.AnswerPair]]] = {}
        for w in work:
            groups.setdefault((w.job.judge, w.job.judge_max_new_tokens, w.job.judge_template), []).append(w)
        for (judge_key, max_new_tokens, template), members in groups.items():
            engine = await self._engines.get(judge_key)
            judge = PairwiseJudge(engine, template, max_new_tokens=max_new_tokens)
            inputs = [
                JudgeInput(question_of(w.payload.rewrite.item), w.payload.original_answer, w.payload.optimized_answer)
                for w in members
            ]
            verdicts = await judge.judge_batch(inputs)
            for w, verdict in zip(members, verdicts, strict=True):
                message = verdict_message(w.payload, verdict, engine.identity.name, template)
                self.ctx.metrics.tokens.labels("judge", "in").inc(message.tokens_in)
                self.ctx.metrics.tokens.labels("judge", "out").inc(message.tokens_out)
                await asyncio.to_thread(self._store_and_forward, w, message)
        return []

    def _store_and_forward(self, w: Work[pb.AnswerPair], verdict: pb.Verdict) -> None:
        winner = WINNER_NAMES.get(verdict.winner, "tie")
        self.write_once_and_forward(
            w,
            verdict,
            lambda: self.ctx.store.record_verdict(
                w.item_id, to_json(verdict), winner=winner, tokens_in=verdict.tokens_in, tokens_out=verdict.tokens_out
            ),
        )
