"""A deterministic OpenAI-compatible endpoint that answers at once: for tests, benchmarks and dry runs.

It speaks ``POST /<route>/v1/chat/completions`` (and ``/v1/completions``), where ``<route>`` is any name: one server
stands in for several endpoints (an optimizer, a target, a judge), each with its own behaviour and counts. What it
answers depends on what it is asked, recognised by the platform's own framing:

* an optimizer request (``Original prompt: ...``) gets the prompt back with a sentence added, which the guards
  accept as a rewrite;
* a judge request (the paper's judge prompts) gets a verdict, ``[[A]]``, ``[[B]]`` or ``[[C]]``, fixed by the text;
* anything else gets a short answer quoting the question.

A route can be told to fail with an HTTP status for a while, to hang, or to answer slowly; every request is
counted per route with the model it named and the Authorization it carried.
``python -m bpo.testing.openai_stub --port N`` serves it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

OPTIMIZER_MARKER = "Original prompt: "
JUDGE_MARKERS = ("[The Start of Assistant A's Answer]", "[[A]]", "model_1")
HANG_LIMIT_S = 3600.0


@dataclass
class RouteBehaviour:
    """What a route does now; tests change it while the server runs."""

    fail_status: int = 0
    fail_until: float = 0.0
    hang: bool = False
    latency_s: float = 0.0
    # Requests whose text contains this are refused with HTTP 400, as an endpoint refuses a bad request.
    refuse_containing: str = ""

    def fail_for(self, seconds: float, status: int = 503) -> None:
        self.fail_status, self.fail_until = status, time.monotonic() + seconds


@dataclass
class RouteStats:
    requests: int = 0
    failed: int = 0
    models: Counter[str] = field(default_factory=Counter)
    # The Authorization header of each request ("" when none was sent), to check which key reached which route.
    authorizations: Counter[str] = field(default_factory=Counter)


def _last_user_text(payload: dict[str, Any]) -> str:
    if "messages" in payload:
        for message in reversed(payload.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                return str(message.get("content") or "")
        return ""
    return str(payload.get("prompt") or "")


def _all_text(payload: dict[str, Any]) -> str:
    if "messages" in payload:
        return "\n".join(str(m.get("content") or "") for m in payload.get("messages") or [] if isinstance(m, dict))
    return str(payload.get("prompt") or "")


def reply_for(payload: dict[str, Any]) -> str:
    """The text the stub answers a request with (deterministic in the request)."""
    user = _last_user_text(payload)
    if user.startswith(OPTIMIZER_MARKER):
        prompt = user[len(OPTIMIZER_MARKER) :].split("\nRewrite it as a better prompt.", 1)[0]
        return f"Improved prompt: {prompt.strip()} Please answer clearly and completely, with an example."
    everything = _all_text(payload)
    if any(marker in everything for marker in JUDGE_MARKERS):
        letter = "ABC"[hashlib.sha256(everything.encode()).digest()[0] % 3]
        return f"Both answers address the question; on balance the verdict is as follows.\n\n[[{letter}]]"
    return f"Here is a short answer to: {user[:80]}"


class OpenAIStub:
    """The server, on its own thread and event loop; a context manager that starts and stops it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.behaviour: dict[str, RouteBehaviour] = {}
        self.stats: dict[str, RouteStats] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._released: asyncio.Event | None = None

    def url(self, route: str) -> str:
        return f"http://{self.host}:{self.port}/{route}/v1"

    def route(self, route: str) -> RouteBehaviour:
        with self._lock:
            return self.behaviour.setdefault(route, RouteBehaviour())

    def calls(self, route: str) -> RouteStats:
        with self._lock:
            return self.stats.setdefault(route, RouteStats())

    def hang(self, route: str) -> None:
        """Requests to ``route`` get no answer until ``release_hangs``."""
        if self._loop is not None and self._released is not None:
            self._loop.call_soon_threadsafe(self._released.clear)
        self.route(route).hang = True

    def release_hangs(self) -> None:
        """Answer every hanging request now; no route hangs any more."""
        for behaviour in self.behaviour.values():
            behaviour.hang = False
        if self._loop is not None and self._released is not None:
            self._loop.call_soon_threadsafe(self._released.set)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route = request.match_info["route"]
        behaviour = self.route(route)
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
        stats = self.calls(route)
        with self._lock:
            stats.requests += 1
            stats.models[str(payload.get("model", ""))] += 1
            stats.authorizations[request.headers.get("Authorization", "")] += 1
        if behaviour.hang and self._released is not None:
            # Bounded like every wait: an hour is "forever" to any client with a timeout.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), timeout=HANG_LIMIT_S)
        if behaviour.latency_s:
            await asyncio.sleep(behaviour.latency_s)
        if behaviour.refuse_containing and behaviour.refuse_containing in _all_text(payload):
            with self._lock:
                stats.failed += 1
            return web.json_response(
                {"error": {"message": "this request is refused on purpose", "type": "invalid_request_error"}},
                status=400,
            )
        if behaviour.fail_status and time.monotonic() < behaviour.fail_until:
            with self._lock:
                stats.failed += 1
            return web.json_response(
                {"error": {"message": "the stub is failing on purpose", "type": "server_error"}},
                status=behaviour.fail_status,
            )
        text = reply_for(payload)
        prompt_tokens = max(1, len(_all_text(payload)) // 4)
        completion_tokens = max(1, len(text) // 4)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
        common = {"id": "stub", "created": int(time.time()), "model": payload.get("model", ""), "usage": usage}
        if request.path.endswith("/chat/completions"):
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            return web.json_response({**common, "object": "chat.completion", "choices": [choice]})
        choice = {"index": 0, "text": text, "finish_reason": "stop"}
        return web.json_response({**common, "object": "text_completion", "choices": [choice]})

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{route}/v1/chat/completions", self._handle)
        app.router.add_post("/{route}/v1/completions", self._handle)
        return app

    def start(self) -> OpenAIStub:
        started = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._released = asyncio.Event()
            runner = web.AppRunner(self._app(), access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, reuse_port=False)
            loop.run_until_complete(site.start())
            # The bound address tells the port when 0 was asked for.
            self.port = int(runner.addresses[0][1])
            self._runner = runner
            started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="openai-stub", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the OpenAI stub did not start within 30 s")
        return self

    def stop(self) -> None:
        self.release_hangs()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the deterministic OpenAI-compatible stub.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    args = parser.parse_args()
    web.run_app(OpenAIStub(args.host, args.port)._app(), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
