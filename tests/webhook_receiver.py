"""A webhook receiver on 127.0.0.1 that verifies every request with the standardwebhooks
library and answers by script (the path): ok, flaky, throttled, gone, bad, redirect, huge,
hang, down (500, always), cookie (200, setting a cookie), trickle (a status line, then a byte
of its headers every half second: no read ever waits a second)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

SCRIPTS = (
    "ok",
    "flaky",
    "throttled",
    "gone",
    "bad",
    "redirect",
    "huge",
    "hang",
    "down",
    "cookie",
    "trickle",
)
HUGE = 10 * 1024 * 1024


@dataclass
class Received:
    script: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    at: float
    error: str = ""

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    secret: str
    received: list[Received] = field(default_factory=list)
    seen: dict[tuple[str, str], int] = field(default_factory=dict)  # (script, webhook-id)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    stop_hanging: threading.Event = field(default_factory=threading.Event)

    def url(self, script: str) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/{script}"

    def of(self, script: str, msg_id: str | None = None) -> list[Received]:
        with self.lock:
            return [
                r
                for r in self.received
                if r.script == script and (msg_id is None or r.headers["webhook-id"] == msg_id)
            ]

    def __enter__(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                script = self.path.partition("?")[0].strip("/")  # a query tells URLs apart
                try:
                    Webhook(receiver.secret).verify(body, headers, json_parse=False)
                    verified, error = True, ""
                except (WebhookVerificationError, ValueError) as exc:
                    verified, error = False, str(exc)
                with receiver.lock:
                    receiver.received.append(
                        Received(script, headers, body, verified, time.time(), error)
                    )
                    key = (script, headers.get("webhook-id", ""))
                    receiver.seen[key] = count = receiver.seen.get(key, 0) + 1
                if not verified:
                    return self._answer(401, b"unverified")
                if script == "ok":
                    return self._answer(200, b'{"received": true}')
                if script == "flaky":
                    return self._answer(500 if count == 1 else 200, b"flaky")
                if script == "throttled":
                    if count == 1:
                        return self._answer(429, b"slow down", {"Retry-After": "2"})
                    return self._answer(200, b"ok")
                if script == "down":
                    return self._answer(500, b"down")
                if script == "cookie":
                    return self._answer(200, b"ok", {"Set-Cookie": "session=receivers; Path=/"})
                if script == "gone":
                    return self._answer(410, b"gone")
                if script == "bad":
                    return self._answer(400, b'{"error": "bad"}')
                if script == "redirect":
                    return self._answer(302, b"", {"Location": receiver.url("ok")})
                if script == "huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(HUGE))
                    self.end_headers()
                    chunk = b"x" * 65536
                    try:
                        for _ in range(HUGE // len(chunk)):
                            self.wfile.write(chunk)
                    except OSError:
                        pass  # the sender stopped reading: what the test expects
                    return None
                if script == "hang":
                    receiver.stop_hanging.wait(30)
                    return None
                if script == "trickle":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    try:
                        while not receiver.stop_hanging.wait(0.5):
                            self.wfile.write(b"X")  # a header name that never ends
                            self.wfile.flush()
                    except OSError:
                        pass  # the sender gave up: what the test expects
                    return None
                return self._answer(404, b"no script")

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_hanging.set()
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
