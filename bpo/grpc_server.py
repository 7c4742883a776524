"""What every gRPC server of the platform has: health checking, reflection, errors mapped to status codes in
one interceptor, request metrics, deadlines honoured, and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health as _health_module
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bpo.errors import BpoError

log = logging.getLogger(__name__)
if TYPE_CHECKING:
    # Annotations only: clients import this module (message size options), and the optimizer workers must not load
    # prometheus_client before they choose its multiprocess mode.
    from bpo.metrics import PlatformMetrics

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


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The same limit both ways, on servers and on the platform's own clients."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class DependencyHealth:
    """Health that reflects what the service depends on: every few seconds each dependency is checked (off the
    event loop) and the server reports SERVING only while all of them answer."""

    def __init__(
        self, checks: Mapping[str, Callable[[], bool]], metrics: PlatformMetrics, interval_s: float = 5.0
    ) -> None:
        self._checks = dict(checks)
        self._metrics = metrics
        self.interval_s = interval_s

    async def all_up(self) -> bool:
        up = True
        for name, check in self._checks.items():
            try:
                ok = bool(await asyncio.wait_for(asyncio.to_thread(check), timeout=self.interval_s * 2))
            except Exception as exc:
                log.debug("dependency %s check failed: %s", name, exc)
                ok = False
            self._metrics.dependency_up.labels(name).set(1 if ok else 0)
            if not ok:
                log.warning("dependency %s is not answering: health is NOT_SERVING until it does", name)
            up = up and ok
        return up


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
    max_message_bytes: int = 4 * 1024 * 1024,
    health: DependencyHealth | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Run a server until SIGTERM/SIGINT (or ``stop_event``); in-flight calls get ``grace_s`` to finish.

    ``interceptors`` run inside the error-and-metrics one (authentication is one: its refusals are counted and
    converted like any error); ``credentials`` serve TLS instead of plaintext."""
    server = grpc.aio.server(
        interceptors=[ErrorAndMetricsInterceptor(metrics, service_name), *interceptors],
        # gRPC shares a port with any other server that asked for it (SO_REUSEPORT) and splits the connections
        # between them; a second server on a taken port must fail to start instead.
        options=[("grpc.so_reuseport", 0), *message_size_options(max_message_bytes)],
    )
    register(server)
    pool = descriptor_pool.Default()
    for full_name in full_service_names:
        metrics.declare_grpc_methods(service_name, [m.name for m in pool.FindServiceByName(full_name).methods])
    health_servicer = _health_module.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = ("", *full_service_names)
    reflection.enable_server_reflection(
        [*full_service_names, _health_module.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = (
        server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
    )
    await server.start()

    async def set_status(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            await health_servicer.set(name, status)

    await set_status(health is None or await health.all_up())
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
    watcher = asyncio.create_task(_watch_health(health, set_status, stop)) if health is not None else None
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    log.info("%s stopping (grace %.0fs)", service_name, grace_s)
    await set_status(False)
    await server.stop(grace_s)


async def _watch_health(
    health: DependencyHealth, set_status: Callable[[bool], Awaitable[None]], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        await asyncio.sleep(health.interval_s)
        await set_status(await health.all_up())
