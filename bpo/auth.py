"""Who is calling: every RPC but health checking and reflection carries a team's bearer token.

``AuthInterceptor`` reads ``authorization: Bearer <token>`` from the call's metadata, looks the token up (cached
for ``cache_s``, so a revocation takes effect within that), and runs the handler with the caller set
(``current_caller``). A missing, malformed, unknown or revoked token is ``UNAUTHENTICATED``; a disabled team is
``PERMISSION_DENIED``. The errors are raised, not aborted here, so that the one error interceptor outside this
one turns them into status codes and counts them like every other outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from bpo.errors import PermissionDeniedError, UnauthenticatedError
from bpo.store.teams import TOKEN_PREFIX, Team, TeamQuotas

# Services any caller may use without a token: health checks (probes) and reflection (tooling).
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
_MAX_TOKEN_CHARS = 256


@dataclass(frozen=True, slots=True)
class Caller:
    team_id: str
    team: str
    admin: bool
    quotas: TeamQuotas


_current_caller: ContextVar[Caller | None] = ContextVar("bpo_caller", default=None)


def current_caller() -> Caller:
    """The team making the call being handled (set by ``AuthInterceptor``)."""
    caller = _current_caller.get()
    if caller is None:
        raise UnauthenticatedError("no authenticated caller")
    return caller


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX) or len(token) > _MAX_TOKEN_CHARS:
                raise UnauthenticatedError("malformed authorization metadata: expected 'Bearer bpo_...'")
            return token
    raise UnauthenticatedError("missing bearer token: send 'authorization: Bearer <token>' with every call")


class Authenticator:
    """Token -> caller, through the store, remembered briefly."""

    def __init__(
        self, lookup: Callable[[str], Team | None], cache_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lookup = lookup
        self._cache_s = cache_s
        self._clock = clock
        self._cache: dict[str, tuple[float, Team | None]] = {}
        self._lock = threading.Lock()

    def caller(self, token: str) -> Caller:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(token)
        if hit is not None and now - hit[0] < self._cache_s:
            team = hit[1]
        else:
            team = self._lookup(token)
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[token] = (now, team)
        if team is None:
            raise UnauthenticatedError("invalid or revoked token")
        if team.disabled:
            raise PermissionDeniedError(f"team {team.name!r} is disabled")
        return Caller(team.team_id, team.name, team.admin, team.quotas)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, open_services: Sequence[str] = OPEN_SERVICES) -> None:
        self._authenticator = authenticator
        self._open = tuple(open_services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.lstrip("/").startswith(self._open):
            return handler
        metadata = handler_call_details.invocation_metadata
        authenticate = self._authenticator.caller

        async def identify() -> Caller:
            return await asyncio.to_thread(authenticate, bearer_token(metadata))

        def unary(behaviour: Any) -> Any:
            async def wrapped(request: Any, context: Any) -> Any:
                token = _current_caller.set(await identify())
                try:
                    return await behaviour(request, context)
                finally:
                    _current_caller.reset(token)

            return wrapped

        def streaming(behaviour: Any) -> Any:
            async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
                token = _current_caller.set(await identify())
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    # A stream closed from another context cannot reset there; its own context ends with it.
                    with contextlib.suppress(ValueError):
                        _current_caller.reset(token)

            return wrapped

        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, unary),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, unary),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, streaming),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, streaming),
        )
        for attribute, make, wrap in kinds:
            behaviour = getattr(handler, attribute)
            if behaviour is not None:
                return make(
                    wrap(behaviour),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler
