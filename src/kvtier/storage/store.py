"""The embedded Store: L1 memory pool in front of L2 adapters, write-through, prefetch on retrieve.

Data flow::

    store(keys, tensors) -> copy into L1 (evict by policy) -> queue (bounded) -> writer thread
                            -> each L2 tier: serde + record -> adapter        (full queue: L2 write dropped, counted)
    retrieve(keys)       -> L1 hit: copy out
                            L1 miss: first L2 tier holding the key -> load + check + deserialize into L1 -> copy out

Tensors handed back are the caller's own (copies out of L1); L1 memory is never exposed, so a later store or an
eviction cannot change them. An object waiting for its L2 write stays pinned in L1, so the writer reads it
without a copy. ``close()`` drains the queue: every store that returned is on every L2 adapter or counted as
failed or dropped; a store that meets a closing Store raises instead of being acknowledged and lost.

Errors. Only :class:`~kvtier.errors.L2Error` (a backend failure) is turned into misses here (damaged and foreign
records are misses inside the tier already); a caller's mistake or a bug raises to the caller. The write-behind
worker is the exception: it survives any exception of one tier (counted as ``l2_write_failures`` and logged), so
its pins and pending bytes are always released and ``flush()`` / ``close()`` never hang. An L2 tier that keeps
failing is logged once when it starts failing and once when it recovers (with the count), not per call.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import unquote

import numpy as np
import torch

from kvtier.errors import CapacityError, ConfigError, L2Error
from kvtier.events import L1_TIER, EventHub, Kind, Listener
from kvtier.l2.adapters import create_l2_adapter
from kvtier.l2.tier import L2Tier
from kvtier.storage.keys import keys_for_tokens
from kvtier.storage.l1 import BACKINGS, L1Object, L1Pool
from kvtier.storage.policies import POLICIES
from kvtier.types import LayoutDesc, ObjectKey

log = logging.getLogger(__name__)
GiB = 1 << 30
#: Chains of chunk keys ``keys_for_tokens`` computed that the Store remembers, for events' parent hashes.
LINEAGE_KEYS = 65536


@dataclass
class _Write:
    keys: list[ObjectKey]
    objs: list[L1Object]
    nbytes: int


P = ParamSpec("P")
R = TypeVar("R")


def _call(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[Store, P], R]:
    """A public operation: refused once the Store is closed, and counted while it runs, so that ``close()`` unmaps
    L1 and closes the adapters only after every call in flight has left them (a store racing close() would
    otherwise copy into memory that is no longer mapped)."""

    @functools.wraps(method)
    def call(store: Store, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with store._calls:
            if store._closed:
                raise RuntimeError("kvtier Store is closed")
            store._in_flight += 1
        try:
            return method(store, *args, **kwargs)
        finally:
            with store._calls:
                store._in_flight -= 1
                if not store._in_flight:
                    store._calls.notify_all()

    return call


class Store:
    """A tiered KV store in this process.

    ``l1_size_gb``: size of the L1 pool (GiB, pages touched lazily). ``eviction_policy``: ``LRU``
    (default), ``LFU``, ``FIFO`` or ``S3-FIFO``. ``l2_adapters``: adapter configs, e.g. ``{"type": "fs",
    "base_path": ..., "serde": {...}}``, written through in order and read from the first that has a key.
    ``chunk_size``: tokens per chunk for :meth:`keys_for_tokens`. ``max_pending_l2_writes``: store batches that
    may wait for their L2 write; beyond it, or while half of L1 is already pinned by waiting writes, a store's L2
    write is dropped (counted as ``l2_writes_dropped``), never waited for.

    L1 (keyword-only ``l1_backing``): ``anonymous`` (default: private memory, nothing in ``/dev/shm``, gone with
    the process), ``memfd``, or ``hugepages`` (falls back to transparent huge pages with a warning). Pages are
    touched lazily, and the pool grows only as far as the cgroup or host memory allows minus a headroom (its
    effective capacity, ``stats()["l1"]["effective_capacity_bytes"]``); past that it evicts or refuses a store.

    Every public method may be called from several threads.
    """

    def __init__(
        self,
        l1_size_gb: float,
        eviction_policy: str = "LRU",
        l2_adapters: Sequence[dict[str, Any]] | None = None,
        chunk_size: int = 256,
        max_pending_l2_writes: int = 64,
        *,
        l1_backing: str = "anonymous",
    ) -> None:
        if isinstance(l1_size_gb, bool) or not isinstance(l1_size_gb, int | float) or not l1_size_gb > 0:
            raise ConfigError(f"l1_size_gb: expected a number > 0, got {l1_size_gb!r}")
        if not isinstance(eviction_policy, str) or eviction_policy.upper() not in POLICIES:
            raise ConfigError(f"eviction_policy: expected one of {list(POLICIES)}, got {eviction_policy!r}")
        if not isinstance(l1_backing, str) or l1_backing not in BACKINGS:
            raise ConfigError(f"l1_backing: expected one of {list(BACKINGS)}, got {l1_backing!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")
        if isinstance(max_pending_l2_writes, bool) or not isinstance(max_pending_l2_writes, int):
            raise ConfigError(f"max_pending_l2_writes: expected an integer >= 1, got {max_pending_l2_writes!r}")
        if max_pending_l2_writes < 1:
            raise ConfigError(f"max_pending_l2_writes: expected an integer >= 1, got {max_pending_l2_writes!r}")
        if l2_adapters is None:
            l2_adapters = []
        if not isinstance(l2_adapters, list | tuple):
            raise ConfigError(f"l2_adapters: expected a list of adapter configs, got {type(l2_adapters).__name__}")
        self.chunk_size = chunk_size
        self._tiers: list[L2Tier] = []
        self._init_events()
        try:
            for i, config in enumerate(l2_adapters):
                self._tiers.append(create_l2_adapter(config, f"l2_adapters[{i}]"))
            self._pool = L1Pool(
                max(1, int(l1_size_gb * GiB)), eviction_policy.upper(), l1_backing, on_evict=self._on_l1_evict
            )
        except BaseException:
            for tier in self._tiers:
                tier.close()
            raise
        self._queue: queue.Queue[_Write | None] = queue.Queue(max_pending_l2_writes)
        self._writer: threading.Thread | None = None
        self._pending_bytes = 0  # bytes of L1 objects pinned until their L2 write
        self._lock = threading.Lock()
        self._closed = False
        self._calls = threading.Condition()  # guards _in_flight: public calls running now (see _call)
        self._in_flight = 0
        self._failing: dict[int, int] = {}  # id(tier) -> failed calls since it started failing (logged once)
        self.counts = {
            "stored": 0,
            "l1_store_refused": 0,
            "l2_writes_dropped": 0,
            "l2_write_failures": 0,
            "l2_written": 0,
            "l2_prefetched": 0,
            "l2_errors": 0,
        }

    # -- keys -------------------------------------------------------------------------------------------------
    def keys_for_tokens(
        self, model_name: str, token_ids: Sequence[int] | torch.Tensor | np.ndarray, cache_salt: str = ""
    ) -> list[ObjectKey]:
        """Keys of the full ``chunk_size`` chunks of ``token_ids`` (rolling blake3 prefix hash; the partial
        tail gets none)."""
        keys = keys_for_tokens(model_name, token_ids, self.chunk_size, cache_salt)
        if self._events is not None:
            self._remember_chain(keys)
        return keys

    # -- store ------------------------------------------------------------------------------------------------
    @_call
    def store(self, keys: Sequence[ObjectKey], tensors: Sequence[torch.Tensor]) -> None:
        """Copy each tensor into L1 under its key and queue the write-through to every L2 adapter.

        An object larger than the pool raises CapacityError before anything is stored. An object that finds no
        room because the pool is pinned by reads and writes in flight is skipped and counted
        (``l1_store_refused``): a cache may drop, it must not block the engine.
        """
        if len(keys) != len(tensors):
            raise ValueError(f"store got {len(keys)} keys but {len(tensors)} tensors")
        for key, t in zip(keys, tensors, strict=True):
            if not isinstance(key, ObjectKey):
                raise TypeError(f"keys must be kvtier.ObjectKey, got {type(key).__name__}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors must be torch.Tensor, got {type(t).__name__}")
            nbytes = t.numel() * t.element_size()
            if nbytes > self._pool.capacity:
                raise CapacityError(
                    f"object {key.to_str()} of {nbytes} bytes is larger than the L1 pool ({self._pool.capacity} bytes)"
                )
        stored_keys: list[ObjectKey] = []
        objs: list[L1Object] = []
        refused = 0
        parent_of = self._parent_map(keys)
        for key, t in zip(keys, tensors, strict=True):
            try:
                obj = self._pool.reserve(key, t.shape, t.dtype)
            except CapacityError as exc:
                log.warning("L1: %s", exc)
                refused += 1
                continue
            try:
                self._pool.view(obj).copy_(t.detach())
            except BaseException:
                self._pool.release([obj])
                if self._tiers:  # the objects already stored keep their pin for the L2 write: drop it
                    self._pool.release(objs)
                raise
            self._emit_l1_stored(obj, parent_of)
            self._pool.commit(obj, keep_pin=bool(self._tiers))
            stored_keys.append(key)
            objs.append(obj)
        with self._lock:
            self.counts["stored"] += len(objs)
            self.counts["l1_store_refused"] += refused
        if self._tiers and objs:
            nbytes = sum(o.nbytes for o in objs)
            with self._lock:
                # Checked and queued under the lock close() takes to begin closing: a write is either queued
                # before close()'s end marker (and done by close) or refused here, never acknowledged and lost.
                closing = self._closed
                # Objects waiting for their L2 write stay pinned in L1. Past half the pool, new writes are
                # dropped instead, so that L1 always has unpinned room to evict and stores are not refused.
                room = not closing and self._pending_bytes < self._pool.effective_capacity // 2
                queued = False
                if room:
                    self._start_writer_locked()
                    try:
                        self._queue.put_nowait(_Write(stored_keys, objs, nbytes))
                        self._pending_bytes += nbytes
                        queued = True
                    except queue.Full:
                        pass
                if not queued and not closing:
                    self.counts["l2_writes_dropped"] += len(objs)
            if not queued:
                self._pool.release(objs)
            if closing:
                raise RuntimeError("kvtier Store is closed")

    def _start_writer_locked(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="kvtier-l2-writer", daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(item)
            finally:
                self._queue.task_done()

    def _write(self, item: _Write) -> None:
        """One queued write to every tier. Whatever a tier raises, the others still get the write, the worker
        lives on and the objects' pins and pending bytes are released."""
        try:
            views = [self._pool.view(o) for o in item.objs]
            for tier in self._tiers:
                try:
                    tier.store(item.keys, views)
                except Exception as exc:  # any failure of one tier, a bug included: counted and logged, not fatal
                    self._l2_failed(tier, exc, "l2_write_failures", len(item.keys))
                else:
                    self._l2_ok(tier)
                    self._emit_stored(item.keys, item.keys, [o.nbytes for o in item.objs], self._tier_label(tier))
                    with self._lock:
                        self.counts["l2_written"] += len(item.keys)
        finally:
            self._pool.release(item.objs)
            with self._lock:
                self._pending_bytes -= item.nbytes

    def flush(self) -> None:
        """Wait until every queued L2 write has been done (or has failed)."""
        if self._writer is not None:
            self._queue.join()

    # -- lookup / retrieve ------------------------------------------------------------------------------------
    @_call
    def lookup(self, keys: Sequence[ObjectKey]) -> int:
        """How many leading keys are in some tier (L1 or any L2 adapter). An L2 record counts when its header
        says it is ours (this tier's serde identity, this key); a foreign record does not."""
        in_l1 = self._pool.contains(keys)
        first_miss = next((i for i, hit in enumerate(in_l1) if not hit), len(keys))
        rest = list(keys[first_miss:])
        found = [False] * len(rest)
        for tier in self._tiers:
            todo = [i for i, f in enumerate(found) if not f]
            if not todo:
                break
            try:
                present = tier.lookup([rest[i] for i in todo])  # header-checked: a foreign record is no hit
            except L2Error as exc:
                self._l2_failed(tier, exc)
                continue
            self._l2_ok(tier)
            for i, p in zip(todo, present, strict=True):
                found[i] = found[i] or p
        # Everything before first_miss is in L1; after it, L1 hits count too.
        combined = [a or b for a, b in zip(in_l1[first_miss:], found, strict=True)]
        return first_miss + next((i for i, hit in enumerate(combined) if not hit), len(combined))

    @_call
    def retrieve(self, keys: Sequence[ObjectKey]) -> list[torch.Tensor | None]:
        """A new tensor per key (``None`` for a miss), owned by the caller. L1 misses are fetched from the first
        L2 adapter that holds them, through L1."""
        out: list[torch.Tensor | None] = [None] * len(keys)
        objs = self._pool.acquire(keys)
        try:
            for i, obj in enumerate(objs):
                if obj is not None:
                    out[i] = self._pool.view(obj).clone()
        finally:
            self._pool.release(objs)
        missing = [i for i, obj in enumerate(objs) if obj is None]
        if missing:
            self._prefetch(keys, missing, out)
        return out

    @_call
    def retrieve_into(self, keys: Sequence[ObjectKey], outs: Sequence[torch.Tensor]) -> int:
        """Fill the caller's tensors ``outs[i]`` with the objects of the leading keys that hit; return how many.
        Nothing is allocated for L1 hits. ``outs[n:]`` after the returned count are left unspecified."""
        if len(keys) != len(outs):
            raise ValueError(f"retrieve_into got {len(keys)} keys but {len(outs)} outputs")
        for i, dst in enumerate(outs):
            # An L2 hit may be decoded straight into ``dst`` (when L1 has no room): that needs its own memory.
            if not isinstance(dst, torch.Tensor) or not dst.is_contiguous() or dst.device.type != "cpu":
                raise ValueError(f"retrieve_into: outs[{i}] must be a contiguous CPU tensor")
        objs = self._pool.acquire(keys)
        n = 0
        try:
            for obj, dst in zip(objs, outs, strict=True):
                if obj is None or not self._fits(obj.shape, obj.dtype, dst):
                    break
                dst.copy_(self._pool.view(obj))
                n += 1
        finally:
            self._pool.release(objs)
        if n == len(keys) or not self._tiers:
            return n
        rest = list(range(n, len(keys)))
        got: list[torch.Tensor | None] = [None] * len(keys)
        self._prefetch(keys, rest, got, outs)
        for i in rest:
            if got[i] is None:
                break
            n += 1
        return n

    @staticmethod
    def _fits(shape: Sequence[int], dtype: torch.dtype, dst: torch.Tensor) -> bool:
        return tuple(dst.shape) == tuple(shape) and dst.dtype == dtype

    def _prefetch(
        self,
        keys: Sequence[ObjectKey],
        indices: list[int],
        out: list[torch.Tensor | None],
        into: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Load ``keys[i]`` for ``i`` in ``indices`` from the first L2 tier that holds it, into L1, then into
        ``into[i]`` (when given) or a new tensor; set ``out[i]`` on a hit. One read per record: the destination
        is sized from the record's header, checked against its length by the tier before it asks."""
        parent_of = self._parent_map(keys)
        for tier in self._tiers:
            if not indices:
                return
            batch = list(indices)
            reserved: dict[int, L1Object] = {}

            def alloc(
                j: int, layout: LayoutDesc, batch: list[int] = batch, reserved: dict[int, L1Object] = reserved
            ) -> torch.Tensor | None:
                i = batch[j]
                old = reserved.pop(j, None)
                if old is not None:  # asked again for the same record (an adapter retried): one reservation
                    self._pool.release([old])
                if into is not None and not self._fits(layout.shape, layout.dtype, into[i]):
                    return None  # the record is fine; the caller asked for another shape: a miss for this call
                if layout.nbytes > self._pool.capacity:
                    return None  # no object this Store stores is that large: not a record to load here
                try:
                    obj = self._pool.reserve(keys[i], layout.shape, layout.dtype)
                except CapacityError:  # L1 is pinned full: load straight into the caller's tensor, skip L1
                    return into[i] if into is not None else torch.empty(layout.shape, dtype=layout.dtype)
                reserved[j] = obj
                return self._pool.view(obj)

            try:
                got = tier.load([keys[i] for i in batch], alloc)
            except L2Error as exc:
                self._pool.release(list(reserved.values()))
                self._l2_failed(tier, exc)
                continue
            except BaseException:
                self._pool.release(list(reserved.values()))  # no decode writes into them any more: load waited
                raise
            self._l2_ok(tier)
            hits = 0
            for j, i in enumerate(batch):
                obj = reserved.get(j)
                dst = got[j]
                if dst is not None:
                    hits += 1
                    if obj is None:
                        out[i] = dst  # decoded straight into the caller's tensor or a fresh one
                    else:
                        self._emit_l1_stored(obj, parent_of)
                        self._pool.commit(obj, keep_pin=True)
                        if into is not None:
                            into[i].copy_(dst)
                            out[i] = into[i]
                        else:
                            out[i] = dst.clone()
                if obj is not None:
                    self._pool.release([obj])
            with self._lock:
                self.counts["l2_prefetched"] += hits
            indices = [i for i in indices if out[i] is None]

    def _l2_failed(self, tier: L2Tier, exc: BaseException, counter: str = "l2_errors", n: int = 1) -> None:
        """Count a failed call of ``tier``; log only the first of a run of failures (issue 12: an outage used to
        log a line per call), with the traceback when it is not a backend failure (a bug to fix)."""
        with self._lock:
            self.counts[counter] += n
            failed = self._failing.get(id(tier), 0)
            self._failing[id(tier)] = failed + 1
        if not failed:
            log.warning(
                "L2 %s is failing (%s: %s); its calls are misses or failed writes until it recovers",
                tier.name,
                type(exc).__name__,
                exc,
                exc_info=None if isinstance(exc, L2Error) else exc,
            )

    def _l2_ok(self, tier: L2Tier) -> None:
        if not self._failing:
            return
        with self._lock:
            failed = self._failing.pop(id(tier), 0)
        if failed:
            log.warning("L2 %s recovered after %d failed call(s)", tier.name, failed)

    # -- the rest ---------------------------------------------------------------------------------------------
    @_call
    def clear_l1(self) -> None:
        """Drop every object from L1 (L2 keeps its copies; objects in flight go when their pins do)."""
        self._pool.clear()
        if self._events is not None:
            self._events.emit_cleared(L1_TIER)

    def stats(self) -> dict[str, Any]:
        """Counters of the store, L1 and each L2 adapter (JSON-able)."""
        with self._lock:
            counts = dict(self.counts)
        return {
            "chunk_size": self.chunk_size,
            **counts,
            "l2_pending_writes": self._queue.qsize(),
            "l2_pending_bytes": self._pending_bytes,
            "l1": self._pool.stats(),
            "l2": [tier.stats() for tier in self._tiers],
            **({"events": self._events.stats()} if self._events is not None else {}),
        }

    def close(self) -> None:
        """Finish every pending L2 write, then release L1 and the adapters. Idempotent. Stores that come once
        closing began raise; the worker never dies, so the end marker is always taken and this never hangs."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # from here on store() refuses to queue (checked under this lock)
            writer = self._writer
        with self._calls:  # calls that began before: they finish (bounded by the adapters' timeouts) first
            self._calls.wait_for(lambda: self._in_flight == 0)
        if writer is not None:
            while writer.is_alive():
                try:
                    self._queue.put(None, timeout=0.1)  # after every queued write: nothing acknowledged is lost
                    break
                except queue.Full:
                    continue  # the worker is draining a full queue
            writer.join()
            self._drain_unwritten()
        if self._events is not None:
            self._events.close()  # after the last L2 write: its stored events are delivered too
        for tier in self._tiers:
            tier.close()
        self._pool.close()

    # -- events -----------------------------------------------------------------------------------------------
    _events: EventHub | None  # created by the first add_listener
    _lineage: OrderedDict[ObjectKey, str | None]  # key -> previous chunk's hash (None: a first chunk)

    def event_hub(self) -> EventHub:
        """The Store's :class:`~kvtier.events.EventHub` (created on first use): its publisher id, counters and
        listeners. Events are built only while it has a listener."""
        with self._lock:
            if self._events is None:
                self._events = EventHub()
                for tier in self._tiers:  # adapters that evict on their own capacity index report it
                    tier.adapter.on_evict = functools.partial(self._on_l2_evict, self._tier_label(tier))
            return self._events

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(events)`` with batches of :class:`~kvtier.events.KVEvent` (stored / evicted / purged /
        cleared, per chunk key and tier; see :mod:`kvtier.events`) from now on.

        Listeners run on one thread of their own, never in the caller's: the Store queues events (bounded) and
        never waits for a listener; a slow one makes events drop (counted in ``stats()["events"]["dropped"]``,
        and visible to it as a gap in ``seq``), one that raises is logged and keeps receiving. No listener, no
        cost: events are built only while one is registered.
        """
        self.event_hub().add_listener(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (events already handed to it may still arrive once)."""
        if self._events is not None:
            self._events.remove_listener(listener)

    def _init_events(self) -> None:
        self._events = None
        self._lineage = OrderedDict()  # the chains keys_for_tokens computed, for the parents of stored events
        self._lineage_lock = threading.Lock()

    def _tier_label(self, tier: L2Tier) -> str:
        """The L2 tier's name in events (``fs``, ``redis+fp8``); suffixed ``#index`` when two tiers share it."""
        names = [t.name for t in self._tiers]
        return tier.name if names.count(tier.name) == 1 else f"{tier.name}#{self._tiers.index(tier)}"

    def _remember_chain(self, keys: Sequence[ObjectKey]) -> None:
        with self._lineage_lock:
            prev: str | None = None
            for key in keys:
                self._lineage[key] = prev
                self._lineage.move_to_end(key)
                prev = key.chunk_hash
            while len(self._lineage) > LINEAGE_KEYS:
                self._lineage.popitem(last=False)

    def _parent_map(self, call_keys: Sequence[ObjectKey]) -> dict[ObjectKey, str | None] | None:
        """The parent hash of each key of one call (``None`` when nothing listens): from the chains
        keys_for_tokens computed, else the key before it in the call when of the same model, rank and salt (see
        :mod:`kvtier.events`)."""
        events = self._events
        if events is None or not events.has_listeners:
            return None
        out: dict[ObjectKey, str | None] = {}
        before: ObjectKey | None = None
        with self._lineage_lock:
            for key in call_keys:
                if key in self._lineage:
                    out[key] = self._lineage[key]
                elif before is not None and (before.model_name, before.kv_rank, before.cache_salt) == (
                    key.model_name,
                    key.kv_rank,
                    key.cache_salt,
                ):
                    out[key] = before.chunk_hash
                else:
                    out[key] = None
                before = key
        return out

    def _emit_l1_stored(self, obj: L1Object, parent_of: dict[ObjectKey, str | None] | None) -> None:
        """A ``stored`` event for an object about to be committed to L1. Emitted before the commit, so that an
        eviction of this object (only possible once committed) always comes after it in ``seq``."""
        events = self._events
        if parent_of is not None and events is not None:
            events.emit("stored", [obj.key], L1_TIER, [obj.nbytes], [parent_of.get(obj.key)])

    def _emit_stored(
        self, call_keys: Sequence[ObjectKey], keys: Sequence[ObjectKey], sizes: Sequence[int], tier: str
    ) -> None:
        """``stored`` events for ``keys`` (those of one call's ``call_keys`` that landed in ``tier``)."""
        parent_of = self._parent_map(call_keys)
        if parent_of is not None and self._events is not None and keys:
            self._events.emit("stored", keys, tier, sizes, [parent_of.get(k) for k in keys])

    def _emit(self, kind: Kind, keys: Sequence[ObjectKey], tier: str) -> None:
        events = self._events
        if events is not None and keys and events.has_listeners:
            events.emit(kind, keys, tier)

    def _on_l1_evict(self, keys: Sequence[ObjectKey]) -> None:
        self._emit("evicted", keys, L1_TIER)

    def _on_l2_evict(self, tier: str, names: Sequence[str]) -> None:
        """An adapter evicted records ``names`` (``ObjectKey.to_str()`` strings: model, rank, salt digest, hash)."""
        events = self._events
        if events is not None and events.has_listeners:
            events.emit("evicted", _key_fields(names), tier)

    def _drain_unwritten(self) -> None:
        """Release what a worker that died (it cannot, short of the interpreter stopping) left queued."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._pool.release(item.objs)
                with self._lock:
                    self._pending_bytes -= item.nbytes
                    self.counts["l2_write_failures"] += len(item.keys)
            self._queue.task_done()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A Store dropped without close() gives its L1 mapping back at once, not at process exit.
        if not getattr(self, "_closed", True) and hasattr(self, "_pool"):
            self._pool.arena.close()


def _key_fields(names: Sequence[str]) -> list[tuple[str, int, str, str]]:
    """``(model, rank, salt digest, hash)`` of record names (``ObjectKey.to_str()``); others are skipped."""
    fields = []
    for name in names:
        parts = name.split("@")
        if len(parts) == 4 and parts[1].isdigit():
            fields.append((unquote(parts[0]), int(parts[1]), parts[2], parts[3]))
    return fields
