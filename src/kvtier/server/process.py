"""Run a ``kvtier server`` in a subprocess: for tests, benchmarks and scripts that need a real server.

    with ServerProcess(["--l1-size-gb", "1"]) as server:
        with kvtier.Client(server.address) as client:
            ...

The ports are picked free at start (``port`` / ``http_port``); ``start`` waits until the server answers a health
request, or raises with the server's stderr when it exits first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

from kvtier.errors import KVTierError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcessError(KVTierError, RuntimeError):
    """The server subprocess exited or did not become ready."""


class ServerProcess:
    """A ``kvtier server`` subprocess on free ports; ``args`` are extra flags (``--l1-size-gb`` is required)."""

    def __init__(
        self,
        args: Sequence[str] = ("--l1-size-gb", "0.25"),
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        http_port: int | None = None,
        ready_timeout_s: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.args = list(args)
        self.ready_timeout_s = ready_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr_path = ""

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "kvtier.cli",
            "server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            *self.args,
        ]

    def start(self) -> ServerProcess:
        import tempfile

        log = tempfile.NamedTemporaryFile(prefix="kvtier-server-", suffix=".log", delete=False)  # noqa: SIM115
        self._stderr_path = log.name
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=log, env=self.env)
        log.close()
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerProcessError(f"kvtier server exited with {self.proc.returncode}: {self.stderr()}")
            try:
                self.get("/health", timeout=1.0)
                return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise ServerProcessError(f"kvtier server not ready within {self.ready_timeout_s} s: {self.stderr()}")

    def get(self, path: str, timeout: float = 5.0) -> Any:
        """GET an admin endpoint; JSON is decoded, other bodies returned as text."""
        with urllib.request.urlopen(self.http_url + path, timeout=timeout) as resp:
            body = resp.read().decode()
            if resp.headers.get_content_type() == "application/json":
                return json.loads(body)
            return body

    def post(self, path: str, timeout: float = 5.0, token: str | None = None) -> Any:
        """POST to an admin endpoint (with ``Authorization: Bearer token`` when given); the JSON answer."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(self.http_url + path, data=b"", method="POST", headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode())

    def stderr(self) -> str:
        """What the server has logged so far."""
        try:
            with open(self._stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServerProcessError(f"kvtier server did not exit within {timeout_s} s of {sig}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            self.kill()
            if self._stderr_path:
                with contextlib.suppress(OSError):
                    os.unlink(self._stderr_path)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
