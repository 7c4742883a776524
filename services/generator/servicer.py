"""GeneratorService: the target model answers the original and the optimized prompt of one rewrite."""

from __future__ import annotations

import asyncio

from bpo.auth import current_caller
from bpo.engines.registry import EngineRegistry
from bpo.errors import InvalidPromptError
from bpo.generation.answers import AnswerGenerator, AnswerInput
from bpo.grpc_server import ServicerContext
from bpo.pipeline.admission import check_endpoint, item_problem
from bpo.pipeline.jobspec import DEFAULT_ANSWER_TOKENS, endpoint_name
from bpo.pipeline.quotas import QuotaGuard
from bpo.settings import PlatformSettings
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from services.generator.stage import answer_pair


class GeneratorServicer(pb_grpc.GeneratorServiceServicer):
    def __init__(self, engines: EngineRegistry, platform: PlatformSettings, quotas: QuotaGuard) -> None:
        self._engines = engines
        self._platform = platform
        self._quotas = quotas

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: ServicerContext
    ) -> pb.GenerateResponse:
        caller = current_caller()
        rewrite = request.rewrite
        problem = item_problem(rewrite.item.prompt, rewrite.item.context, self._platform.max_item_bytes)
        if problem is not None:
            raise InvalidPromptError(f"rewrite.item: {problem}")
        if len(rewrite.optimized.encode()) > 2 * self._platform.max_item_bytes:
            raise InvalidPromptError("rewrite.optimized is larger than the platform accepts")
        check_endpoint(request.target, "target")
        name = endpoint_name(request.target, self._platform.target_model)
        self._engines.endpoints.get(name, "target", caller.team)
        await asyncio.to_thread(self._quotas.check_tokens, caller, "target")
        engine = await self._engines.get(name)
        generator = AnswerGenerator(engine, max_new_tokens=request.target.max_new_tokens or DEFAULT_ANSWER_TOKENS)
        optimized = rewrite.optimized or rewrite.item.prompt
        (result,) = await generator.answer_pairs(
            [AnswerInput(rewrite.item.prompt, optimized, rewrite.item.context or None)]
        )
        await asyncio.to_thread(self._quotas.record, caller, "target", result.tokens_in, result.tokens_out)
        return pb.GenerateResponse(answers=answer_pair(rewrite, result, engine.identity.name))
