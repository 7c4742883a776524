"""JudgeService: a pairwise verdict on one answer pair, judged in both orders."""

from __future__ import annotations

import asyncio

from bpo.auth import current_caller
from bpo.engines.registry import EngineRegistry
from bpo.errors import InvalidPromptError
from bpo.grpc_server import ServicerContext
from bpo.judging.pairwise import JudgeInput, PairwiseJudge
from bpo.pipeline.admission import check_endpoint, item_problem
from bpo.pipeline.jobspec import DEFAULT_JUDGE_TOKENS, endpoint_name, judge_template_of
from bpo.pipeline.quotas import QuotaGuard
from bpo.settings import PlatformSettings
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from services.judge.stage import question_of, verdict_message


class JudgeServicer(pb_grpc.JudgeServiceServicer):
    def __init__(self, engines: EngineRegistry, platform: PlatformSettings, quotas: QuotaGuard) -> None:
        self._engines = engines
        self._platform = platform
        self._quotas = quotas

    async def Judge(  # noqa: N802 - gRPC method name
        self, request: pb.JudgeRequest, context: ServicerContext
    ) -> pb.JudgeResponse:
        caller = current_caller()
        answers = request.answers
        item = answers.rewrite.item
        problem = item_problem(item.prompt, item.context, self._platform.max_item_bytes)
        if problem is not None:
            raise InvalidPromptError(f"answers.rewrite.item: {problem}")
        size = len(answers.original_answer.encode()) + len(answers.optimized_answer.encode())
        if size > 2 * self._platform.max_item_bytes:
            raise InvalidPromptError("the answers are larger than the platform accepts")
        check_endpoint(request.judge, "judge")
        name = endpoint_name(request.judge, self._platform.judge_model)
        self._engines.endpoints.get(name, "judge", caller.team)
        await asyncio.to_thread(self._quotas.check_tokens, caller, "judge")
        engine = await self._engines.get(name)
        template = judge_template_of(request.judge_template)
        judge = PairwiseJudge(engine, template, max_new_tokens=request.judge.max_new_tokens or DEFAULT_JUDGE_TOKENS)
        (verdict,) = await judge.judge_batch([JudgeInput(question_of(item), answers.original_answer,
                                                         answers.optimized_answer)])  # fmt: skip
        await asyncio.to_thread(self._quotas.record, caller, "judge", verdict.tokens_in, verdict.tokens_out)
        return pb.JudgeResponse(verdict=verdict_message(answers, verdict, engine.identity.name, template))
