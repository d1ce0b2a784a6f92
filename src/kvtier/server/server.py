"""The kvtier server: a ZeroMQ ROUTER in front of worker threads that call one embedded Store.

Threads and sockets::

    clients (DEALER) ──tcp──> ROUTER ── I/O thread ── tasks queue ──> worker threads ──> Store
                                 ^                                         |
                                 └──── I/O thread <── inproc PULL <── PUSH (one per worker)

* The **I/O thread** (the thread that calls :meth:`Server.serve_forever`, normally the main thread) owns the
  ROUTER: it reads requests, rejects oversized ones at once, queues the rest and sends the replies workers hand
  back. ZeroMQ sockets are not thread-safe, so only this thread touches the ROUTER. When the task queue is full it
  stops reading, and ZeroMQ's buffers push back on clients.
* **Workers** decode, validate and serve requests (:class:`RequestHandler`). A malformed, truncated, oversized
  or wrong-version message gets an :class:`~kvtier.server.protocol.ErrorReply`; no exception escapes a worker.
* **Shutdown** (SIGTERM / SIGINT or :meth:`Server.stop`): stop queueing requests, let workers finish the ones
  queued and send their replies, then ``Store.close()`` flushes pending L2 writes, so nothing acknowledged is
  lost, and the process exits 0. Requests that arrive meanwhile are answered ``shutting_down`` at once (the
  client raises ServerUnavailableError and can fail over) instead of being left to time out.
* **Errors** never leave a traceback per message: refused requests (``protocol``, ``too_large``, ...) and
  internal failures are logged at most once per kind per minute (:class:`RateLimitedLog`); salts appear in these
  logs only as digests and the config's secrets not at all.
* **Heartbeats** on the ROUTER drop connections whose client stopped answering (a host gone); clients set their
  own, so they notice a server that has gone (see :mod:`kvtier.client`).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Any, Protocol

import torch
import zmq
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier import __version__
from kvtier.config import scrub, scrub_tree
from kvtier.errors import ConfigError
from kvtier.events import EventPublisher
from kvtier.server import protocol as p
from kvtier.server.admin import AdminHooks, AdminServer
from kvtier.server.config import ServerConfig
from kvtier.server.jobs import Job, Jobs, Progress
from kvtier.server.logs import RateLimitedLog, fields
from kvtier.server.metrics import ServerMetrics
from kvtier.server.shm import RegionTable, align_up
from kvtier.storage.copy import copy_into
from kvtier.types import ObjectKey, salt_digest

log = logging.getLogger("kvtier.server")
#: The GIL switch interval the server runs with (CPython's default is 5 ms).
SWITCH_INTERVAL_S = 0.0005
#: ZeroMQ heartbeats on the server's connections: a client that stops answering for this long is dropped, so a
#: vanished host's connection (and its routing state) does not live forever.
HEARTBEAT_IVL_MS = 5000
HEARTBEAT_TIMEOUT_MS = 15000


_SALT_CHARS = r"A-Za-z0-9._+:=\-"


def _request_salts(request: Any) -> set[str]:
    """The ``cache_salt`` values a decoded request carries (none when it did not decode)."""
    salts: set[str] = set()
    salt = getattr(request, "cache_salt", None)
    if isinstance(salt, str):
        salts.add(salt)
    for key in getattr(request, "keys", None) or ():
        if isinstance(getattr(key, "cache_salt", None), str):
            salts.add(key.cache_salt)
    return {s for s in salts if s}


def hide_salts(text: str, salts: set[str]) -> str:
    """``text`` with each salt of ``salts`` (as written, or as ``repr`` quotes it) replaced by a short digest, so
    that logs can still tell tenants apart without holding their raw salts."""
    for salt in sorted(salts, key=len, reverse=True):
        digest = "salt#" + salt_digest(salt)  # the same keyed digest that names the salt's records
        for form in {salt, repr(salt)[1:-1]}:
            pattern = rf"(?<![{_SALT_CHARS}]){re.escape(form)}(?![{_SALT_CHARS}])"
            text = re.sub(pattern, digest, text)
    return text


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class StoreLike(Protocol):
    """The part of ``kvtier.Store`` the server uses."""

    def keys_for_tokens(self, model_name: str, token_ids: Sequence[int], cache_salt: str = "") -> list[ObjectKey]: ...
    def store(self, keys: Sequence[ObjectKey], tensors: Sequence[torch.Tensor]) -> None: ...
    def lookup(self, keys: Sequence[ObjectKey]) -> int: ...
    def retrieve(self, keys: Sequence[ObjectKey]) -> list[torch.Tensor | None]: ...
    def retrieve_into(
        self, keys: Sequence[ObjectKey], outs: Sequence[torch.Tensor], *, after: Callable[[], None] | None = None
    ) -> int: ...
    def clear_l1(self) -> None: ...
    def delete(self, keys: Sequence[ObjectKey]) -> int: ...
    def purge(
        self, model_name: str | None = None, cache_salt: str | None = None, *, progress: Progress | None = None
    ) -> dict[str, Any]: ...
    def clear(self, *, l1: bool = True, l2: bool = False, progress: Progress | None = None) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


_OP_NAMES = {cls: str(cls.__struct_config__.tag) for cls in p.Request.__args__}


def _frame_tensor(frame: zmq.Frame, meta: p.Meta) -> torch.Tensor:
    """A tensor viewing a received frame's bytes (no copy); checked against the announced size."""
    nbytes = meta.nbytes()
    if len(frame) != nbytes:
        raise p.ProtocolError(f"data frame has {len(frame)} bytes, its meta {meta} needs {nbytes}")
    dtype = meta.torch_dtype()
    if nbytes == 0:
        return torch.empty(meta.shape, dtype=dtype)
    return torch.frombuffer(frame.buffer, dtype=torch.uint8).view(dtype).view(meta.shape)


