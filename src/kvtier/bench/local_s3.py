"""A private S3 endpoint on loopback for tests and ``kvtier bench l2 --adapter object_store``: moto's standalone
server (``python -m moto.server``, from the ``moto[server]`` package of the dev extra) on a free port.

moto keeps everything in memory and forgets it when stopped: :meth:`LocalS3.start` creates the bucket again
(a plain unsigned ``PUT /BUCKET``, which moto accepts without credentials unless its IAM check is switched on).
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import socket
import subprocess
import sys
import time

#: credentials moto accepts (it checks none unless ``INITIAL_NO_AUTH_ACTION_COUNT`` is set)
TEST_CREDENTIALS = {"access_key_id": "testing-key-id", "secret_access_key": "testing-secret-value"}


def moto_available() -> bool:
    """Whether ``moto[server]`` is installed (its server needs flask and werkzeug besides moto)."""
    return all(importlib.util.find_spec(m) is not None for m in ("moto", "flask", "werkzeug"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalS3:
    """``python -m moto.server`` on ``127.0.0.1:<free port>``; stop and start again on the same port."""

    def __init__(self, bucket: str | None = "kvtier", env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self._env = env or {}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> LocalS3:
        """Start the server, wait until it accepts connections, create the bucket (when one is named)."""
        if not moto_available():
            raise RuntimeError("moto[server] is not installed: pip install 'moto[server]'")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **self._env},
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.05)
        if self.bucket:
            self.create_bucket(self.bucket)
        return self

    def create_bucket(self, name: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("PUT", f"/{name}", headers={"Content-Length": "0"})
            resp = conn.getresponse()
            resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"moto: creating bucket {name!r} answered {resp.status}")
        finally:
            conn.close()

    def stop(self) -> None:
        """Kill the server (no clean shutdown: the tests want an endpoint that vanishes)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    def options(self) -> dict[str, str]:
        """The adapter's ``options`` for this endpoint."""
        return {**TEST_CREDENTIALS, "endpoint": self.endpoint, "region": "us-east-1"}

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
