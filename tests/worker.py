"""Start and stop a real `celery worker` process for the delivery tests."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from celery import Celery

ROOT = Path(__file__).resolve().parent.parent

# Workers started and not yet stopped, for what a timed-out wait reports.
_running: set[WorkerProcess] = set()


class WorkerProcess:
    """A prefork worker (2 processes) on ``queue`` (comma-separated queues) of one broker."""

    def __init__(
        self,
        kind: str,
        queue: str,
        db_name: str,
        log_path: Path,
        extra_env: dict[str, str] | None = None,
        node: str | None = None,
        app: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.kind, self.queue, self.db_name, self.log_path = kind, queue, db_name, log_path
        self.extra_env = extra_env or {}
        self.node = node or queue.replace(",", "+")  # workers sharing a queue need distinct names
        self.app = app or f"tests.brokers:{kind}"  # the benchmarks bring their own apps
        self.extra_args = extra_args  # more `celery worker` options (-E: task events)
        self.process: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._stopping = False

    def __enter__(self) -> WorkerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        try:
            self.launch()
            self.wait_ready(timeout)
        except BaseException:
            # Ctrl+C while it starts: `with worker:` never reaches __exit__, and the worker,
            # in a session of its own, would outlive the run. (launch() is inside too, which
            # leaves only the instant between Popen's return and `self.process = ...`.)
            self.stop()
            raise

    def launch(self) -> None:
        """Start the process without waiting (start several, then `wait_ready` each)."""
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DJANGO_EVENTS_WORKER_DB_NAME": self.db_name,
            "DJANGO_EVENTS_TEST_MANIFEST": "delivery.yaml",
            "DJANGO_EVENTS_TEST_QUEUE": self.queue,
            "PYTHONPATH": str(ROOT),
            **self.extra_env,
        }
        if "COVERAGE_PROCESS_CONFIG" in env and self.app.startswith("tests.brokers:"):
            from tests import brokers  # the test process's: it measures the imports

            # Measured from its `celeryd_init` on, not from its first import (tests/brokers.py).
            env[brokers.DEFERRED_COVERAGE] = env.pop("COVERAGE_PROCESS_CONFIG")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._stopping = False
        with self.log_path.open("ab") as log:  # the child has its own copy
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    self.app,
                    "worker",
                    "-Q",
                    self.queue,
                    "--pool",
                    "prefork",
                    "-c",
                    "2",
                    "-n",
                    f"{self.node}@%h",
                    "--without-heartbeat",
                    "--without-mingle",
                    "--without-gossip",
                    "-l",
                    "INFO",
                    *self.extra_args,
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for kill()
            )
        _running.add(self)

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait for this start's "ready." line in the log; stop the worker if it never comes."""
        assert self.process is not None, "launch() first"
        offset = self._offset
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker exited early; see {self.log_path}:\n{self.log()[-3000:]}"
                )
            if "ready." in self.log()[offset:]:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"worker not ready in {timeout}s; see {self.log_path}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20, *, wait: bool = True, cold: bool = False) -> None:
        """Warm shutdown (``cold``: at once, running tasks lost); ``wait=False`` only signals."""
        if self.process is None or self.process.poll() is not None:
            _running.discard(self)
            return
        if not self._stopping:
            self.process.send_signal(signal.SIGQUIT if cold else signal.SIGTERM)
            self._stopping = True
        if not wait:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        _running.discard(self)

    def kill(self) -> None:
        """SIGKILL the whole worker, main process and pool children (a host going down)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        _running.discard(self)

    def pool_children(self) -> list[int]:
        """The pids of the worker's pool processes (any of its threads may have forked one)."""
        assert self.process is not None
        tasks = Path(f"/proc/{self.process.pid}/task")
        return [int(p) for task in tasks.iterdir() for p in (task / "children").read_text().split()]

    def describe(self, lines: int = 40) -> str:
        """Whether the process runs, and the tail of this start's log."""
        assert self.process is not None
        code = self.process.poll()
        state = "running" if code is None else f"exited with {code}"
        tail = self.log()[self._offset :].splitlines()[-lines:]
        return (
            f"worker {self.node} (pid {self.process.pid}, {state}), {self.log_path}:\n"
            + "\n".join(tail)
        )


