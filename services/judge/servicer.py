"""JudgeService: a pairwise verdict on one answer pair, judged in both orders."""

from __future__ import annotations

from bpo.engines.registry import EngineRegistry
from bpo.errors import InvalidPromptError
from bpo.grpc_server import ServicerContext
from bpo.judging.pairwise import JudgeInput, PairwiseJudge
from bpo.pipeline.jobspec import DEFAULT_JUDGE_TOKENS, endpoint_key, judge_template_of
from bpo.settings import PlatformSettings
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from services.judge.stage import question_of, verdict_message


class JudgeServicer(pb_grpc.JudgeServiceServicer):
    def __init__(self, engines: EngineRegistry, platform: PlatformSettings) -> None:
        self._engines = engines
        self._platform = platform

    async def Judge(  # noqa: N802 - gRPC method name
        self, request: pb.JudgeRequest, context: ServicerContext
    ) -> pb.JudgeResponse:
        answers = request.answers
        if not answers.rewrite.item.prompt.strip():
            raise InvalidPromptError("answers.rewrite.item.prompt (the question) is empty")
        key = endpoint_key(request.judge, self._platform.judge_engine, self._platform.judge_model)
        engine = await self._engines.get(key)
        template = judge_template_of(request.judge_template)
        judge = PairwiseJudge(engine, template, max_new_tokens=request.judge.max_new_tokens or DEFAULT_JUDGE_TOKENS)
        item = JudgeInput(question_of(answers.rewrite.item), answers.original_answer, answers.optimized_answer)
        (verdict,) = await judge.judge_batch([item])
        return pb.JudgeResponse(verdict=verdict_message(answers, verdict, engine.identity.name, template))
