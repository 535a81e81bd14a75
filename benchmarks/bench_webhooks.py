"""Figure 13: webhooks out through a real worker, against a raw Celery task's signed POST."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from django.db import transaction

from django_events import publish_many

from . import celery_app
from .bench_delivery import (
    _queues,
    _until_recorded,
    _wiring,
    _worker,
    analyze_tables,
    fresh_tables,
)
from .bench_publish import Context
from .harness import Baseline, Comparison, Target, compare

SECRET = "whsec_" + base64.b64encode(b"bench-webhook-secret-0123456789").decode()


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the senders' pools reuse connections
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed ACK
    server: _Receiver

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        note = json.loads(body)["data"]["note"]
        with self.server.lock:
            self.server.counts[note] += 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


@contextmanager
def _receiver() -> Iterator[_Receiver]:
    import os

    server = _Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["BENCH_HOOK_URL"] = f"http://127.0.0.1:{server.server_address[1]}/hook"
    os.environ["BENCH_HOOK_SECRET"] = SECRET
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _until_received(server: _Receiver, key: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while server.counts[key] < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {server.counts[key]} of {count} webhooks received in time")
        time.sleep(0.005)


def figure_13(ctx: Context) -> Comparison:
    """Webhook deliveries/s, publish to received, prefork -c 2, RabbitMQ: with the default
    settings (success rows batched), then with each success row written before the ack."""
    with _receiver() as server:
        judged = _line(ctx, server, "", "default settings (success rows batched)")
        immediate = _line(ctx, server, "immediate", "SUCCESS_RECORDS immediate")
    return Comparison(judged.met, judged.ours, judged.baselines + immediate.baselines)


def _line(ctx: Context, server: _Receiver, success: str, title: str) -> Comparison:
    kind = "amqp"
    n = ctx.count(1000)
    fresh_tables()
    variant = success or "default"
    ours_queue = f"bench-hook-{ctx.run_id}-{variant}"
    raw_queue = f"bench-rawhook-{ctx.run_id}-{variant}"
    _queues[kind].add(raw_queue)
    app = celery_app.APPS[kind]
    runs = iter(range(1_000_000))
    published = 0

    def ours(count: int = n) -> float:
        nonlocal published
        key = f"{ctx.counter}:hook:{variant}:{next(runs)}"
        start = time.perf_counter()
        for first in range(0, count, 100):
            items = [
                ("bench.webhook", ctx.payload(i, key))
                for i in range(first, min(count, first + 100))
            ]
            with transaction.atomic():
                publish_many(items)
        _until_received(server, key, count, timeout=60 + count / 20)
        rate = count / (time.perf_counter() - start)
        published += count
        # Untimed: batched success rows are all written before the next run starts.
        _until_recorded(published, timeout=60)
        return rate

    def raw(count: int = n) -> float:
        key = f"{ctx.counter}:hook:{variant}:{next(runs)}"
        start = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for i in range(count):
                app.send_task(
                    celery_app.RAW_WEBHOOK_TASK,
                    args=(f"msg_{uuid.uuid4().hex}", ctx.payload(i, key)),
                    queue=raw_queue,
                    producer=producer,
                )
        _until_received(server, key, count, timeout=60 + count / 20)
        return count / (time.perf_counter() - start)

    with (
        _wiring(ctx, kind, ours_queue),
        _worker(ctx, kind, [ours_queue, raw_queue], success=success),
    ):
        ours(min(n, 50))  # warm-up: imports, connections, the registry
        raw(min(n, 50))
        analyze_tables()
        return compare(
            "13",
            f"webhooks out, publish to received, prefork -c 2, {kind}, {title}",
            "webhooks/s",
            ours,
            [Baseline("raw Celery task + httpx", raw, Target(0.8, higher=True))],
            ctx.repeat,
        )
