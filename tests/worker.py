"""Start and stop a real `celery worker` process for the delivery tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        self.launch()
        self.wait_ready(timeout)

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
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._stopping = False
        log = self.log_path.open("ab")
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
        log.close()
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
