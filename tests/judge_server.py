"""A local OpenAI-compatible chat endpoint for the judge tests (http.server on 127.0.0.1, in a
thread): records every request, answers with a scripted status, or by a verdict rule."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def prefers_good(content: str) -> str:
    """The verdict of an honest judge: the response containing GOOD is better."""
    a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", content, re.S).group(1)
    return "A" if "GOOD" in a else "The better response is B."


class JudgeServer:
    def __init__(
        self,
        verdict: Callable[[str], str] = prefers_good,
        statuses: list[int] | None = None,
        delays: list[float] | None = None,
        error_body: str = '{"error": {"message": "server error"}}',
    ) -> None:
        self.verdict = verdict
        self.statuses = list(statuses or [])  # consumed one per request; then 200
        self.delays = list(delays or [])
        self.error_body = error_body
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                server.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                if server.delays:
                    time.sleep(server.delays.pop(0))
                status = server.statuses.pop(0) if server.statuses else 200
                if status != 200:
                    payload = server.error_body.encode()
                else:
                    content = server.verdict(body["messages"][-1]["content"])
                    payload = json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": content}}]}
                    ).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """The local judge server is reached directly, whatever proxy the environment sets
    (autouse in the test modules that import it)."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
