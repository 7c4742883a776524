"""OptimizerService: synchronous rewrites for other teams, through the same workers and cache as jobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from bpo.auth import current_caller
from bpo.errors import BpoError, EngineOverloadedError, InvalidPromptError, error_for_status
from bpo.grpc_server import ServicerContext
from bpo.messages import params_from_proto
from bpo.optimizer.optimizer import OptimizeParams
from bpo.pipeline.admission import Admission, check_params
from bpo.pipeline.quotas import QuotaGuard
from bpo.pipeline.rewriting import CachedRewriter
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc


class OptimizerServicer(pb_grpc.OptimizerServiceServicer):
    """Every request is admitted first (prompt size, parameters, a model the workers serve): a bad one is
    ``INVALID_ARGUMENT`` naming the field, and a served model with no live worker ``UNAVAILABLE`` at once."""

    def __init__(
        self,
        rewriter: CachedRewriter,
        admission: Admission,
        quotas: QuotaGuard,
        default_params: OptimizeParams,
        *,
        batch_size: int = 8,
        max_in_flight: int = 64,
    ) -> None:
        self._rewriter = rewriter
        self._admission = admission
        self._quotas = quotas
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

    async def _admit_request(self, prompt: str, context: str, model: str, params: pb.OptimizeParams) -> str:
        """The served model the request goes to; raises what the caller should see when it cannot."""
        caller = current_caller()
        problem = self._admission.check_item(prompt, context)
        if problem is not None:
            raise InvalidPromptError(problem)
        check_params(params)
        served = await asyncio.to_thread(self._admission.optimizer_model, model, "model", caller.team)
        await asyncio.to_thread(self._quotas.check_tokens, caller, "optimizer")
        await asyncio.to_thread(self._admission.models.require_live, served)
        return served

    async def _record_usage(self, rewrites: Sequence[pb.Rewrite | None]) -> None:
        tokens_in = sum(r.tokens_in for r in rewrites if r is not None)
        tokens_out = sum(r.tokens_out for r in rewrites if r is not None)
        if tokens_in or tokens_out:
            await asyncio.to_thread(self._quotas.record, current_caller(), "optimizer", tokens_in, tokens_out)

    async def Optimize(  # noqa: N802 - gRPC method name
        self, request: pb.OptimizeRequest, context: ServicerContext
    ) -> pb.OptimizeResponse:
        model = await self._admit_request(request.prompt, request.context, request.model, request.params)
        item = pb.PromptItem(prompt=request.prompt, context=request.context)
        params = params_from_proto(request.params, self._default_params)
        ((rewrite, error, code),) = await self._run([item], model, params, context)
        await self._record_usage([rewrite])
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
            try:
                model = await self._admit_request(request.prompt, request.context, request.model, request.params)
            except BpoError as exc:
                # One bad request is its own error response; the stream goes on.
                responses.append(
                    pb.OptimizeBatchResponse(request_id=request.request_id, error=str(exc), error_code=exc.status_code)
                )
                continue
            key = (model, params_from_proto(request.params, self._default_params))
            groups.setdefault(key, []).append(request)
        for (model, params), members in groups.items():
            items = [pb.PromptItem(item_id=r.request_id, prompt=r.prompt, context=r.context) for r in members]
            try:
                outcomes = await self._run(items, model, params, context)
            except BpoError as exc:
                outcomes = [(None, str(exc), exc.status_code)] * len(members)
            await self._record_usage([rewrite for rewrite, _, _ in outcomes])
            for request, (rewrite, error, code) in zip(members, outcomes, strict=True):
                if rewrite is None:
                    responses.append(
                        pb.OptimizeBatchResponse(request_id=request.request_id, error=error, error_code=code)
                    )
                else:
                    responses.append(pb.OptimizeBatchResponse(request_id=request.request_id, rewrite=rewrite))
        return responses
