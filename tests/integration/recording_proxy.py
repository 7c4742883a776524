"""An HTTP proxy in front of an OpenAI-compatible server that records what each request asked for.

llama.cpp's server answers whatever model name a request carries; a real endpoint (OpenAI, vLLM) refuses one it
does not serve. The proxy keeps, per route, the ``model`` field of every request, so a test can assert that the
platform sent exactly the configured name, and count the calls each role made.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


@dataclass
class Recorded:
    route: str
    path: str
    model: str
    authorization: str = ""


@dataclass
class RecordingProxy:
    upstream: str
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, route: str) -> str:
        """The base URL a client uses for ``route``: ``http://127.0.0.1:PORT/<route>/v1``."""
        return f"http://127.0.0.1:{self.port}/{route}/v1"

    def calls(self, route: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.route == route]


@contextmanager
def recording_proxy(upstream_base: str) -> Iterator[RecordingProxy]:
    """``upstream_base`` is the upstream's ``.../v1``; ``/<route>/v1/...`` is forwarded to ``.../v1/...``."""
    proxy = RecordingProxy(upstream_base.rstrip("/"))
    client = httpx.Client(timeout=300)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            route, _, rest = self.path.lstrip("/").partition("/")
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            try:
                payload: Any = json.loads(body)
            except json.JSONDecodeError:
                payload = {}
            with proxy.lock:
                proxy.requests.append(
                    Recorded(route, "/" + rest, str(payload.get("model", "")), self.headers.get("authorization", ""))
                )
            upstream = client.post(
                proxy.upstream + "/" + rest.removeprefix("v1/"),
                content=body,
                headers={"content-type": self.headers.get("content-type", "application/json")},
            )
            self.send_response(upstream.status_code)
            self.send_header("content-type", upstream.headers.get("content-type", "application/json"))
            self.send_header("content-length", str(len(upstream.content)))
            self.end_headers()
            self.wfile.write(upstream.content)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="recording-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        client.close()
