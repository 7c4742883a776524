"""OptimizerService: synchronous rewrites for other teams, through the same workers and cache as jobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from bpo.errors import EngineOverloadedError, InvalidPromptError, error_for_status
from bpo.grpc_server import ServicerContext
from bpo.messages import params_from_proto
from bpo.optimizer.optimizer import OptimizeParams
from bpo.pipeline.rewriting import CachedRewriter
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc


class OptimizerServicer(pb_grpc.OptimizerServiceServicer):
    def __init__(
        self,
        rewriter: CachedRewriter,
        default_model: str,
        default_params: OptimizeParams,
        *,
        batch_size: int = 8,
        max_in_flight: int = 64,
    ) -> None:
        self._rewriter = rewriter
        self._default_model = default_model
        self._default_params = default_params
        self._batch_size = batch_size
        self._max_in_flight = max_in_flight
        self._in_flight = 0

    def _admit(self, count: int) -> None:
        if self._in_flight + count > self._max_in_flight:
            raise EngineOverloadedError(
                f"optimizer is at capacity ({self._in_flight} prompts in flight); retry with back-off"
            )
        self._in_flight += count

    async def _run(
        self, items: Sequence[pb.PromptItem], model: str, params: OptimizeParams, context: ServicerContext
    ) -> list[tuple[pb.Rewrite | None, str, str]]:
        self._admit(len(items))
        try:
            remaining = context.time_remaining()
            outcomes = await asyncio.wait_for(self._rewriter.rewrite(items, model, params), timeout=remaining)
        finally:
            self._in_flight -= len(items)
        return [
            (o.rewrite, o.failure.error if o.failure else "", o.failure.status_code if o.failure else "")
            for o in outcomes
        ]

    async def Optimize(  # noqa: N802 - gRPC method name
        self, request: pb.OptimizeRequest, context: ServicerContext
    ) -> pb.OptimizeResponse:
        if not request.prompt.strip():
            raise InvalidPromptError("prompt is empty or only whitespace")
        item = pb.PromptItem(prompt=request.prompt, context=request.context)
        params = params_from_proto(request.params, self._default_params)
        ((rewrite, error, code),) = await self._run([item], request.model or self._default_model, params, context)
        if rewrite is None:
            raise error_for_status(code, error)
        return pb.OptimizeResponse(rewrite=rewrite)

    async def OptimizeBatch(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.OptimizeBatchRequest], context: ServicerContext
    ) -> AsyncIterator[pb.OptimizeBatchResponse]:
        pending: list[pb.OptimizeBatchRequest] = []
        async for request in request_iterator:
            pending.append(request)
            if len(pending) >= self._batch_size:
                for response in await self._flush(pending, context):
                    yield response
                pending = []
        for response in await self._flush(pending, context):
            yield response

    async def _flush(
        self, requests: list[pb.OptimizeBatchRequest], context: ServicerContext
    ) -> list[pb.OptimizeBatchResponse]:
        responses: list[pb.OptimizeBatchResponse] = []
        groups: dict[tuple[str, OptimizeParams], list[pb.OptimizeBatchRequest]] = {}
        for request in requests:
            if not request.prompt.strip():
                responses.append(
                    pb.OptimizeBatchResponse(
                        request_id=request.request_id,
                        error="prompt is empty or only whitespace",
                        error_code="INVALID_ARGUMENT",
                    )
                )
                continue
            key = (request.model or self._default_model, params_from_proto(request.params, self._default_params))
            groups.setdefault(key, []).append(request)
        for (model, params), members in groups.items():
            items = [pb.PromptItem(item_id=r.request_id, prompt=r.prompt, context=r.context) for r in members]
            for request, (rewrite, error, code) in zip(
                members, await self._run(items, model, params, context), strict=True
            ):
                if rewrite is None:
                    responses.append(
                        pb.OptimizeBatchResponse(request_id=request.request_id, error=error, error_code=code)
                    )
                else:
                    responses.append(pb.OptimizeBatchResponse(request_id=request.request_id, rewrite=rewrite))
        return responses
