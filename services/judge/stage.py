"""Judge stage: answers topic -> pairwise verdict in both orders -> Postgres -> verdicts topic."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from google.protobuf.message import Message

from bpo.engines.registry import EngineRegistry
from bpo.judging.pairwise import JudgeInput, JudgeTemplate, PairVerdict, PairwiseJudge
from bpo.messages import WINNER_NAMES, WINNER_VALUES, from_json, to_json
from bpo.metrics import WINNERS
from bpo.pipeline.jobspec import ResolvedJob
from bpo.pipeline.stage import Done, Outcome, Stage, StageContext, Work, outcome_of
from bpo.store.repository import StageWrite
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
    role = "judge"

    def __init__(self, ctx: StageContext, engines: EngineRegistry) -> None:
        super().__init__(ctx)
        self._engines = engines
        for winner in WINNERS:
            for consistent in ("true", "false"):
                ctx.metrics.judged_items.labels(winner, consistent)

    def item_of(self, payload: pb.AnswerPair) -> pb.PromptItem:
        return payload.rewrite.item

    def stored_output(self, row: dict[str, object], payload: pb.AnswerPair) -> Message | None:
        stored = row.get("verdict")
        if not isinstance(stored, dict):
            return None
        return from_json(stored, pb.Verdict)

    def endpoint_of(self, job: ResolvedJob) -> str:
        return job.judge

    def on_written(self, written: Sequence[tuple[Work[pb.AnswerPair], Done]]) -> None:
        for _, done in written:
            verdict = done.output
            assert isinstance(verdict, pb.Verdict)
            winner = WINNER_NAMES.get(verdict.winner, "tie")
            self.ctx.metrics.judged_items.labels(winner, str(verdict.position_consistent).lower()).inc()

    def group_key(self, work: Work[pb.AnswerPair]) -> Hashable:
        return (work.job.judge, work.job.judge_max_new_tokens, work.job.judge_template)

    async def run_group(self, members: Sequence[Work[pb.AnswerPair]]) -> list[Outcome]:
        job = members[0].job
        engine = await self._engines.get(job.judge)
        judge = PairwiseJudge(engine, job.judge_template, max_new_tokens=job.judge_max_new_tokens)
        inputs = [
            JudgeInput(question_of(w.payload.rewrite.item), w.payload.original_answer, w.payload.optimized_answer)
            for w in members
        ]
        outcomes: list[Outcome] = []
        for w, verdict in zip(members, await judge.judge_each(inputs), strict=True):
            if isinstance(verdict, Exception):
                outcomes.append(outcome_of(verdict))
                continue
            message = verdict_message(w.payload, verdict, engine.identity.name, job.judge_template)
            self.ctx.metrics.tokens.labels("judge", "in").inc(message.tokens_in)
            self.ctx.metrics.tokens.labels("judge", "out").inc(message.tokens_out)
            winner = WINNER_NAMES.get(message.winner, "tie")
            write = StageWrite(
                w.item_id, to_json(message), message.tokens_in, message.tokens_out, True, {"winner": winner}
            )
            outcomes.append(Done(message, write))
        return outcomes
