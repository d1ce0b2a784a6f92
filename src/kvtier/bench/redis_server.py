"""A throwaway local ``redis-server`` on a free loopback port: for ``kvtier bench ... --adapter redis`` without
``--url``, and for the tests (which use a real server, never a mock).

The server keeps no data on disk (``save ""``, no AOF) and runs in a temporary directory; :meth:`stop` kills it
(``SIGKILL`` when asked: a crash, as the fault tests need) and :meth:`start` brings it back on the same port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


def find_redis_server() -> str | None:
    """The ``redis-server`` binary on ``PATH`` (or in ``/usr/bin``, ``/usr/sbin``), or ``None``."""
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin:/usr/local/bin")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalRedis:
    """``redis-server`` on ``127.0.0.1:port`` with ``extra`` config directives (e.g. ``["maxmemory", "2mb"]``)."""

    def __init__(self, extra: list[str] | None = None, binary: str | None = None) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.binary = found
        self.extra = list(extra or [])
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="kvtier-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self._dir.name, "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"]
        for i in range(0, len(self.extra), 2):
            args += [f"--{self.extra[i]}", *self.extra[i + 1 : i + 2]]
        log = (Path(self._dir.name) / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
                return reply.startswith((b"+PONG", b"-NOAUTH"))  # a server with requirepass answers too
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop the server: ``SIGTERM`` and wait, or ``SIGKILL`` (a crash) when ``kill``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self) -> str:
        path = Path(self._dir.name) / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()