@contextmanager
def fresh_queue(kind: str, prefix: str, app: Celery | None = None) -> Iterator[str]:
    """A queue name of its own on broker ``kind``, dropped afterwards with its exchanges
    (through ``app``, when the test reaches the broker another way: a Redis database of its
    own).

    The test skips when the broker is down on a laptop, and fails under CI.
    """
    from tests import brokers

    brokers.require_server(brokers.URLS[kind], kind)
    queue = f"{prefix}-{uuid.uuid4().hex[:8]}"
    try:
        yield queue
    finally:
        _drop_queue(app or getattr(brokers, kind), kind, queue)


def _drop_queue(app: Celery, kind: str, queue: str) -> None:
    from django_events.wiring.compiled import exchange_name

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if kind == "filesystem":  # kombu's filesystem queue_delete leaves the message files
            channel.queue_purge(queue)
        channel.queue_delete(queue)
        for exchange in (queue, exchange_name(queue)):  # its direct and broadcast exchanges
            channel.exchange_delete(exchange)


def worker_for(
    kind: str,
    queue: str,
    folder: Path,
    *,
    manifest: str = "delivery.yaml",
    node: str | None = None,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> WorkerProcess:
    """A worker (not started) of the test app of ``kind`` on the test database.

    It loads base.yaml and ``manifest`` (from tests/manifests), consumes ``queue``, and logs to
    ``folder/<node>.log``; ``env`` adds to its environment, ``args`` to its command line.
    Its alias "other" is the test database "other" too (a message's ``db`` names the alias).
    """
    from django.db import connections

    from tests import brokers

    return WorkerProcess(
        kind,
        queue,
        connections["default"].settings_dict["NAME"],
        folder / f"{node or 'worker'}.log",
        extra_env={
            "DJANGO_EVENTS_WORKER_OTHER_DB_NAME": connections["other"].settings_dict["NAME"],
            "DJANGO_EVENTS_TEST_MANIFEST": manifest,
            "DJANGO_EVENTS_FS_BROKER": str(brokers.FS_FOLDER),
            **(env or {}),
        },
        node=node,
        extra_args=args,
    )


@contextmanager
def start_worker(
    kind: str,
    folder: Path,
    *,
    prefix: str,
    manifest: str = "delivery.yaml",
    env: dict[str, str] | None = None,
) -> Iterator[WorkerProcess]:
    """A started worker on a `fresh_queue` of its own (``worker.queue``), stopped afterwards."""
    with (
        fresh_queue(kind, prefix) as queue,
        worker_for(kind, queue, folder, manifest=manifest, env=env) as worker,
    ):
        yield worker


# Celery's log lines about a task: "Task <name>[<id>] received" when the worker takes the
# message, then one line that ends that run: "succeeded in ...", "ignored", "retry: ...",
# "raised unexpected: ...", "INTERNAL ERROR: ..." or a rejection.
_TASK_LINE = re.compile(r"Task [\w.]+\[([0-9a-f-]{36})\] (\S+)")
# A pool process that died mid-task (WorkerLostError); Celery names no task there.
_LOST_LINE = "Task handler raised error: "
_BROADCAST_QUEUE = re.compile(r"Consuming broadcasts of .* through (\S+) \(fanout exchange")


def _unfinished(worker: WorkerProcess) -> tuple[int, list[str]]:
    """How many runs this start of ``worker`` took and has not finished, and of which tasks."""
    runs: Counter[str] = Counter()
    lost = 0
    for line in worker.log()[worker._offset :].splitlines():
        if match := _TASK_LINE.search(line):
            runs[match[1]] += 1 if match[2] == "received" else -1
        elif _LOST_LINE in line:
            lost += 1
    return sum(runs.values()) - lost, [task for task, count in runs.items() if count > 0]


@functools.cache
def _redis_app(url: str) -> Celery:
    from tests import brokers

    return brokers.make_app("redis", url)


def _ready_messages(worker: WorkerProcess) -> dict[str, int]:
    """Messages waiting in the broker on each queue ``worker`` consumes (its broadcast ones too)."""
    from tests import brokers

    queues = worker.queue.split(",") + _BROADCAST_QUEUE.findall(worker.log()[worker._offset :])
    if worker.kind == "filesystem":  # kombu's rule: the part after the first dot
        names = [p.name.partition(".")[2] for p in brokers.FS_FOLDER.iterdir()]
        return {queue: names.count(f"{queue}.msg") for queue in queues}
    app = getattr(brokers, worker.kind)
    if worker.kind == "redis" and "DJANGO_EVENTS_REDIS_URL" in worker.extra_env:
        app = _redis_app(worker.extra_env["DJANGO_EVENTS_REDIS_URL"])  # a database of its own
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if worker.kind == "redis":  # a list per queue (the tests send without priority)
            return {queue: int(channel.client.llen(queue)) for queue in queues}
        return {queue: channel.queue_declare(queue, passive=True).message_count for queue in queues}


def _busy(workers: Iterable[WorkerProcess]) -> dict[str, tuple[dict[str, int], int, list[str]]]:
    """Each worker with work left: node -> (messages waiting by queue, runs not ended, the ids
    of their tasks)."""
    busy = {}
    for worker in workers:
        ready = {queue: n for queue, n in _ready_messages(worker).items() if n}
        running, tasks = _unfinished(worker)
        if ready or running > 0:
            busy[worker.node] = (ready, running, tasks)
    return busy


def wait_idle(*workers: WorkerProcess, timeout: float = 30, settle: float = 0.3) -> None:
    """Wait until no message waits in the broker for these workers (all running ones if none
    given) and every task run their logs show as received has ended; fail after ``timeout``.

    A retry scheduled for later keeps a worker busy: Celery logs its message as received when
    it takes it, and the run as ended only when it ran. The state must hold for ``settle``
    seconds: a message just taken from the broker is logged as received a moment later.
    Afterwards a duplicate or a retry that has not run will not come by itself.
    """
    watched = list(workers or _running)
    assert watched, "wait_idle: no worker is running"
    deadline = time.monotonic() + timeout
    idle_since: float | None = None
    while True:
        busy = _busy(watched)
        now = time.monotonic()
        if busy:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= settle:
            return
        if busy and now > deadline:
            states = "; ".join(
                f"worker {node}: messages waiting {ready or 'none'}, {running} run(s) not ended"
                f" (tasks {tasks})"
                for node, (ready, running, tasks) in busy.items()
            )
            logs = "".join(f"\n\n{worker.describe()}" for worker in watched)
            raise AssertionError(f"workers not idle after {timeout}s: {states}{logs}")
        time.sleep(0.05)


def wait_live_workers_idle() -> None:
    """`wait_idle` for every started worker whose process is alive, with a shorter settle."""
    live = [w for w in _running if w.process is not None and w.process.poll() is None]
    if live:
        wait_idle(*live, settle=0.1)


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            workers = "".join(f"\n\n{worker.describe()}" for worker in _running)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{workers}")
        time.sleep(0.1)


def wake_ups(thread: threading.Thread, seconds: float) -> int:
    """How many times ``thread`` went to sleep again in the next ``seconds`` (Linux counts a
    thread's voluntary context switches): 0 for a thread that slept throughout."""

    if sys.platform != "linux":
        pytest.skip("counts a thread's context switches in /proc (Linux)")

    def switches() -> int:
        status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
        found = re.search(r"^voluntary_ctxt_switches:\s+(\d+)$", status, re.MULTILINE)
        assert found is not None, status
        return int(found[1])

    before = switches()
    time.sleep(seconds)
    return switches() - before
