"""The admin HTTP endpoint: ``GET|HEAD /health``, ``/stats``, ``/metrics``, ``/describe``, ``/jobs/ID``;
``POST /clear``, ``/purge``, ``/delete``.

Invalidation (each a job on its own server thread; the answer is ``200`` with the result when it finished within a
few seconds, else ``202`` with its progress and ``GET /jobs/ID`` tells the rest):

* ``POST /clear``: drop L1 (no body, as before), or a JSON body ``{"l1": true, "l2": true}`` to clear L2 too;
* ``POST /purge`` with a JSON body ``{"model_name": M, "cache_salt": S}`` (either or both);
* ``POST /delete`` with ``{"keys": [{"model_name", "chunk_hash", "kv_rank", "cache_salt"}, ...]}``.

A salt goes in the body, never in the URL (URLs end up in proxies' and shells' logs); answers carry its digest.

Bound at start-up (a port in use is a ConfigError before the server serves anything). It only reads the Store's
stats and calls ``clear_l1``; it never touches tensor data. What keeps it safe on a port others can reach:

* **Token.** With ``admin_token`` set, every state-changing call (``POST``) needs ``Authorization: Bearer TOKEN``
  (compared in constant time); reads stay open for probes and scrapers. Without a token, ``POST /clear`` is open
  to whoever reaches the port (the server says so in its start-up log when it listens beyond loopback), as long
  as the request names this host by address, ``localhost`` or the machine's own name (no DNS rebinding).
* **No cross-origin writes.** A browser on any web page can send a ``POST`` to a local port; such a request
  carries ``Origin`` (and ``Sec-Fetch-Site``), so a ``POST`` whose origin is not this server is refused (403),
  token or not.
* **Bounded threads.** One accept thread waits (``selectors``) for each new connection's first bytes, so an idle
  connection holds no thread (it is closed after ``IO_TIMEOUT_S``); a connection with data goes to a fixed pool
  of ``threads`` workers through a bounded queue, and when both are full it gets ``503`` at once. One request
  per connection (``Connection: close``); each socket read waits at most ``IO_TIMEOUT_S`` and a whole request at
  most ``REQUEST_DEADLINE_S``, so a slow-dripping client holds a worker for seconds, not forever.
* **Input limits.** ``Content-Length`` must be digits (a negative or malformed value: 400 at once), a body at most
  ``MAX_BODY_BYTES`` (else 413, nothing read), no chunked bodies (411); the request line and headers are bounded
  by :mod:`http.server` (64 KiB a line, 100 headers).
* ``HEAD`` answers the headers a ``GET`` would (load-balancer probes), without a body.

Why the standard library and not a WSGI server such as waitress (evaluated: it too keeps idle connections off
its thread pool and parses HTTP strictly): stopping it from another thread, as a drain must, goes through its
private loop map, and it would be a dependency for four tiny endpoints; the accept loop above gives the same
guarantees that matter here (a fixed number of threads, idle connections on none, nothing held forever).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import queue
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from kvtier.errors import CapacityError, ConfigError, NotFoundError
from kvtier.server.logs import RateLimitedLog

log = logging.getLogger("kvtier.server.admin")
_log_refusal = RateLimitedLog(log)

#: Worker threads serving admin connections, and connections that may wait for one.
THREADS = 4
BACKLOG = 16
#: One socket read (request line, a header, the body) waits at most this long.
IO_TIMEOUT_S = 5.0
#: A whole request (from accept to the last byte of the answer) takes at most this long.
REQUEST_DEADLINE_S = 15.0
#: Connections accepted and waiting for their first bytes (they hold no thread); beyond this: 503.
MAX_WAITING = 256
#: The largest request body accepted (the endpoints take none; a small one is read and ignored).
MAX_BODY_BYTES = 64 << 10


class AdminHooks:
    """What the endpoints call; provided by the server."""

    def __init__(
        self,
        health: Callable[[], dict[str, Any]],
        stats: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        clear: Callable[[], dict[str, Any]],
        *,
        describe: Callable[[], dict[str, Any]] | None = None,
        invalidate: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
        job: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        self.health = health
        self.stats = stats
        self.metrics = metrics
        self.clear = clear
        #: the summary of ``kvtier describe``
        self.describe = describe
        #: start an invalidation (``op``: purge, delete, clear; ``params`` from the JSON body), return its job doc
        self.invalidate = invalidate
        #: a job's doc by id
        self.job = job


class _Handler(BaseHTTPRequestHandler):
    server: _AdminHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT_S  # socket timeout of every read and write
    server_version = "kvtier-admin"
    sys_version = ""

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc, default=str).encode() + b"\n", "application/json", headers)

    def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        # Once per status a minute: a client hammering the port with bad requests does not flood the log.
        _log_refusal(logging.INFO, f"http_{status}", "admin request refused", status=status, path=self.path[:200])
        self._json(status, {"error": message}, headers)

    def _route(self) -> None:
        method = self.command
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        hooks = self.server.hooks
        routes: dict[str, tuple[str, Callable[[], None]]] = {
            "/health": ("GET", lambda: self._json(200, hooks.health())),
            "/stats": ("GET", lambda: self._json(200, hooks.stats())),
            "/metrics": ("GET", lambda: self._send(200, hooks.metrics(), CONTENT_TYPE_LATEST)),
            "/clear": ("POST", self._clear),
        }
        if hooks.describe is not None:
            describe = hooks.describe
            routes["/describe"] = ("GET", lambda: self._json(200, describe()))
        if hooks.invalidate is not None:
            routes["/purge"] = ("POST", lambda: self._invalidate("purge"))
            routes["/delete"] = ("POST", lambda: self._invalidate("delete"))
        if hooks.job is not None and path.startswith("/jobs/"):
            routes[path] = ("GET", lambda: self._job(path.removeprefix("/jobs/")))
        self.body = b""
        if not self._read_body():
            return
        if path not in routes:
            self._refuse(
                404,
                f"no endpoint {path[:100]}; try /health, /stats, /metrics, /describe, /jobs/ID, POST /clear, "
                "/purge, /delete",
            )
            return
        allowed, action = routes[path]
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            allow = "GET, HEAD" if allowed == "GET" else allowed
            self._refuse(405, f"{path} takes {allow}", {"Allow": allow})
            return
        if allowed == "POST" and not self._may_change_state():
            return
        try:
            action()
        except Exception as exc:
            log.exception("admin endpoint failed", extra={"fields": {"path": path}})
            self._json(500, {"error": f"{type(exc).__name__}"})

    def _read_body(self) -> bool:
        """Read (and drop) the request body within the limits; False when the request was refused."""
        if self.headers.get("Transfer-Encoding"):
            self._refuse(411, "chunked bodies are not accepted; send Content-Length")
            return False
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return True
        text = values[0].strip()
        if len(set(values)) != 1 or not text.isdigit() or not text.isascii():
            self._refuse(400, "Content-Length must be one non-negative decimal number")
            return False
        length = int(text)
        if length > MAX_BODY_BYTES:
            self._refuse(413, f"request body over {MAX_BODY_BYTES} bytes")
            return False
        if length:
            self.body = self.rfile.read(length)  # bounded by the deadline and the io timeout
        return True

    def _params(self) -> dict[str, Any] | None:
        """The JSON object of the body (``{}`` when empty); None when refused (400 sent)."""
        if not self.body.strip():
            return {}
        try:
            doc = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            self._refuse(400, "the body must be a JSON object")
            return None
        if not isinstance(doc, dict):
            self._refuse(400, "the body must be a JSON object")
            return None
        return doc

    def _clear(self) -> None:
        hooks = self.server.hooks
        params = self._params()
        if params is None:
            return
        if not params or hooks.invalidate is None:  # the original POST /clear: L1 only, at once
            self._json(200, hooks.clear())
            return
        self._invalidate("clear", params)

    def _invalidate(self, op: str, params: dict[str, Any] | None = None) -> None:
        hooks = self.server.hooks
        assert hooks.invalidate is not None
        if params is None:
            params = self._params()
            if params is None:
                return
        try:
            doc = hooks.invalidate(op, params)
        except (ConfigError, ValueError, TypeError, KeyError) as exc:
            self._refuse(400, f"{type(exc).__name__}: {exc}")  # the hook's messages never quote a salt
            return
        except CapacityError as exc:
            self._refuse(503, str(exc), {"Retry-After": "5"})
            return
        self._json(200 if doc.get("done") else 202, doc)

    def _job(self, text: str) -> None:
        hooks = self.server.hooks
        assert hooks.job is not None
        if not text.isdigit() or not text.isascii():
            self._refuse(404, "job ids are numbers")
            return
        try:
            self._json(200, hooks.job(int(text)))
        except NotFoundError as exc:
            self._refuse(404, str(exc))

    def _may_change_state(self) -> bool:
        """The checks of a state-changing call: same origin, and the token when one is configured."""
        origin = self.headers.get("Origin")
        site = self.headers.get("Sec-Fetch-Site")
        host = self.headers.get("Host", "")
        if site is not None and site not in ("same-origin", "none"):
            self._refuse(403, "cross-site requests may not change state")
            return False
        if origin is not None and origin.split("://", 1)[-1] != host:
            self._refuse(403, "cross-origin requests may not change state")
            return False
        token = self.server.token
        if token is None and not _trusted_host(host):
            # Without a token, a name that resolves to this machine could be an attacker's (DNS rebinding: a
            # page of evil.example re-resolved to 127.0.0.1 is "same origin" with itself).
            self._refuse(403, "state-changing calls without an admin token must name this host by address")
            return False
        if token is not None:
            given = self.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                self._refuse(
                    401, "this call needs 'Authorization: Bearer <admin token>'", {"WWW-Authenticate": "Bearer"}
                )
                return False
        return True

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_PUT(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()

    def do_PATCH(self) -> None:
        self._route()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format % args)


def _trusted_host(host_header: str) -> bool:
    """Whether a ``Host`` header names this machine by an IP literal, ``localhost`` or its own host name."""
    host = host_header.strip()
    if host.startswith("["):  # [IPv6]:port
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return host.lower() in {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}


class _AdminHTTPServer(socketserver.TCPServer):
    """A TCP server whose connections are served by a fixed pool of threads (see the module docstring)."""

    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], hooks: AdminHooks, token: str | None, threads: int) -> None:
        self.hooks = hooks
        self.token = token
        self._queue: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(maxsize=BACKLOG)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, name=f"kvtier-admin-{i}", daemon=True) for i in range(threads)
        ]
        self._reaper = threading.Thread(target=self._reap, name="kvtier-admin-reaper", daemon=True)
        self._closed = threading.Event()
        self._stopped = threading.Event()
        super().__init__(address, _Handler)  # binds; on failure it calls server_close(), which needs the above

    def start_workers(self) -> None:
        for worker in self._workers:
            worker.start()
        self._reaper.start()

    def run(self) -> None:
        """The accept loop (until :meth:`stop`): a connection waits here, holding no thread, until its first bytes
        arrive (at most ``IO_TIMEOUT_S``); only then is it handed to a worker. Idle connections therefore cost a
        file descriptor each (at most ``MAX_WAITING``), never a thread."""
        waiting: dict[Any, tuple[float, Any]] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ, None)
            try:
                while not self._closed.is_set():
                    for key, _ in selector.select(0.2):
                        if key.data is None:
                            self._accept(selector, waiting)
                            continue
                        conn = key.fileobj
                        assert isinstance(conn, socket.socket)  # only accepted sockets are registered with data
                        selector.unregister(conn)
                        _, address = waiting.pop(conn)
                        self._dispatch(conn, address)
                    now = time.monotonic()
                    for conn, (since, _) in list(waiting.items()):
                        if now - since > IO_TIMEOUT_S:
                            selector.unregister(conn)
                            del waiting[conn]
                            self.shutdown_request(conn)
            finally:
                for conn in waiting:
                    self.shutdown_request(conn)
                self._stopped.set()

    def stop(self) -> None:
        """Ask :meth:`run` to return and wait until it has (it polls every 0.2 s)."""
        self._closed.set()
        self._stopped.wait(5.0)

    def _accept(self, selector: selectors.BaseSelector, waiting: dict[Any, tuple[float, Any]]) -> None:
        try:
            conn, address = self.socket.accept()
        except OSError:
            return
        if len(waiting) >= MAX_WAITING:
            self._busy(conn)
            return
        waiting[conn] = (time.monotonic(), address)
        selector.register(conn, selectors.EVENT_READ, address)

    def _dispatch(self, conn: socket.socket, address: Any) -> None:
        """Hand a connection with data to a worker, or answer 503 when every worker and queue slot is taken."""
        try:
            self._queue.put_nowait((conn, address))
        except queue.Full:
            self._busy(conn)

    def _busy(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(1.0)
            conn.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
            )
        self.shutdown_request(conn)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, client_address = item
            with self._deadlines_lock:
                self._deadlines[request] = time.monotonic() + REQUEST_DEADLINE_S
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                with self._deadlines_lock:
                    self._deadlines.pop(request, None)
                self.shutdown_request(request)

    def _reap(self) -> None:
        """Cut connections past their deadline (a client that drips one byte per timeout would hold a worker
        forever otherwise): shutting the socket down ends the worker's blocked read at once."""
        while not self._closed.wait(0.5):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [s for s, deadline in self._deadlines.items() if deadline < now]
            for sock in late:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("admin connection failed", exc_info=True)

    def server_close(self) -> None:
        self._closed.set()
        for worker in self._workers:
            if worker.is_alive():
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(None)
        super().server_close()


class AdminServer:
    """Binds at construction, serves on daemon threads after :meth:`start`, stops with :meth:`close`.

    ``token``: required by state-changing calls when not None. ``threads``: the worker pool's size.
    """

    def __init__(
        self, host: str, port: int, hooks: AdminHooks, *, token: str | None = None, threads: int = THREADS
    ) -> None:
        try:
            self._httpd = _AdminHTTPServer((host, port), hooks, token, threads)
        except OSError as exc:
            raise ConfigError(
                f"http_port: cannot listen on {host}:{port} ({exc.strerror}); expected a free TCP port"
            ) from exc
        self._thread = threading.Thread(target=self._httpd.run, name="kvtier-admin", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._httpd.start_workers()
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.stop()
        self._httpd.server_close()
