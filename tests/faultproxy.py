"""A TCP proxy on loopback that tests put between the project and a real server, and cut.

``cut()`` drops every live connection and, until ``restore()``, refuses new ones (accepted,
then reset at once) or, with ``mode="blackhole"``, accepts them and never answers (what a
dead host or a full network path looks like). ``mode="stall"`` keeps live connections open
but forwards nothing either way (a partition: writes still "succeed" into the socket) and
holds new ones; ``restore()`` then resets the stalled ones. ``mode="deaf"`` ends what live
connections receive (a clean end after what was forwarded) while what they send still reaches
the server: a peer lost just as it answers. ``mode="mute"`` is the same without the end: what
the server answers is dropped and the connection stays open (a return path lost). The real
server is never touched.
"""

from __future__ import annotations

import socket
import struct
import threading
from urllib.parse import urlparse, urlunparse

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class FaultProxy:
    """Forward 127.0.0.1:<random port> to ``upstream`` (host, port) until cut."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self._mode: str | None = None  # None (forwarding), or the mode of cut()
        self._live: set[socket.socket] = set()
        self._clients: set[socket.socket] = set()  # our side of each accepted connection
        self._held: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @classmethod
    def for_url(cls, url: str) -> FaultProxy:
        parsed = urlparse(url)
        return cls((parsed.hostname or "127.0.0.1", parsed.port or 0))

    def url(self, url: str) -> str:
        """``url`` rewritten to go through the proxy (same credentials and path)."""
        parsed = urlparse(url)
        userinfo = parsed.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunparse(parsed._replace(netloc=netloc))

    @property
    def connections(self) -> int:
        """Live forwarded connections (each counts its two sockets once)."""
        with self._lock:
            return len(self._live) // 2

    def cut(self, mode: str = "refuse", *, keep_live: bool = False) -> None:
        """Drop live connections (unless ``keep_live``); refuse (or blackhole) new ones until
        ``restore()``."""
        if mode not in ("refuse", "blackhole", "stall", "deaf", "mute"):
            raise ValueError(f"unknown cut mode {mode!r}")
        with self._lock:
            self._mode = mode
            if mode == "deaf":
                for client in self._live & self._clients:
                    client.shutdown(socket.SHUT_WR)
                return
            if keep_live or mode in ("stall", "mute"):
                return
            live, self._live = self._live, set()
        for sock in live:
            _drop(sock)

    def restore(self) -> None:
        """Forward new connections again; blackholed ones are reset."""
        with self._lock:
            broken = self._mode in ("stall", "deaf", "mute")
            self._mode = None
            held, self._held = self._held, []
            if broken:  # what they sent meanwhile is gone: their streams are broken
                held += self._live
                self._live = set()
        for sock in held:
            _drop(sock)

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(5)
        self._listener.close()
        self.cut()
        self.restore()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                mode = self._mode
                if mode in ("blackhole", "stall"):
                    self._held.append(client)
                    continue
            if mode == "refuse":
                _drop(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _drop(client)
                continue
            server.settimeout(None)
            with self._lock:
                if self._mode is not None:  # cut while connecting
                    _drop(client)
                    _drop(server)
                    continue
                self._live.update((client, server))
                self._clients.add(client)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if source not in self._live:  # cut: what was read is dropped
                        return
                    answer = sink in self._clients
                    if self._mode == "stall" or (self._mode in ("deaf", "mute") and answer):
                        continue
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                dropped = source in self._live
                self._live.discard(source)
                self._live.discard(sink)
                self._clients.discard(source)
                self._clients.discard(sink)
            if dropped:
                _drop(source)
                _drop(sink)


def _drop(sock: socket.socket) -> None:
    """Reset a connection (RST, not a clean FIN), waking any thread blocked on it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
