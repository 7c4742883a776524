"""What every gRPC server of the platform has: health checking, reflection, errors mapped to status codes in
one interceptor, request metrics, deadlines honoured, and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bpo.errors import BpoError
from bpo.metrics import PlatformMetrics

log = logging.getLogger(__name__)
if TYPE_CHECKING:
    # Generic only in the type stubs; at run time these classes take no parameters.
    ServicerContext: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    ServicerContext = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, BpoError):
        return grpc.StatusCode[exc.status_code], str(exc)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


class ErrorAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Converts platform errors into their status codes and counts every call by method and code."""

    def __init__(self, metrics: PlatformMetrics, service: str) -> None:
        self._metrics = metrics
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _observe(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self._metrics.grpc_requests.labels(self._service, method, code.name).inc()
        self._metrics.grpc_latency.labels(self._service, method).observe(time.perf_counter() - started)

    async def _abort(self, context: ServicerContext, exc: BaseException, method: str) -> None:
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s/%s failed", self._service, method, exc_info=exc)
        await context.abort(code, message)

    def _wrap_unary(self, behaviour: Any, method: str) -> Any:
        async def wrapped(request: Any, context: ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                response = await behaviour(request, context)
            except asyncio.CancelledError:
                self._observe(method, grpc.StatusCode.CANCELLED, started)
                raise
            except Exception as exc:
                if _already_aborted(context, exc):
                    self._observe(method, context.code() or grpc.StatusCode.UNKNOWN, started)
                    raise
                self._observe(method, status_for(exc)[0], started)
                await self._abort(context, exc, method)
            self._observe(method, grpc.StatusCode.OK, started)
            return response

        return wrapped

    def _wrap_stream(self, behaviour: Any, method: str) -> Any:
        async def wrapped(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                async for response in behaviour(request, context):
                    yield response
            except asyncio.CancelledError:
                self._observe(method, grpc.StatusCode.CANCELLED, started)
                raise
            except Exception as exc:
                if _already_aborted(context, exc):
                    self._observe(method, context.code() or grpc.StatusCode.UNKNOWN, started)
                    raise
                self._observe(method, status_for(exc)[0], started)
                await self._abort(context, exc, method)
            self._observe(method, grpc.StatusCode.OK, started)

        return wrapped


def _already_aborted(context: ServicerContext, exc: BaseException) -> bool:
    # context.abort raises a plain Exception after setting the code; it must pass through unchanged.
    return type(exc) is Exception and context.code() not in (None, grpc.StatusCode.OK)


async def serve(
    *,
    service_name: str,
    address: str,
    register: Callable[[grpc.aio.Server], None],
    full_service_names: Sequence[str],
    metrics: PlatformMetrics,
    stop_event: asyncio.Event | None = None,
    grace_s: float = 10.0,
    on_started: Callable[[int], None] | None = None,
) -> None:
    """Run a server until SIGTERM/SIGINT (or ``stop_event``); in-flight calls get ``grace_s`` to finish."""
    server = grpc.aio.server(
        interceptors=[ErrorAndMetricsInterceptor(metrics, service_name)],
        # gRPC shares a port with any other server that asked for it (SO_REUSEPORT) and splits the connections
        # between them; a second server on a taken port must fail to start instead.
        options=[("grpc.so_reuseport", 0)],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*full_service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    await server.start()
    for name in ("", *full_service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving on port %d", service_name, port)
    if on_started is not None:
        on_started(port)
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread: the caller owns stopping
            break
    await stop.wait()
    log.info("%s stopping (grace %.0fs)", service_name, grace_s)
    for name in ("", *full_service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace_s)
