"""``kvtier.Client``: the Store's API, served by a ``kvtier server`` over ZeroMQ.

``Client("tcp://HOST:PORT")`` has the methods of :class:`kvtier.Store` (``keys_for_tokens``, ``store``, ``lookup``,
``retrieve``, ``retrieve_into``, ``clear_l1``, ``stats``, ``close``), so an engine integration works with either.
It adds ``lookup_tokens`` (leading tokens held, by token ids), ``health``, ``describe`` and ``empty``; ``delete``,
``purge`` and ``clear`` run on the server as jobs off its request loop, and the client polls each until it is done
(``timeout_s`` bounds each poll, not the whole invalidation: a purge of millions of records takes what it takes).

Data path. On the same host the client registers shared memory with the server (see :mod:`kvtier.server.shm`):

* ``client.empty(shape, dtype)`` returns a tensor that lives in a registered region. ``store`` of such a tensor
  sends only its location; the server copies it into L1 (one copy). ``retrieve_into`` such a tensor has the
  server's Store write straight into it (one copy): the fast path for an engine's transfer buffers.
* Any other tensor goes through the client's **staging** region (one extra copy on this side), which grows to
  the largest request seen.
* On another host (the server cannot map the client's memory) tensors travel as message frames, sent and received
  with pyzmq ``copy=False``.

Every call waits at most ``timeout_s`` for the reply and then raises :class:`ServerUnavailableError`; a reply that
arrives later for an abandoned request is discarded by id. A server that has gone is noticed sooner: the client
watches its connection (a ZeroMQ socket monitor) and ZeroMQ heartbeats (``ZMQ_HEARTBEAT_IVL`` / ``TIMEOUT`` /
``TTL``, every ``heartbeat_s``) drop a connection whose peer stopped answering, so a request in flight when the
connection drops, or one sent while the server refuses reconnection, raises :class:`ServerUnavailableError`
("server gone") at once instead of after ``timeout_s``. A Client is thread-safe (one request at a time); use one
per process or thread for parallelism.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from kvtier.errors import ConfigError
from kvtier.server import protocol as p
from kvtier.server.protocol import ProtocolError, ServerError, ServerUnavailableError
from kvtier.server.shm import DATA_OFFSET, ClientRegion, align_up
from kvtier.storage.keys import keys_for_tokens as _keys_for_tokens
from kvtier.types import ObjectKey, parse_dtype

__all__ = ["Client", "ProtocolError", "ServerError", "ServerUnavailableError"]

T = TypeVar("T")
_PAGE = 4096
_MAX_STAGING = 1 << 34  # 16 GiB: beyond this a request goes as frames rather than growing staging further
# Connection events the client acts on (see _Link).
_UP_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED
_DOWN_EVENTS = zmq.EVENT_DISCONNECTED
_REFUSED_EVENTS = zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CLOSED


class Client:
    """A connection to a ``kvtier server``; the same methods as :class:`kvtier.Store`.

    ``shm``: try the shared-memory data path (falls back to frames when the server cannot map this process's
    memory). ``staging_bytes``: initial size of the staging region (it grows on demand). ``heartbeat_s``: the
    ZeroMQ heartbeat interval; a connection whose server has not answered a heartbeat for three intervals is
    dropped, and the call waiting on it raises "server gone".
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        shm: bool = True,
        staging_bytes: int = 64 << 20,
        heartbeat_s: float = 1.0,
    ) -> None:
        if not isinstance(address, str) or "://" not in address:
            raise ConfigError(f"address: expected 'tcp://HOST:PORT', got {address!r}")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ConfigError("timeout_s and connect_timeout_s: expected seconds > 0")
        if not 0.01 <= heartbeat_s <= 3600:
            raise ConfigError(f"heartbeat_s: expected seconds in [0.01, 3600], got {heartbeat_s!r}")
        self.address = address
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None
        self._link: _Link | None = None
        self._was_connected = False  # a Hello succeeded once: a refused connection then means "server gone"
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._regions: list[ClientRegion] = []  # regions of empty() tensors
        self._staging: ClientRegion | None = None
        self._staging_bytes = max(int(staging_bytes), 2 * _PAGE)
        self._released: list[int] = []  # region ids whose tensors were freed, unregistered with the next request
        self._closed = False
        # The server ties shared-memory regions to this id; it is kept across reconnects and is unguessable, so
        # no other connection can name this client's memory.
        self._identity = b"k" + secrets.token_bytes(15)
        self._connect()
        try:
            hello = _expect(self._call(p.Hello(f"pid={os.getpid()}"), timeout_s=connect_timeout_s), p.HelloReply)
        except BaseException:
            self._closed = True
            self._drop_socket()
            raise
        self._was_connected = True
        self.chunk_size: int = hello.chunk_size
        self.max_message_bytes: int = hello.max_message_bytes
        self.server_version: str = hello.server_version
        self.shm_enabled = False
        self.shm_reason = "disabled by the caller"
        if shm:
            self._staging = self._register_new(self._staging_bytes)
            self.shm_enabled = self._staging is not None

    # -- transport ------------------------------------------------------------------------------------------
    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self._identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that is not connected
        # Heartbeats: a PING every interval; no answer within three intervals drops the connection (the monitor
        # then reports it). TTL tells the server to drop this connection when our pings stop (host gone).
        ivl_ms = max(10, int(self.heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TTL, min(6_553_500, 3 * ivl_ms))
        # A connection attempt to a host that does not answer at all (powered off, partitioned) fails after this
        # instead of the OS's minutes, so that such a server also reads as gone rather than as slow.
        sock.setsockopt(zmq.CONNECT_TIMEOUT, max(1000, 3 * ivl_ms))
        self._link = _Link(sock)
        sock.connect(self.address)
        self._sock = sock

    def _drop_socket(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _gone(self, op: str, why: str) -> ServerUnavailableError:
        self._reset()
        return ServerUnavailableError(f"kvtier server at {self.address} gone ({why}) during {op}: is it running?")

    def _reset(self) -> None:
        """Drop the socket after a timeout: a late reply must not be taken for the next request's."""
        self._drop_socket()
        self._connect()

    def _call(self, body: Any, frames: Sequence[Any] = (), timeout_s: float | None = None) -> Any:
        reply, _ = self._call_frames(body, frames, timeout_s)
        return reply

    def _call_frames(
        self, body: Any, frames: Sequence[Any] = (), timeout_s: float | None = None
    ) -> tuple[Any, list[zmq.Frame]]:
        """Send one request; return the decoded reply body and its data frames. Raises on an ErrorReply."""
        with self._lock:
            if self._closed:
                raise ServerError("client is closed")
            if self._released and not isinstance(body, p.Unregister | p.Hello):
                ids, self._released = self._released, []
                self._call(p.Unregister(ids))
            assert self._sock is not None and self._link is not None
            sock, link = self._sock, self._link
            op = _OP.get(type(body), "?")
            request_id = next(self._ids)
            timeout = self.timeout_s if timeout_s is None else timeout_s
            deadline = time.monotonic() + timeout
            link.drain()
            try:
                sock.send_multipart([p.encode(request_id, body), *frames], copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                # IMMEDIATE: no connection to the server (yet); wait for one within the timeout, unless it was
                # connected before and now refuses to reconnect: then it has gone, and waiting is pointless.
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._reset()
                        raise ServerUnavailableError(
                            f"cannot reach the kvtier server at {self.address} within {timeout:g} s: is it running?"
                        ) from None
                    if link.wait(sock, zmq.POLLOUT, remaining):
                        break
                    # A client that was connected once knows the server existed: a refused reconnection (on
                    # this socket or a new one) means it has gone, and waiting out the timeout is pointless.
                    if (link.was_up or self._was_connected) and not link.up and link.refused:
                        raise self._gone(op, "connection lost and reconnection refused") from None
                sock.send_multipart([p.encode(request_id, body), *frames], copy=False)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._reset()
                    raise ServerUnavailableError(
                        f"no reply from the kvtier server at {self.address} within {timeout:g} s ({op}): is it running?"
                    )
                if not link.wait(sock, zmq.POLLIN, remaining):
                    if link.dropped:
                        # The connection this request went out on is gone (server killed, host down: heartbeat
                        # timeout); its reply can never arrive.
                        raise self._gone(op, "connection lost while waiting for the reply")
                    continue
                message = sock.recv_multipart(copy=False)
                env = p.decode_envelope(message[0].buffer)
                if env.id not in (request_id, 0):
                    continue  # a late reply to an abandoned request
                reply = p.decode_reply(env)
                if isinstance(reply, p.ErrorReply):
                    p.raise_error(reply)
                return reply, message[1:]

    # -- shared memory --------------------------------------------------------------------------------------
    def _register_new(self, size: int) -> ClientRegion | None:
        """A new region of ``size`` bytes registered with the server, or None (reason in ``shm_reason``)."""
        try:
            region = ClientRegion(size)
        except OSError as exc:  # no memfd_create, or out of memory: frames still work
            self.shm_reason = f"cannot create shared memory: {exc.strerror}"
            return None
        try:
            reply = _expect(self._call(p.Register(os.getpid(), region.fd, region.size, region.token)), p.RegisterReply)
        except BaseException:
            region.close()
            raise
        if reply.region < 0:
            self.shm_reason = reply.reason
            region.close()
            return None
        region.region_id = reply.region
        self.shm_reason = ""
        return region

    def _staging_for(self, nbytes: int) -> ClientRegion | None:
        """The staging region, grown to hold ``nbytes`` of data (None: use frames)."""
        if not self.shm_enabled or nbytes > _MAX_STAGING:
            return None
        staging = self._staging
        if staging is not None and DATA_OFFSET + nbytes <= staging.size:
            return staging
        size = max(self._staging_bytes, 1 << (DATA_OFFSET + nbytes - 1).bit_length())
        new = self._register_new(size)
        if new is None:
            return None
        if staging is not None:
            self._call(p.Unregister([staging.region_id]))
            staging.close()
        self._staging = new
        self._staging_bytes = size
        return new

    def _locate(self, tensor: torch.Tensor) -> p.Loc | None:
        """Where ``tensor`` lies in a region from :meth:`empty`, if it does."""
        for region in self._regions:
            offset = region.contains(tensor)
            if offset is not None:
                return p.Loc(region.region_id, offset, tensor.numel() * tensor.element_size())
        return None

    def empty(self, shape: Sequence[int], dtype: torch.dtype | str = torch.bfloat16) -> torch.Tensor:
        """A tensor in shared memory registered with the server: ``store`` / ``retrieve_into`` of it is one copy.

        Allocate transfer buffers once and reuse them; the region is released when the tensor is garbage-collected
        or the client closes. Without shared memory (remote server) it is an ordinary tensor.
        """
        dtype = parse_dtype(dtype)
        shape = tuple(int(s) for s in shape)
        if not self.shm_enabled:
            return torch.empty(shape, dtype=dtype)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            region = self._register_new(DATA_OFFSET + align_up(max(nbytes, 1), _PAGE))
            if region is None:
                self.shm_enabled = False
                return torch.empty(shape, dtype=dtype)
            self._regions.append(region)
        tensor = region.view(DATA_OFFSET, shape, dtype, nbytes)
        weakref.finalize(tensor, self._release_region, weakref.ref(self), region)
        return tensor

    @staticmethod
    def _release_region(client_ref: weakref.ref[Client], region: ClientRegion) -> None:
        # Runs from the garbage collector, possibly inside another request: only record the id; the next request
        # unregisters it (no socket I/O here). Closing the region frees its fd now and its memory once no view of
        # it is left.
        client = client_ref()
        if client is None or client._closed:
            return
        client._released.append(region.region_id)
        with contextlib.suppress(ValueError):
            client._regions.remove(region)
        region.close()

    # -- the Store API --------------------------------------------------------------------------------------
    def keys_for_tokens(
        self, model_name: str, token_ids: Sequence[int] | torch.Tensor, cache_salt: str = "", kv_rank: int = 0
    ) -> list[ObjectKey]:
        """The chunk keys of ``token_ids`` (computed locally, with the server's chunk size)."""
        return _keys_for_tokens(model_name, token_ids, self.chunk_size, cache_salt=cache_salt, kv_rank=kv_rank)

    def _with_regions(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt``; if the server no longer knows our regions (it restarted), register them again and
        retry once."""
        try:
            return attempt()
        except ProtocolError as exc:
            if exc.kind != "region" or not self.shm_enabled:
                raise
            with self._lock:
                self._reregister()
            return attempt()

    def _reregister(self) -> None:
        regions = ([self._staging] if self._staging is not None else []) + self._regions
        for region in regions:
            reply = self._call(p.Register(os.getpid(), region.fd, region.size, region.token))
            if reply.region < 0:
                self.shm_enabled = False  # e.g. a new server in another pid namespace: frames from now on
                self.shm_reason = reply.reason
                return
            region.region_id = reply.region

    def store(self, keys: Sequence[ObjectKey], tensors: Sequence[torch.Tensor]) -> None:
        """Store ``tensors[i]`` under ``keys[i]`` (in L1, then written through to every L2 tier)."""
        self._with_regions(lambda: self._store_once(list(keys), list(tensors)))

    def _store_once(self, keys: list[ObjectKey], tensors: list[torch.Tensor]) -> None:
        if len(keys) != len(tensors):
            raise ConfigError(f"store: {len(keys)} keys but {len(tensors)} tensors")
        if not keys:
            return
        wire = [p.WireKey.of(_key(k)) for k in keys]
        metas = [p.Meta.of(t) for t in tensors]
        with self._lock:
            locs = self._shm_locs_for_store(tensors)
            if locs is not None:
                self._call(p.Store(wire, metas, locs))
                return
            frames = [_as_frame(t) for t in tensors]
            self._call(p.Store(wire, metas, None), frames)

    def _shm_locs_for_store(self, tensors: list[torch.Tensor]) -> list[p.Loc] | None:
        if not self.shm_enabled:
            return None
        located = [self._locate(t) for t in tensors]
        need = sum(
            align_up(t.numel() * t.element_size()) for t, loc in zip(tensors, located, strict=True) if loc is None
        )
        staging = self._staging_for(need) if need else self._staging
        if need and staging is None:
            return None
        locs: list[p.Loc] = []
        offset = DATA_OFFSET
        for t, found in zip(tensors, located, strict=True):
            if found is not None:
                locs.append(found)
                continue
            assert staging is not None
            n = t.numel() * t.element_size()
            _in_region(staging, offset, t.shape, t.dtype).copy_(t)
            locs.append(p.Loc(staging.region_id, offset, n))
            offset += align_up(n)
        return locs

    def lookup(self, keys: Sequence[ObjectKey]) -> int:
        """How many leading ``keys`` are held in any tier."""
        keys = list(keys)
        if not keys:
            return 0
        reply = self._call(p.Lookup([p.WireKey.of(_key(k)) for k in keys]))
        return int(reply.count)

    def lookup_tokens(
        self, model_name: str, token_ids: Sequence[int] | torch.Tensor, cache_salt: str = "", kv_rank: int = 0
    ) -> int:
        """How many leading tokens of ``token_ids`` are held in any tier (a multiple of the chunk size)."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else [int(t) for t in token_ids]
        reply = self._call(p.LookupTokens(model_name, ids, kv_rank, cache_salt))
        return int(reply.count)

    def retrieve(self, keys: Sequence[ObjectKey]) -> list[torch.Tensor | None]:
        """Tensors for the leading hits of ``keys`` (owned by the caller), None from the first miss on."""
        return self._with_regions(lambda: self._retrieve_once(list(keys)))

    def _retrieve_once(self, keys: list[ObjectKey]) -> list[torch.Tensor | None]:
        if not keys:
            return []
        wire = [p.WireKey.of(_key(k)) for k in keys]
        with self._lock:
            staging = self._staging if self.shm_enabled else None
            request = p.Retrieve(wire, staging=_staging_loc(staging))
            reply, frames = self._call_frames(request)
            reply = _expect(reply, p.TensorsReply)
            out: list[torch.Tensor | None] = []
            for i, meta in enumerate(reply.metas):
                t = torch.empty(meta.shape, dtype=meta.torch_dtype())
                n = meta.nbytes()
                if reply.locs is not None:
                    assert staging is not None
                    t.copy_(_in_region(staging, reply.locs[i].offset, t.shape, t.dtype))
                elif n:
                    t.reshape(-1).view(torch.uint8).copy_(_frame_bytes(frames[i], n))
                out.append(t)
            if reply.locs is None and reply.metas and self.shm_enabled:
                # It did not fit in staging: grow it for next time.
                self._staging_for(sum(align_up(m.nbytes()) for m in reply.metas))
        return out + [None] * (len(keys) - len(out))

    def retrieve_into(self, keys: Sequence[ObjectKey], outs: Sequence[torch.Tensor]) -> int:
        """Fill ``outs[i]`` with the leading hits of ``keys``; returns how many (``outs`` past them: unspecified,
        as with the Store).

        Tensors from :meth:`empty` are filled in place by the server (one copy); others through staging.
        """
        return self._with_regions(lambda: self._retrieve_into_once(list(keys), list(outs)))

    def _retrieve_into_once(self, keys: list[ObjectKey], outs: list[torch.Tensor]) -> int:
        if len(keys) != len(outs):
            raise ConfigError(f"retrieve_into: {len(keys)} keys but {len(outs)} outs")
        if not keys:
            return 0
        wire = [p.WireKey.of(_key(k)) for k in keys]
        metas = [p.Meta.of(t) for t in outs]
        with self._lock:
            if self.shm_enabled:
                located = [self._locate(t) for t in outs]
                need = sum(align_up(m.nbytes()) for m, loc in zip(metas, located, strict=True) if loc is None)
                staging = self._staging_for(need) if need else self._staging
                if not need or staging is not None:
                    locs: list[p.Loc] = []
                    staged: list[tuple[int, int]] = []  # (index, offset) of outs filled through staging
                    offset = DATA_OFFSET
                    for i, (m, found) in enumerate(zip(metas, located, strict=True)):
                        if found is not None:
                            locs.append(found)
                            continue
                        assert staging is not None
                        locs.append(p.Loc(staging.region_id, offset, m.nbytes()))
                        staged.append((i, offset))
                        offset += align_up(m.nbytes())
                    reply = self._call(p.Retrieve(wire, metas, locs))
                    hits = int(reply.count)
                    for i, off in staged:
                        if i < hits:
                            assert staging is not None
                            outs[i].copy_(_in_region(staging, off, outs[i].shape, outs[i].dtype))
                    return hits
            reply, frames = self._call_frames(p.Retrieve(wire))
            reply = _expect(reply, p.TensorsReply)
            for i, meta in enumerate(reply.metas):
                if meta != metas[i]:
                    raise ConfigError(
                        f"retrieve_into: outs[{i}] is {metas[i].dtype}{list(metas[i].shape)} but the stored tensor "
                        f"is {meta.dtype}{list(meta.shape)}"
                    )
            for i in range(len(reply.metas)):
                n = metas[i].nbytes()
                if n:
                    outs[i].copy_(_frame_bytes(frames[i], n).view(outs[i].dtype).view(outs[i].shape))
            return len(reply.metas)

    def clear_l1(self) -> None:
        """Drop every object of the server's L1 pool."""
        self._call(p.ClearL1())

    # -- invalidation ---------------------------------------------------------------------------------------
    def delete(self, keys: Sequence[ObjectKey]) -> int:
        """Remove ``keys`` from every tier of the server; returns how many some tier held."""
        wire = [p.WireKey.of(_key(k)) for k in keys]
        if not wire:
            return 0
        return int(self._invalidate(p.Invalidate("delete", keys=wire), None).get("deleted", 0))

    def purge(
        self,
        model_name: str | None = None,
        cache_salt: str | None = None,
        *,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Remove every object of a model, of a tenant (``cache_salt``; ``""``: the unsalted one) or both from every
        tier of the server (see :meth:`kvtier.Store.purge`); returns its counts. ``progress(doc)`` is called
        with the server's progress while it runs. Nothing purged is served once this returns."""
        if model_name is None and cache_salt is None:
            raise ValueError("purge: give model_name, cache_salt or both (clear() drops everything)")
        return self._invalidate(p.Invalidate("purge", model_name=model_name, cache_salt=cache_salt), progress)

    def clear(
        self, *, l1: bool = True, l2: bool = False, progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Drop every object of the server's L1 (``l1``) and / or of its L2 tiers (``l2``); returns counts."""
        if not l1 and not l2:
            raise ValueError("clear: nothing to clear (l1=False and l2=False)")
        return self._invalidate(p.Invalidate("clear", l1=l1, l2=l2), progress)

    def _invalidate(self, request: p.Invalidate, progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        request.wait_s = min(1.0, self.timeout_s / 4)
        reply = _expect(self._call(request), p.JobReply)
        while not reply.done:
            if progress is not None:
                progress(dict(reply.progress))
            reply = _expect(self._call(p.JobStatus(reply.job, request.wait_s)), p.JobReply)
        return dict(reply.result or {})

    def describe(self) -> dict[str, Any]:
        """The server's summary: tiers (capacity, usage, hit rate), top models and salt digests by bytes."""
        return dict(self._call(p.Describe()).data)

    def stats(self) -> dict[str, Any]:
        """The server's Store statistics and its own (``{"store": ..., "server": ...}``)."""
        return dict(self._call(p.Stats()).data)

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", ...}`` or :class:`ServerUnavailableError`."""
        return dict(self._call(p.Health()).data)

    def close(self) -> None:
        """Unregister shared memory and close the socket (idempotent). Tensors from :meth:`empty` stay valid."""
        with self._lock:
            if self._closed:
                return
            ids = [r.region_id for r in self._regions] + self._released
            if self._staging is not None:
                ids.append(self._staging.region_id)
            if ids:
                with contextlib.suppress(ServerError):  # server gone: its mappings went with it
                    self._call(p.Unregister(ids), timeout_s=min(self.timeout_s, 2.0))
            if self._staging is not None:
                self._staging.close()
            for region in self._regions:
                region.close()
            self._closed = True
            self._drop_socket()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r}, shm={self.shm_enabled})"


_OP = {cls: str(cls.__struct_config__.tag) for cls in p.Request.__args__}


class _Link:
    """The state of a DEALER's connection, from a ZeroMQ socket monitor (events arrive on an inproc PAIR).

    ``up``: a handshake with the server succeeded and no disconnect followed; ``was_up``: it was up at some
    point; ``dropped``: a disconnect was seen since the last :meth:`drain`; ``refused``: a reconnection attempt
    failed since the last disconnect.
    """

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._sock = sock
        self._monitor = sock.get_monitor_socket(_UP_EVENTS | _DOWN_EVENTS | _REFUSED_EVENTS)
        self.up = False
        self.was_up = False
        self.dropped = False
        self.refused = False

    def _event(self, event: int) -> None:
        if event & _UP_EVENTS:
            self.up = self.was_up = True
            self.refused = False
        elif event & _DOWN_EVENTS:
            self.up = False
            self.dropped = True
            self.refused = False
        elif event & _REFUSED_EVENTS and not self.up:
            self.refused = True

    def _read(self) -> None:
        while True:
            try:
                message = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._event(int(message["event"]))

    def drain(self) -> None:
        """Apply pending events and forget drops that happened before the request about to be sent."""
        self._read()
        self.dropped = False

    def wait(self, sock: zmq.Socket[Any], flags: int, timeout_s: float) -> bool:
        """Wait until ``sock`` is ready for ``flags`` (True) or a connection event arrived / time is up (False)."""
        poller = zmq.Poller()
        poller.register(sock, flags)
        poller.register(self._monitor, zmq.POLLIN)
        events = dict(poller.poll(int(timeout_s * 1000) + 1))
        if self._monitor in events:
            self._read()
        return sock in events

    def close(self) -> None:
        # Stop the monitor before closing its socket: its inproc address is derived from the socket's fd, which a
        # later socket may reuse.
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)


def _expect(reply: Any, cls: type[T]) -> T:
    """``reply`` if it is a ``cls``; a reply of another type is a protocol error, not an assertion."""
    if not isinstance(reply, cls):
        raise ProtocolError(f"expected a {cls.__name__} from the server, got {type(reply).__name__}")
    return reply


def _key(key: Any) -> ObjectKey:
    if not isinstance(key, ObjectKey):
        raise ConfigError(f"keys: expected kvtier.ObjectKey, got {type(key).__name__}")
    return key


def _staging_loc(region: ClientRegion | None) -> p.Loc | None:
    return None if region is None else p.Loc(region.region_id, DATA_OFFSET, region.size - DATA_OFFSET)


def _in_region(region: ClientRegion, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` at ``offset`` of ``region`` (a view, no copy)."""
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return region.tensor[offset : offset + n].view(dtype).view(tuple(shape))


def _frame_bytes(frame: zmq.Frame, nbytes: int) -> torch.Tensor:
    """A received frame as a flat uint8 tensor (no copy), checked to hold ``nbytes``."""
    if len(frame) != nbytes:
        raise ProtocolError(f"reply frame has {len(frame)} bytes, expected {nbytes}")
    return torch.frombuffer(frame.buffer, dtype=torch.uint8)


def _as_frame(tensor: torch.Tensor) -> Any:
    """A tensor's bytes for a zero-copy send (a contiguous copy only when the tensor is not contiguous)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()
