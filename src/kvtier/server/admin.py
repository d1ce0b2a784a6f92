"""The admin HTTP endpoint: ``GET /health``, ``GET /stats``, ``GET /metrics``, ``POST /clear``.

A ``ThreadingHTTPServer`` on its own daemon threads, bound at start-up (a port in use is a ConfigError before the
server serves anything). It only reads the Store's stats and calls ``clear_l1``; it never touches tensor data.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from kvtier.errors import ConfigError

log = logging.getLogger("kvtier.server.admin")


class AdminHooks:
    """What the endpoints call; provided by the server."""

    def __init__(
        self,
        health: Callable[[], dict[str, Any]],
        stats: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        clear: Callable[[], dict[str, Any]],
    ) -> None:
        self.health = health
        self.stats = stats
        self.metrics = metrics
        self.clear = clear


class _Handler(BaseHTTPRequestHandler):
    server: _AdminHTTPServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc, default=str).encode() + b"\n", "application/json")

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        hooks = self.server.hooks
        routes: dict[str, tuple[str, Callable[[], None]]] = {
            "/health": ("GET", lambda: self._json(200, hooks.health())),
            "/stats": ("GET", lambda: self._json(200, hooks.stats())),
            "/metrics": ("GET", lambda: self._send(200, hooks.metrics(), CONTENT_TYPE_LATEST)),
            "/clear": ("POST", lambda: self._json(200, hooks.clear())),
        }
        if path not in routes:
            self._json(404, {"error": f"no endpoint {path}; try /health, /stats, /metrics, POST /clear"})
            return
        allowed, action = routes[path]
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            self.send_response(405)
            self.send_header("Allow", allowed)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            action()
        except Exception as exc:
            log.exception("admin endpoint failed", extra={"fields": {"path": path}})
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 20))  # the body is ignored; read it so keep-alive stays in sync
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format % args)


class _AdminHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hooks: AdminHooks) -> None:
        self.hooks = hooks
        super().__init__(address, _Handler)


class AdminServer:
    """Binds at construction, serves on a daemon thread after :meth:`start`, stops with :meth:`close`."""

    def __init__(self, host: str, port: int, hooks: AdminHooks) -> None:
        try:
            self._httpd = _AdminHTTPServer((host, port), hooks)
        except OSError as exc:
            raise ConfigError(
                f"http_port: cannot listen on {host}:{port} ({exc.strerror}); expected a free TCP port"
            ) from exc
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kvtier-admin", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
