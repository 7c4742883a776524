"""GeneratorService: the target model answers the original and the optimized prompt of one rewrite."""

from __future__ import annotations

from bpo.engines.registry import EngineRegistry
from bpo.errors import InvalidPromptError
from bpo.generation.answers import AnswerGenerator, AnswerInput
from bpo.grpc_server import ServicerContext
from bpo.pipeline.jobspec import DEFAULT_ANSWER_TOKENS, endpoint_key
from bpo.settings import PlatformSettings
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from services.generator.stage import answer_pair


class GeneratorServicer(pb_grpc.GeneratorServiceServicer):
    def __init__(self, engines: EngineRegistry, platform: PlatformSettings) -> None:
        self._engines = engines
        self._platform = platform

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: ServicerContext
    ) -> pb.GenerateResponse:
        rewrite = request.rewrite
        if not rewrite.item.prompt.strip():
            raise InvalidPromptError("rewrite.item.prompt is empty")
        key = endpoint_key(request.target, self._platform.target_engine, self._platform.target_model)
        engine = await self._engines.get(key)
        generator = AnswerGenerator(engine, max_new_tokens=request.target.max_new_tokens or DEFAULT_ANSWER_TOKENS)
        optimized = rewrite.optimized or rewrite.item.prompt
        (result,) = await generator.answer_pairs(
            [AnswerInput(rewrite.item.prompt, optimized, rewrite.item.context or None)]
        )
        return pb.GenerateResponse(answers=answer_pair(rewrite, result, engine.identity.name))