def _tensor_frame(tensor: torch.Tensor) -> Any:
    """The bytes of a tensor as a buffer ZeroMQ can send without copying (kept alive by pyzmq until sent)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


class RequestHandler:
    """Serves one decoded request at a time per calling thread; shared by all workers.

    ``serialize_store``: when True every Store call runs under one lock (for a Store that is not thread-safe).
    """

    def __init__(
        self,
        store: StoreLike,
        config: ServerConfig,
        metrics: ServerMetrics,
        regions: RegionTable,
        serialize_store: bool,
        *,
        secrets: Sequence[str] = (),
    ) -> None:
        self.events: EventPublisher | None = None  # set by the Server when it publishes KV events
        self.store = store
        self.secrets = tuple(secrets)
        self.config = config
        self.metrics = metrics
        self.regions = regions
        self._store_lock: AbstractContextManager[Any] = threading.Lock() if serialize_store else nullcontext()
        self.started = time.time()
        self.log_error = RateLimitedLog(log)
        self.jobs = Jobs()

    # -- entry point --------------------------------------------------------------------------------------------
    def handle(self, frames: Sequence[zmq.Frame], owner: bytes = b"") -> list[Any]:
        """Reply frames for the request ``frames`` (header first) from connection ``owner``. Never raises.

        ``owner`` is the client's ZeroMQ routing id: shared-memory regions belong to the connection that
        registered them, and no other connection can name them.
        """
        start = time.perf_counter()
        request_id, op, outcome = 0, "invalid", "ok"
        request: Any = None
        try:
            env = p.decode_envelope(frames[0].buffer)
            request_id = env.id
            request = p.decode_request(env)
            op = _OP_NAMES[type(request)]
            reply, data = self._dispatch(request, frames[1:], owner)
        except Exception as exc:
            outcome = p.error_kind(exc)
            if outcome == "internal":
                self.log_error(logging.ERROR, f"internal:{type(exc).__name__}", "request failed", exc_info=True, op=op)
                message = f"{type(exc).__name__}: the server failed to serve this request (see its log)"
            else:
                message = scrub(f"{type(exc).__name__}: {exc}", self.secrets)
                # The reply goes to the client that sent the request; the log is for the operator, who sees
                # tenants' salts only as digests.
                logged = hide_salts(message, _request_salts(request))
                self.log_error(logging.INFO, outcome, "request rejected", op=op, error=logged)
            reply, data = p.ErrorReply(outcome, message), []
        try:
            header = p.encode(request_id, reply)
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. a stats value msgpack cannot carry
            self.log_error(logging.ERROR, "encode", "reply could not be encoded", exc_info=True, op=op)
            outcome, data = "internal", []
            header = p.encode(request_id, p.ErrorReply("internal", f"reply could not be encoded: {exc}"))
        self.metrics.observe(op, time.perf_counter() - start, outcome)
        return [header, *data]

    def _dispatch(self, request: Any, data: Sequence[zmq.Frame], owner: bytes) -> tuple[Any, list[Any]]:
        if not isinstance(request, p.Store) and data:
            raise p.ProtocolError(f"{_OP_NAMES[type(request)]} takes no data frames, got {len(data)}")
        match request:
            case p.Hello():
                return p.HelloReply(__version__, self.config.chunk_size, self.config.max_message_bytes, os.getpid()), []
            case p.Register(pid=pid, fd=fd, size=size, token=token):
                region, reason = self.regions.register(owner, pid, fd, size, token)
                if region < 0:
                    self.log_error(logging.INFO, "shm_refused", "shared memory refused", pid=pid, reason=reason)
                return p.RegisterReply(region, reason), []
            case p.Unregister(regions=ids):
                self.regions.unregister(owner, ids)
                return p.OkReply(), []
            case p.Store():
                return self._store(request, data, owner), []
            case p.Lookup(keys=wire_keys):
                keys = [k.to_key() for k in wire_keys]
                with self._store_lock:
                    return p.CountReply(self.store.lookup(keys)), []
            case p.LookupTokens() | p.KeysForTokens():
                keys = self._token_keys(request)
                if isinstance(request, p.KeysForTokens):
                    return p.KeysReply([p.WireKey.of(k) for k in keys]), []
                with self._store_lock:
                    return p.CountReply(self.store.lookup(keys) * self.config.chunk_size), []
            case p.Retrieve():
                return self._retrieve(request, owner)
            case p.ClearL1():
                with self._store_lock:
                    self.store.clear_l1()
                log.info("L1 cleared", extra=fields(via="protocol"))
                return p.OkReply(), []
            case p.Invalidate():
                job = self.invalidate(
                    request.op,
                    model_name=request.model_name,
                    cache_salt=request.cache_salt,
                    keys=request.keys,
                    l1=request.l1,
                    l2=request.l2,
                )
                return self.job_reply(job, request.wait_s), []
            case p.JobStatus(job=job_id, wait_s=wait_s):
                return self.job_reply(self.jobs.get(job_id), wait_s), []
            case p.Describe():
                return p.StatsReply(self.describe()), []
            case p.Stats():
                return p.StatsReply(self.stats()), []
            case p.Health():
                return p.StatsReply(self.health()), []
        raise p.ProtocolError(f"unhandled request {type(request).__name__}")  # pragma: no cover - union is closed

    # -- operations ---------------------------------------------------------------------------------------------
    def _token_keys(self, request: p.LookupTokens | p.KeysForTokens) -> list[ObjectKey]:
        keys = self.store.keys_for_tokens(request.model_name, request.token_ids, cache_salt=request.cache_salt)
        if request.kv_rank:
            keys = [ObjectKey(k.model_name, k.chunk_hash, request.kv_rank, k.cache_salt) for k in keys]
        return keys

    def _store(self, request: p.Store, data: Sequence[zmq.Frame], owner: bytes) -> p.OkReply:
        keys = [k.to_key() for k in request.keys]
        if len(request.metas) != len(keys):
            raise p.ProtocolError(f"store: {len(keys)} keys but {len(request.metas)} metas")
        if request.locs is None:
            if len(data) != len(keys):
                raise p.ProtocolError(f"store: {len(keys)} keys but {len(data)} data frames")
            tensors = [_frame_tensor(f, m) for f, m in zip(data, request.metas, strict=True)]
            with self._store_lock:
                self.store.store(keys, tensors)
            self.metrics.bytes.labels("in", "frames").inc(sum(len(f) for f in data))
            return p.OkReply()
        if data or len(request.locs) != len(keys):
            raise p.ProtocolError(f"store: {len(keys)} keys, {len(request.locs)} locs and {len(data)} data frames")
        with _Pinned(self.regions, owner) as pinned:
            tensors = [pinned.view(loc, meta) for loc, meta in zip(request.locs, request.metas, strict=True)]
            with self._store_lock:
                self.store.store(keys, tensors)
        self.metrics.bytes.labels("in", "shm").inc(sum(loc.nbytes for loc in request.locs))
        return p.OkReply()

    def _retrieve(self, request: p.Retrieve, owner: bytes) -> tuple[Any, list[Any]]:
        keys = [k.to_key() for k in request.keys]
        if request.locs is not None or request.metas is not None:
            # retrieve_into: the client's regions are the destinations; the Store writes straight into them.
            if (
                request.locs is None
                or request.metas is None
                or not len(request.locs) == len(request.metas) == len(keys)
            ):
                raise p.ProtocolError("retrieve into: keys, metas and locs must all be given, of one length")
            pinned = _Pinned(self.regions, owner)
            try:
                outs = [pinned.view(loc, meta) for loc, meta in zip(request.locs, request.metas, strict=True)]
            except BaseException:
                pinned.close()
                raise
            # The Store may still copy L2 hits out of these regions into L1 after it returned (its backfill): they
            # stay pinned (mapped) until it calls ``after``, which it does exactly once, even when it raises.
            with self._store_lock:
                hits = self.store.retrieve_into(keys, outs, after=pinned.close)
            self.metrics.bytes.labels("out", "shm").inc(sum(loc.nbytes for loc in request.locs[:hits]))
            return p.CountReply(hits), []
        with self._store_lock:
            found = self.store.retrieve(keys)
        tensors: list[torch.Tensor] = []
        for t in found:
            if t is None:
                break
            tensors.append(t)
        metas = [p.Meta.of(t) for t in tensors]
        sizes = [t.numel() * t.element_size() for t in tensors]
        staging = request.staging
        if staging is not None and sum(align_up(n) for n in sizes) <= staging.nbytes:
            locs: list[p.Loc] = []
            offset = staging.offset
            with _Pinned(self.regions, owner) as pinned:
                for t, meta, n in zip(tensors, metas, sizes, strict=True):
                    loc = p.Loc(staging.region, offset, n)
                    copy_into(pinned.view(loc, meta), t)  # one thread's memcpy: torch's 2 threads crawl on a busy host
                    locs.append(loc)
                    offset += align_up(n)
            self.metrics.bytes.labels("out", "shm").inc(sum(sizes))
            return p.TensorsReply(metas, locs), []
        self.metrics.bytes.labels("out", "frames").inc(sum(sizes))
        return p.TensorsReply(metas, None), [_tensor_frame(t) for t in tensors]

    # -- invalidation (runs as jobs, off the request loop) ---------------------------------------------------------
    def invalidate(
        self,
        op: str,
        *,
        model_name: str | None = None,
        cache_salt: str | None = None,
        keys: Sequence[p.WireKey] = (),
        l1: bool = True,
        l2: bool = False,
    ) -> Job:
        """Check an invalidation request and start it as a job (see :mod:`kvtier.server.jobs`)."""
        store = self.store
        if op == "purge":
            if model_name is None and cache_salt is None:
                raise ConfigError("purge: give model_name, cache_salt or both")
            if model_name is not None:
                ObjectKey(model_name, "0")  # checks the name (ConfigError names the field)
            if cache_salt is not None and not isinstance(cache_salt, str):
                raise ConfigError("cache_salt: expected a string")
            what: dict[str, Any] = {"op": op, "model_name": model_name}
            if cache_salt is not None:
                what["salt_digest"] = salt_digest(cache_salt)  # never the salt itself

            def run(progress: Progress) -> dict[str, Any]:
                with self._store_lock:
                    return store.purge(model_name=model_name, cache_salt=cache_salt, progress=progress)

        elif op == "delete":
            object_keys = [k.to_key() for k in keys]
            what = {"op": op, "keys": len(object_keys)}

            def run(progress: Progress) -> dict[str, Any]:
                with self._store_lock:
                    return {"deleted": store.delete(object_keys)}

        elif op == "clear":
            if not l1 and not l2:
                raise ConfigError("clear: nothing to clear (l1 and l2 both false)")
            what = {"op": op, "clear_l1": l1, "clear_l2": l2}

            def run(progress: Progress) -> dict[str, Any]:
                with self._store_lock:
                    return store.clear(l1=l1, l2=l2, progress=progress)

        else:
            raise ConfigError(f"invalidate: op must be purge, delete or clear, got {op[:40]!r}")
        log.info("invalidation started", extra=fields(**what))
        return self.jobs.start(what, run)

    def job_reply(self, job: Job, wait_s: float) -> p.JobReply:
        done = self.jobs.wait(job, wait_s)
        return p.JobReply(
            job.id, done, self.scrub_doc(dict(job.progress)), self.scrub_doc(job.result or {}) if done else None
        )

    def job_doc(self, job: Job, wait_s: float) -> dict[str, Any]:
        reply = self.job_reply(job, wait_s)
        return {"job": reply.job, "done": reply.done, "progress": reply.progress, "result": reply.result}

    def http_invalidate(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        """``POST /purge``, ``/delete``, ``/clear`` with a JSON body: check its fields (naming a wrong one), start
        the job and wait a few seconds for it."""
        allowed = {"purge": {"model_name", "cache_salt"}, "delete": {"keys"}, "clear": {"l1", "l2"}}[op]
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(f"{op}: unknown field(s) {unknown}; expected {sorted(allowed)}")
        for name in ("model_name", "cache_salt"):
            if params.get(name) is not None and not isinstance(params[name], str):
                raise ConfigError(f"{name}: expected a string")  # never echo the value: it may be a salt
        for name in ("l1", "l2"):
            if name in params and not isinstance(params[name], bool):
                raise ConfigError(f"{name}: expected true or false")
        keys: list[p.WireKey] = []
        if op == "delete":
            raw = params.get("keys")
            if not isinstance(raw, list):
                raise ConfigError("keys: expected a list of {model_name, chunk_hash, kv_rank, cache_salt}")
            for i, k in enumerate(raw):
                if not isinstance(k, dict) or not isinstance(k.get("model_name"), str):
                    raise ConfigError(f"keys[{i}]: expected an object with model_name and chunk_hash")
                salt = k.get("cache_salt", "")
                if not isinstance(salt, str):
                    raise ConfigError(f"keys[{i}].cache_salt: expected a string")
                keys.append(p.WireKey(k["model_name"], str(k.get("chunk_hash", "")), int(k.get("kv_rank", 0)), salt))
        job = self.invalidate(
            op,
            model_name=params.get("model_name"),
            cache_salt=params.get("cache_salt"),
            keys=keys,
            l1=params.get("l1", True),
            l2=params.get("l2", False),
        )
        return self.job_doc(job, 5.0)

    def describe(self) -> dict[str, Any]:
        """The operator's summary: tiers with capacity, usage and hit rate, top models and salt digests by bytes."""
        stats = self._stats()
        st = stats["store"]
        l1 = st.get("l1", {})
        lookups = l1.get("hits", 0) + l1.get("misses", 0)
        tiers = [
            {
                "tier": "L1",
                "kind": f"memory ({l1.get('backing', '?')})",
                "capacity_bytes": l1.get("capacity_bytes"),
                "used_bytes": l1.get("used_bytes"),
                "objects": l1.get("objects"),
                "hits": l1.get("hits", 0),
                "hit_rate": _rate(l1.get("hits", 0), lookups),
            }
        ]
        l2_hits = 0
        for i, t in enumerate(st.get("l2", [])):
            tried = t.get("hits", 0) + t.get("misses", 0)
            l2_hits += t.get("hits", 0)
            tiers.append(
                {
                    "tier": f"L2[{i}]",
                    "kind": t.get("type", "?") + (f"+{t['serde']}" if t.get("serde") not in (None, "none") else ""),
                    "capacity_bytes": t.get("capacity_bytes"),
                    "used_bytes": t.get("used_bytes"),
                    "objects": t.get("records"),
                    "hits": t.get("hits", 0),
                    "hit_rate": _rate(t.get("hits", 0), tried),
                }
            )
        return self.scrub_doc(
            {
                "server": {
                    "version": __version__,
                    "pid": os.getpid(),
                    "uptime_s": stats["server"]["uptime_s"],
                    "chunk_size": self.config.chunk_size,
                },
                "tiers": tiers,
                "hit_rate": _rate(l1.get("hits", 0) + l2_hits, lookups),
                "top_models": _top(l1.get("models"), "model_name"),
                "top_salts": _top(l1.get("tenants"), "salt_digest"),
                "invalidations_running": self.jobs.running(),
            }
        )

    # -- documents ------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "protocol": p.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
        }

    def scrub_doc(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` without any secret of the config (a stats value may quote a URL or an error message)."""
        scrubbed: dict[str, Any] = scrub_tree(doc, self.secrets)
        return scrubbed

    def stats(self) -> dict[str, Any]:
        """The ``/stats`` document (secrets scrubbed)."""
        return self.scrub_doc(self._stats())

    def _stats(self) -> dict[str, Any]:
        with self._store_lock:
            store_stats = self.store.stats()
        return {
            "store": store_stats,
            "server": {
                "uptime_s": round(time.time() - self.started, 3),
                "shm_regions": len(self.regions),
                "workers": self.config.workers,
                "invalidations": self.jobs.running(),
            },
            **({"events": self.events.stats()} if self.events is not None else {}),
        }

    def clear(self) -> dict[str, Any]:
        with self._store_lock:
            self.store.clear_l1()
        log.info("L1 cleared", extra=fields(via="http"))
        return {"cleared": "l1"}


def _rate(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def _top(usage: Any, name: str, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` largest entries of a usage map ``{name: {"bytes", "objects", ...}}`` (absent: none)."""
    if not isinstance(usage, dict):
        return []
    rows = [{name: k, **v} for k, v in usage.items() if isinstance(v, dict)]
    rows.sort(key=lambda r: -int(r.get("bytes", 0) or 0))
    return rows[:n]


def _start_events(store: StoreLike, config: ServerConfig, metrics: ServerMetrics) -> EventPublisher:
    """Bind the KV events socket on ``host:events_port`` and make it a listener of the Store's event hub."""
    event_hub = getattr(store, "event_hub", None)
    if event_hub is None:
        raise ConfigError(f"events_port: this server's store ({type(store).__name__}) does not emit KV events")
    hub = event_hub()
    publisher = EventPublisher(f"tcp://{config.host}:{config.events_port}", hub, hwm=config.events_hwm)
    hub.add_listener(publisher)
    metrics.registry.register(_EventsCollector(publisher))
    return publisher


class _EventsCollector(Collector):
    """``kvtier_events_*``: what the KV events publisher sent, dropped and to how many subscribers."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher

    def collect(self) -> Iterator[Metric]:
        pub = self.publisher.stats()
        hub = self.publisher.hub.stats()
        yield CounterMetricFamily(
            "kvtier_events_published", "KV events sent to subscribers", value=pub["published_events"]
        )
        dropped = CounterMetricFamily(
            "kvtier_events_dropped",
            "KV events lost: queue (the Store's event queue was full) or subscriber (missed by a full subscriber)",
            labels=["reason"],
        )
        dropped.add_metric(["queue"], hub["dropped"])
        dropped.add_metric(["subscriber"], pub["dropped_events"])
        yield dropped
        yield GaugeMetricFamily("kvtier_events_subscribers", "KV events subscriptions", value=pub["subscribers"])
        yield GaugeMetricFamily("kvtier_events_next_seq", "Sequence number of the next KV event", value=hub["next_seq"])


class _Pinned:
    """Regions a request uses, pinned until it ends so that an unregister cannot unmap them mid-copy."""

    def __init__(self, regions: RegionTable, owner: bytes) -> None:
        self.regions = regions
        self.owner = owner
        self._held: dict[int, Any] = {}

    def view(self, loc: p.Loc, meta: p.Meta) -> torch.Tensor:
        entry = self._held.get(loc.region)
        if entry is None:
            entry = self._held[loc.region] = self.regions.acquire(self.owner, loc.region)
        return self.regions.view(entry, loc, meta)

    def __enter__(self) -> _Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release every region pinned (idempotent; may be called from another thread once the request's own
        thread is done with this object)."""
        held, self._held = self._held, {}
        for entry in held.values():
            self.regions.release(entry)


class Server:
    """Binds its ports at construction (a port in use is a :class:`ConfigError`), serves until stopped.

    ``store`` is any object with the methods of ``kvtier.Store``; the server does not close a store it did not
    build unless ``close_store`` is set (the CLI builds it and sets it).
    """

    def __init__(
        self,
        config: ServerConfig,
        store: StoreLike,
        *,
        serialize_store: bool = False,
        close_store: bool = True,
        secrets: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.close_store = close_store
        self.secrets = tuple(config.secrets() if secrets is None else secrets)
        self.regions = RegionTable()
        self.metrics = ServerMetrics(self._store_stats, lambda: len(self.regions), self.secrets)
        self.handler = RequestHandler(store, config, self.metrics, self.regions, serialize_store, secrets=self.secrets)
        self._stop = threading.Event()
        self._tasks: queue.Queue[tuple[zmq.Frame, list[zmq.Frame]] | None] = queue.Queue(maxsize=4 * config.workers)
        self._ctx = zmq.Context()
        self._front = self._ctx.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.LINGER, 2000)
        # A client keeps its (random, unguessable) routing id across reconnects so that its shared-memory regions
        # stay its own; handover lets the new connection take the id over from the one it replaces.
        self._front.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._front.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self._front.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        # A frame beyond this is dropped by libzmq with the connection, before it is buffered whole; messages up to
        # max_message_bytes are read and answered (an error when too large), so this is only the hard backstop.
        self._front.setsockopt(zmq.MAXMSGSIZE, 2 * config.max_message_bytes + p.MAX_HEADER_BYTES)
        try:
            self._front.bind(config.address)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise ConfigError(
                f"host/port: cannot listen on {config.host}:{config.port} ({exc.strerror}); expected an address of "
                "this host and a free TCP port"
            ) from exc
        self._replies_addr = f"inproc://kvtier-replies-{id(self)}"
        self._replies = self._ctx.socket(zmq.PULL)
        self._replies.bind(self._replies_addr)
        try:
            self.admin = AdminServer(
                config.host,
                config.http_port,
                AdminHooks(
                    self.handler.health,
                    self.handler.stats,
                    self.metrics.render,
                    self.handler.clear,
                    describe=self.handler.describe,
                    invalidate=self.handler.http_invalidate,
                    job=lambda job_id: self.handler.job_doc(self.handler.jobs.get(job_id), 0.0),
                ),
                token=config.admin_token,
            )
        except ConfigError:
            self._ctx.destroy(linger=0)
            raise
        self.events: EventPublisher | None = None
        if config.events_port is not None:
            try:
                self.events = self.handler.events = _start_events(store, config, self.metrics)
            except BaseException:
                self.admin.close()
                self._ctx.destroy(linger=0)
                raise
        self._workers = [
            threading.Thread(target=self._work, name=f"kvtier-worker-{i}", daemon=True) for i in range(config.workers)
        ]
        self._inflight = itertools.count()

    def _stop_events(self) -> None:
        """Close the events socket, after ``Store.close()`` delivered the last events (a store the server does not
        own keeps running: its hub stops calling the publisher first)."""
        if self.events is not None:
            self.events.hub.remove_listener(self.events)
            self.events.close()

    def _store_stats(self) -> dict[str, Any]:
        store_stats: dict[str, Any] = self.handler.stats()["store"]
        return store_stats

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to drain and return (safe from signal handlers and other threads)."""
        self._stop.set()

    # -- threads ------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.connect(self._replies_addr)
        try:
            while True:
                task = self._tasks.get()
                if task is None:
                    return
                identity, frames = task
                try:
                    reply = self.handler.handle(frames, identity.bytes)
                except Exception as exc:  # handle() answers every error itself; this is the last line of defence
                    self.handler.log_error(
                        logging.ERROR, f"worker:{type(exc).__name__}", "worker: unexpected failure", exc_info=True
                    )
                    reply = [p.encode(0, p.ErrorReply("internal", "the server failed to answer this request"))]
                push.send_multipart([identity, *reply], copy=False)
        finally:
            push.close(linger=-1)

    def _reject(self, identity: zmq.Frame, frames: list[zmq.Frame], kind: str, message: str) -> None:
        """Answer a request the I/O thread refuses before queueing (its id is read when the header allows)."""
        request_id = 0
        if frames and len(frames[0]) <= p.MAX_HEADER_BYTES:
            with suppress(p.ProtocolError):
                request_id = p.decode_envelope(frames[0].buffer).id
        self.metrics.observe("invalid", 0.0, kind)
        if kind != "shutting_down":
            self.handler.log_error(logging.INFO, kind, "request rejected", error=message)
        self._front.send_multipart([identity, p.encode(request_id, p.ErrorReply(kind, message))])

    def _accept(self, message: list[zmq.Frame]) -> None:
        identity, frames = message[0], message[1:]
        if not frames:
            self._reject(identity, frames, "protocol", "empty message")
            return
        header = len(frames[0])
        total = sum(len(f) for f in frames)
        if header > p.MAX_HEADER_BYTES:
            self._reject(identity, frames, "too_large", f"header of {header} bytes exceeds {p.MAX_HEADER_BYTES}")
            return
        if total > self.config.max_message_bytes:
            self._reject(
                identity,
                frames,
                "too_large",
                f"message of {total} bytes exceeds max_message_bytes {self.config.max_message_bytes}",
            )
            return
        self.metrics.inflight.inc()
        self._tasks.put((identity, frames))

    def _forward_replies(self, timeout_ms: int) -> int:
        """Send every reply workers have handed back (waiting up to ``timeout_ms`` for the first)."""
        sent = 0
        if not self._replies.poll(timeout_ms):
            return 0
        while True:
            try:
                reply = self._replies.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return sent
            self._front.send_multipart(reply, copy=False)
            self.metrics.inflight.dec()
            sent += 1

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; then drain requests in flight, flush L2 writes and release everything."""
        # Every request crosses three threads (I/O -> worker -> I/O); with CPython's default 5 ms GIL switch
        # interval a hand-off can wait that long behind a busy thread, which is what a lookup's p99 would show.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        for worker in self._workers:
            worker.start()
        self.admin.start()
        log.info(
            "serving",
            extra=fields(
                address=self.config.address,
                http_port=self.config.http_port,
                events=self.events.address if self.events is not None else None,
                workers=self.config.workers,
                pid=os.getpid(),
                config=self.config.to_json(),
            ),
        )
        if self.config.admin_token is None and not _is_loopback(self.config.host):
            log.warning(
                "admin HTTP: POST /clear needs no token and the port listens beyond loopback; set --admin-token "
                "(or KVTIER_ADMIN_TOKEN)",
                extra=fields(host=self.config.host, http_port=self.config.http_port),
            )
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                # Stop reading requests while the queue is full: ZeroMQ's buffers then push back on clients.
                reading = not self._tasks.full()
                poller.modify(self._front, zmq.POLLIN if reading else 0)
                events = dict(poller.poll(100))
                if events.get(self._replies):
                    self._forward_replies(0)
                if reading and events.get(self._front):
                    for _ in range(64):  # bounded, so replies are never starved by a flood of requests
                        try:
                            message = self._front.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._accept(message)
                        if self._tasks.full():
                            break
        finally:
            self._shutdown()

    def _close_store(self, failed: list[BaseException]) -> None:
        try:
            self.store.close()
        except BaseException as exc:  # handed to the I/O thread, which raises it once the drain is over
            failed.append(exc)

    def _refuse_new_requests(self, timeout_ms: int) -> None:
        """During shutdown: answer every request that arrives with a ``shutting_down`` error (so its client fails
        over at once instead of waiting out its timeout), for up to ``timeout_ms``."""
        if not self._front.poll(timeout_ms, zmq.POLLIN):
            return
        while True:
            try:
                message = self._front.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._reject(message[0], message[1:], "shutting_down", "the server is shutting down")

    def _shutdown(self) -> None:
        log.info("stopping: finishing requests in flight", extra=fields(queued=self._tasks.qsize()))
        for _ in self._workers:
            self._tasks.put(None)
        while any(w.is_alive() for w in self._workers):
            self._forward_replies(0)
            self._refuse_new_requests(20)
        self._forward_replies(0)
        self.admin.close()
        try:
            if self.close_store:
                start = time.perf_counter()
                log.info("flushing pending L2 writes")
                # Flushing can take a while; the I/O thread keeps answering "shutting down" meanwhile.
                failed: list[BaseException] = []
                closer = threading.Thread(target=self._close_store, args=(failed,), name="kvtier-close", daemon=True)
                closer.start()
                while closer.is_alive():
                    self._refuse_new_requests(20)
                if failed:
                    raise failed[0]
                log.info("store closed", extra=fields(seconds=round(time.perf_counter() - start, 3)))
            self._refuse_new_requests(0)
        finally:
            self._stop_events()
            self.regions.close()
            self._front.close(linger=2000)
            self._replies.close(linger=0)
            self._ctx.term()
        log.info("stopped")
