"""The embedded Store: L1 memory pool in front of L2 adapters, write-through, prefetch on retrieve.

Data flow::

    store(keys, tensors) -> copy into L1 (evict by policy) -> write pipeline (bounded; full: dropped, counted)
                            -> per L2 tier: writers take batches -> encode | checksum | write, overlapped
                            (kvtier.storage.pipeline: a newer store of a key is never overwritten by an older one)
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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import torch

from kvtier.errors import CapacityError, ConfigError, L2Error
from kvtier.events import L1_TIER, EventHub, Kind, Listener
from kvtier.key_names import parse_key_str
from kvtier.l2.adapters import PURGE_BATCH, KeyMatch, create_l2_adapter
from kvtier.l2.tier import L2Tier, Refill
from kvtier.storage.admission import TierAdmission, admission_of, without_admission
from kvtier.storage.backfill import Backfill
from kvtier.storage.copy import clone, copy_into
from kvtier.storage.fence import PurgeFence, stamp
from kvtier.storage.keys import keys_for_tokens
from kvtier.storage.l1 import BACKINGS, L1Object, L1Pool
from kvtier.storage.pipeline import Write as _Write
from kvtier.storage.pipeline import WritePipeline
from kvtier.storage.policies import POLICIES
from kvtier.tenants import TenantQuotas
from kvtier.types import LayoutDesc, ObjectKey, salt_digest

log = logging.getLogger(__name__)
GiB = 1 << 30
#: a store's objects go to the write pipeline in groups of about this many bytes as they are copied into L1, so
#: the L2 writes of the first group are encoded and written while the rest are still being copied
WRITE_GROUP_BYTES = 64 << 20
#: Chains of chunk keys ``keys_for_tokens`` computed that the Store remembers, for events' parent hashes.
LINEAGE_KEYS = 65536


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


class _Countdown:
    """Calls ``fn`` once, when it is armed and every :meth:`add` was matched by a :meth:`done`."""

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self._fn = fn
        self._left = 1  # the arm
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self._left += 1

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            fire = self._left == 0
        if fire and self._fn is not None:
            self._fn()

    def arm(self) -> None:
        self.done()


def _fenced(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[Store, P], R]:
    """An operation the purge fence orders (see :mod:`kvtier.storage.fence`): stamped with the generation at which
    it began; a store skips the keys an open fence blocks, a read reports them as misses (``retrieve``: ``None``;
    ``lookup`` / ``retrieve_into``: the count of leading hits cut at the first blocked key). When no purge concerns
    the op this costs a registration in a dict and an integer compare."""
    name = method.__name__

    def store_call(store: Store, keys: Any, tensors: Any, *args: Any, **kwargs: Any) -> Any:
        fence = store._fence
        gen = fence.enter()
        try:
            blocked = fence.blocked(keys, gen) if fence._fences else None
            if blocked:
                kept = [i for i, b in enumerate(blocked) if not b]
                with store._lock:
                    store.counts["purge_skipped_stores"] += len(blocked) - len(kept)
                keys, tensors = [keys[i] for i in kept], [tensors[i] for i in kept]
            return method(store, keys, tensors, *args, **kwargs)
        finally:
            fence.leave(gen)

    def read_call(store: Store, keys: Any, *args: Any, **kwargs: Any) -> Any:
        fence = store._fence
        gen = fence.enter()
        try:
            result: Any = method(store, keys, *args, **kwargs)
            blocked = fence.blocked(keys, gen) if fence._fences else None
            if not blocked:
                return result
            if name == "retrieve":
                return [None if b else t for t, b in zip(result, blocked, strict=True)]
            return min(result, blocked.index(True))
        finally:
            fence.leave(gen)

    call = store_call if name == "store" else read_call
    return functools.wraps(method)(call)  # type: ignore[return-value]


class Store:
    """A tiered KV store in this process.

    ``l1_size_gb``: size of the L1 pool (GiB, pages touched lazily). ``eviction_policy``: ``LRU``
    (default), ``LFU``, ``FIFO`` or ``S3-FIFO``. ``l2_adapters``: adapter configs, e.g. ``{"type": "fs",
    "base_path": ..., "serde": {...}}``, written through in order and read from the first that has a key; an
    adapter's ``"admission": "second_hit"`` writes a chunk to it only once it was requested again while in L1
    (default ``"always"``; see :mod:`kvtier.storage.admission`).
    ``chunk_size``: tokens per chunk for :meth:`keys_for_tokens`. ``max_pending_l2_writes``: store batches that
    may wait for their L2 write; beyond it, or while half of L1 is already pinned by waiting writes, a store's L2
    write is dropped (counted as ``l2_writes_dropped``), never waited for.

    L1 (keyword-only ``l1_backing``): ``anonymous`` (default: private memory, nothing in ``/dev/shm``, gone with
    the process), ``memfd``, or ``hugepages`` (falls back to transparent huge pages with a warning). Pages are
    touched lazily, and the pool grows only as far as the cgroup or host memory allows minus a headroom (its
    effective capacity, ``stats()["l1"]["effective_capacity_bytes"]``); past that it evicts or refuses a store.

    Tenants (keyword-only; see :mod:`kvtier.tenants`): ``l1_quota_gb`` caps the L1 bytes of every tenant (each
    ``cache_salt``, and the requests without one), ``l1_quotas_gb`` overrides it per tenant, keyed by salt digest
    (``{digest: GiB or None}``). A tenant at its quota evicts its own objects. ``stats()["l1"]["tenants"]`` and
    ``["models"]`` report the usage of each.

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
        l1_quota_gb: float | None = None,
        l1_quotas_gb: Mapping[str, float | None] | None = None,
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
        quotas = TenantQuotas.parse(l1_quota_gb, l1_quotas_gb, "l1_quota_gb", "l1_quotas_gb")
        if l2_adapters is None:
            l2_adapters = []
        if not isinstance(l2_adapters, list | tuple):
            raise ConfigError(f"l2_adapters: expected a list of adapter configs, got {type(l2_adapters).__name__}")
        self.chunk_size = chunk_size
        admission = [admission_of(config, f"l2_adapters[{i}]") for i, config in enumerate(l2_adapters)]
        self._tiers: list[L2Tier] = []
        self._init_events()
        try:
            for i, config in enumerate(l2_adapters):
                self._tiers.append(create_l2_adapter(without_admission(config), f"l2_adapters[{i}]"))
            self._pool = L1Pool(
                max(1, int(l1_size_gb * GiB)),
                eviction_policy.upper(),
                l1_backing,
                on_evict=self._on_l1_evict,
                quotas=quotas,
            )
        except BaseException:
            for tier in self._tiers:
                tier.close()
            raise
        self._admission = [TierAdmission(policy) for policy in admission]
        # The tiers a store writes through to, and the bit mask of those that wait for a second hit instead.
        self._write_tiers = [t for t, a in zip(self._tiers, self._admission, strict=True) if not a.second_hit]
        self._second_hit_mask = sum(1 << i for i, a in enumerate(self._admission) if a.second_hit)
        self._lock = threading.Lock()
        self._closed = False
        self._calls = threading.Condition()  # guards _in_flight: public calls running now (see _call)
        self._in_flight = 0
        self._failing: dict[int, int] = {}  # id(tier) -> failed calls since it started failing (logged once)
        self._fence = PurgeFence()
        self.counts = {
            "stored": 0,
            "l1_store_refused": 0,
            "l2_writes_dropped": 0,
            "l2_writes_superseded": 0,
            "l2_write_failures": 0,
            "l2_written": 0,
            "l2_prefetched": 0,
            "l2_errors": 0,
            "l1_backfilled": 0,
            "l1_backfill_skipped": 0,
            "purge_skipped_stores": 0,
            "purge_skipped_writes": 0,
            "purge_skipped_loads": 0,
            "invalidations": 0,
        }
        # L2 hits read straight into a caller's tensors are copied into L1 later, off the caller's path.
        self._backfill = Backfill(
            self._pool,
            min(self._pool.capacity // 4, GiB),
            self._add_count,
            lambda obj: self._emit_l1_stored(obj, self._parent_map([obj.key])),
        )
        # Write-behind to L2: pending writes pin their L1 objects, at most half of L1 (so L1 always has unpinned
        # room to evict and stores are not refused) and at most max_pending_l2_writes store batches.
        self._writes = WritePipeline(
            self._pool,
            self._tiers,
            max_pending=max_pending_l2_writes,
            max_pending_bytes=lambda: self._pool.effective_capacity // 2,
            count=self._add_count,
            failed=lambda tier, exc, n: self._l2_failed(tier, exc, "l2_write_failures", n),
            ok=self._l2_ok,
            written=self._on_l2_written,
        )

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
    @_fenced
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
        queued_upto = 0  # objs[:queued_upto] are handed to the write pipeline (it holds their pins)
        closing = False
        self._backfill.stale(keys)  # before anything commits: an older L2 copy must not land over these
        parent_of = self._parent_map(keys)
        for key, t in zip(keys, tensors, strict=True):
            try:
                obj = self._pool.reserve(key, t.shape, t.dtype)
            except CapacityError as exc:
                log.warning("L1: %s", exc)
                refused += 1
                continue
            try:
                copy_into(self._pool.view(obj), t.detach())
            except BaseException:
                self._pool.release([obj])
                if self._write_tiers:  # the objects stored and not yet queued keep their pin for the L2 write: drop it
                    self._pool.release(objs[queued_upto:])
                raise
            self._emit_l1_stored(obj, parent_of)
            self._pool.commit(obj, keep_pin=bool(self._write_tiers))
            stored_keys.append(key)
            objs.append(obj)
            if self._write_tiers and sum(o.nbytes for o in objs[queued_upto:]) >= WRITE_GROUP_BYTES:
                closing |= not self._queue_group(stored_keys[queued_upto:], objs[queued_upto:])
                queued_upto = len(objs)
        with self._lock:
            self.counts["stored"] += len(objs)
            self.counts["l1_store_refused"] += refused
            self._admit_skipped_locked(len(objs))
        if self._write_tiers and len(objs) > queued_upto:
            closing |= not self._queue_group(stored_keys[queued_upto:], objs[queued_upto:])
        if closing:
            raise RuntimeError("kvtier Store is closed")

    def _queue_group(self, keys: list[ObjectKey], objs: list[L1Object]) -> bool:
        """Queue the L2 write of objects a store just copied into L1 (to the tiers that take writes at store
        time); False only when the Store is closing."""
        write = _Write(keys, objs, sum(o.nbytes for o in objs), self._write_tiers)
        return self._enqueue_write(write) or not self._closed

    def _enqueue_write(self, write: _Write) -> bool:
        """The one path by which L2 writes are queued (a store's write-behind, a late write of an admission
        policy). Takes over one pin of each of ``write.objs``: released when its writes are done, or here when the
        write is not queued (no room: dropped and counted; closing: not counted, the caller raises)."""
        # close() drains the pipeline only once the public calls in flight (this one's caller) have returned, and
        # the pipeline refuses writes once it is closing: a write is either queued before the drain (and done by
        # it) or refused here, never acknowledged and lost. Not under self._lock: the pipeline counts through it.
        try:
            queued = not self._closed and self._writes.submit(write)
        except BaseException:
            self._pool.release(write.objs)
            raise
        if not queued:
            with self._lock:
                if not self._closed:
                    self.counts["l2_writes_dropped"] += len(write.objs)
            self._pool.release(write.objs)
        return queued

    def _add_count(self, name: str, n: int) -> None:
        with self._lock:
            self.counts[name] += n

    def flush(self) -> None:
        """Wait until every queued L2 write has been done (or has failed, or was superseded by a newer store of
        its key), and every pending L1 backfill of an L2 hit has landed or was skipped. With an fs tier of
        ``durability: "fsync"``, what was written is on stable storage by then."""
        self._writes.drain()
        self._backfill.drain()

    # -- write admission (see kvtier.storage.admission) --------------------------------------------------------
    def _admit_skipped_locked(self, n: int) -> None:
        """``n`` chunks were stored to L1 and not written to the ``second_hit`` tiers (yet)."""
        for a in self._admission:
            if a.second_hit:
                a.skipped += n

    def _admit_held_bit(self, tier: L2Tier) -> int:
        """The ``L1Object.l2_held`` bit of ``tier`` (0 when no tier waits for a second hit: nothing reads it)."""
        return 1 << self._tiers.index(tier) if self._second_hit_mask else 0

    def _admit_on_hit(self, pinned: list[L1Object | None], n: int) -> None:
        """The L1 hits ``pinned[:n]`` (pinned by the caller) were served: queue the write of each to the
        ``second_hit`` tiers that lack it (a key twice in one call is written once; a key an invalidation running
        now selects is not written).

        The pin of an object offered to the write pipeline goes with it (released when the write is done, or at
        once when it is not queued): its entry in ``pinned`` becomes ``None``, so the caller releases exactly the
        pins it still holds, even when this raises half-way.
        """
        if not self._second_hit_mask:
            return
        blocked = self._fence.blocked([o.key for o in pinned[:n] if o is not None], stamp())
        if blocked:
            return  # an invalidation concerns this call: no late write may race it (the next hit writes)
        groups: dict[int, list[int]] = {}  # tier mask -> indices of the hits that go to exactly those tiers
        with self._lock:  # the test-and-set of l2_held: two concurrent hits queue one write
            for i, obj in enumerate(pinned[:n]):
                if obj is None:
                    continue
                todo = self._second_hit_mask & ~obj.l2_held
                if todo:
                    obj.l2_held |= todo
                    groups.setdefault(todo, []).append(i)
        offers = list(groups.items())
        offered = 0
        try:
            for mask, indices in offers:
                offered += 1
                hits = [obj for i in indices if (obj := pinned[i]) is not None]
                tiers = [t for b, t in enumerate(self._tiers) if mask >> b & 1]
                for i in indices:
                    pinned[i] = None  # the pin goes with the write (see _enqueue_write)
                queued = False
                try:
                    write = _Write([o.key for o in hits], hits, sum(o.nbytes for o in hits), tiers)
                    queued = self._enqueue_write(write)
                finally:
                    with self._lock:
                        if queued:
                            for b, a in enumerate(self._admission):
                                a.admitted += len(hits) if mask >> b & 1 else 0
                        else:  # not written (no room, closing, or the enqueue raised): the next hit tries again
                            for obj in hits:
                                obj.l2_held &= ~mask
        finally:
            with self._lock:  # the writes never offered (an earlier one raised): not written either
                for mask, indices in offers[offered:]:
                    for i in indices:
                        if (obj := pinned[i]) is not None:
                            obj.l2_held &= ~mask

    def _admission_stats(self, index: int) -> dict[str, Any]:
        with self._lock:
            return self._admission[index].stats()

    # -- lookup / retrieve ------------------------------------------------------------------------------------
    @_call
    @_fenced
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
    @_fenced
    def retrieve(self, keys: Sequence[ObjectKey]) -> list[torch.Tensor | None]:
        """A new tensor per key (``None`` for a miss), owned by the caller. An L1 miss is loaded from the first L2
        adapter that holds it into its new tensor, and copied into L1 in the background (see :meth:`flush`)."""
        out: list[torch.Tensor | None] = [None] * len(keys)
        objs = self._pool.acquire(keys)
        pinned = list(objs)
        try:
            for i, obj in enumerate(objs):
                if obj is not None:
                    out[i] = clone(self._pool.view(obj))
            self._admit_on_hit(pinned, len(pinned))
        finally:
            self._pool.release(pinned)
        missing = [i for i, obj in enumerate(objs) if obj is None]
        if missing:
            self._prefetch(keys, missing, out)
        return out

    def retrieve_into(
        self, keys: Sequence[ObjectKey], outs: Sequence[torch.Tensor], *, after: Callable[[], None] | None = None
    ) -> int:
        """Fill the caller's tensors ``outs[i]`` with the objects of the leading keys that hit; return how many.
        Nothing is allocated for L1 hits. ``outs[n:]`` after the returned count are left unspecified.

        An L2 hit of a tier without serde (or ``raw``) is read straight into ``outs[i]`` and copied into L1 later,
        in the background (checked against its record's checksum, so the caller may reuse ``outs`` at once).
        ``after`` (optional) is called exactly once, even when this raises, once nothing reads ``outs`` any more:
        before this returns when no such copy is pending, else from the background thread (a server keeps a
        client's shared memory mapped until then).
        """
        pending = _Countdown(after)
        try:
            return self._retrieve_into(keys, outs, pending)
        finally:
            pending.arm()

    @_call
    @_fenced
    def _retrieve_into(self, keys: Sequence[ObjectKey], outs: Sequence[torch.Tensor], pending: _Countdown) -> int:
        if len(keys) != len(outs):
            raise ValueError(f"retrieve_into got {len(keys)} keys but {len(outs)} outputs")
        for i, dst in enumerate(outs):
            # An L2 hit may be decoded straight into ``dst`` (when L1 has no room): that needs its own memory.
            if not isinstance(dst, torch.Tensor) or not dst.is_contiguous() or dst.device.type != "cpu":
                raise ValueError(f"retrieve_into: outs[{i}] must be a contiguous CPU tensor")
        objs = self._pool.acquire(keys)
        pinned = list(objs)
        n = 0
        try:
            for obj, dst in zip(objs, outs, strict=True):
                if obj is None or not self._fits(obj.shape, obj.dtype, dst):
                    break
                copy_into(dst, self._pool.view(obj))
                n += 1
            self._admit_on_hit(pinned, n)
        finally:
            self._pool.release(pinned)
        if n == len(keys) or not self._tiers:
            return n
        rest = list(range(n, len(keys)))
        got: list[torch.Tensor | None] = [None] * len(keys)
        self._prefetch(keys, rest, got, outs, pending)
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
        pending: _Countdown | None = None,
    ) -> None:
        """Load ``keys[i]`` for ``i`` in ``indices`` from the first L2 tier that holds it; set ``out[i]`` on a hit.
        One read per record: the destination is sized from the record's header, checked against its length by the
        tier before it asks.

        **One load path.** A hit lands straight in its destination: ``into[i]`` (``retrieve_into``) or a new tensor
        (``retrieve``), read in place or decoded into it, and reaches L1 later, by the backfill, from the hit's
        :class:`~kvtier.l2.tier.Refill` (never from the destination unchecked: the caller owns it at once).
        ``pending`` counts the backfills that still read ``into``."""
        pending = pending if pending is not None else _Countdown(None)
        for tier in self._tiers:
            if not indices:
                return
            batch = list(indices)
            refills: dict[int, Refill] = {}

            def alloc(j: int, layout: LayoutDesc, batch: list[int] = batch) -> torch.Tensor | None:
                i = batch[j]
                if into is not None and not self._fits(layout.shape, layout.dtype, into[i]):
                    return None  # the record is fine; the caller asked for another shape: a miss for this call
                if layout.nbytes > self._pool.capacity:
                    return None  # no object this Store stores is that large: not a record to load here
                return into[i] if into is not None else torch.empty(layout.shape, dtype=layout.dtype)

            hits = 0
            try:
                try:
                    got = tier.load([keys[i] for i in batch], alloc, refills)
                except L2Error as exc:
                    self._l2_failed(tier, exc)
                    continue
                self._l2_ok(tier)
                for j, i in enumerate(batch):
                    dst = got[j]
                    if dst is None:
                        continue
                    hits += 1
                    out[i] = dst
                    refill = refills.pop(j, None)
                    if refill is not None:
                        self._backfill_later(keys[i], dst, refill, pending, tier)
            finally:
                for refill in refills.values():  # hits not handed to the backfill (an error mid-way)
                    refill.close()
            with self._lock:
                self.counts["l2_prefetched"] += hits
            indices = [i for i in indices if out[i] is None]

    def _backfill_later(
        self, key: ObjectKey, loaded: torch.Tensor, refill: Refill, pending: _Countdown, tier: L2Tier
    ) -> None:
        """Hand an L2 hit to the backfill, unless a purge began since this load did (then the fenced read reports
        it as a miss, and L1 must not get it)."""
        if self._fence.blocked([key], stamp()):
            refill.close()
            with self._lock:
                self.counts["purge_skipped_loads"] += 1
            return
        pending.add()
        self._backfill.submit(key, loaded, refill, pending.done, self._admit_held_bit(tier))

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
        """Drop every object from L1 (L2 keeps its copies; objects in flight go when their pins do). Backfills of
        earlier L2 hits are dropped, and waited for: none lands after this returns."""
        self._backfill.stale(None)
        self._backfill.drain()
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
            "l2_pending_writes": self._writes.pending_writes,
            "l2_pending_bytes": self._writes.pending_bytes,
            "l2_writes_refused_by": dict(self._writes.refused),
            "l1": self._pool.stats(),
            "l2": [{**tier.stats(), **self._admission_stats(i)} for i, tier in enumerate(self._tiers)],
            "invalidations_running": self._fence.running(),
            **({"events": self._events.stats()} if self._events is not None else {}),
        }

    # -- invalidation (see kvtier.storage.fence) ------------------------------------------------------------------
    @_call
    def delete(self, keys: Sequence[ObjectKey]) -> int:
        """Remove ``keys`` from L1 and every L2 tier; return how many of them some tier held. Nothing of these
        keys stored before this returns is served after it (a queued write is skipped, a load in flight does not
        put it back into L1 or hand it out). An L2 tier that fails is logged and counted; the others go on."""
        for key in keys:
            if not isinstance(key, ObjectKey):
                raise TypeError(f"keys must be kvtier.ObjectKey, got {type(key).__name__}")
        wanted = set(keys)
        if not wanted:
            return 0
        ordered = list(dict.fromkeys(keys))
        held: set[ObjectKey] = set()

        def l2(tier: L2Tier, batch_size: int, report: Callable[[int, list[str]], None]) -> int:
            done = 0
            for start in range(0, len(ordered), batch_size):
                part = ordered[start : start + batch_size]
                present = tier.contains(part)
                tier.delete(part)
                gone = [k for k, p in zip(part, present, strict=True) if p]
                held.update(gone)
                done += len(gone)
                report(done, [k.to_str() for k in gone])
            return done

        result = self._invalidate(
            "delete", wanted.__contains__, l2=l2, batch_size=PURGE_BATCH, progress=None, where={"keys": len(wanted)}
        )
        held.update(result.pop("_l1_keys"))
        return len(held)

    @_call
    def purge(
        self,
        model_name: str | None = None,
        cache_salt: str | None = None,
        *,
        batch_size: int = PURGE_BATCH,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Remove every object of a model (``model_name``), of a tenant (``cache_salt``; ``""`` is the unsalted
        tenant) or of a tenant of a model (both) from L1 and every L2 tier; at least one must be given.

        Each L2 tier is walked in batches of ``batch_size`` keys (its cheapest way: a directory index, ``SCAN``
        + ``UNLINK``, a listing by prefix), each batch its own backend call, so serving goes on meanwhile;
        ``progress(counts)`` is called after each batch. Nothing of the selected objects stored before this
        returns is served after it. Returns ``{"l1": removed, "l2": [{"tier", "deleted"[, "error"]}], "errors",
        "elapsed_s"}``; an L2 tier that fails (or cannot list its keys) is reported under ``errors`` and the
        other tiers are still purged.
        """
        if model_name is None and cache_salt is None:
            raise ValueError("purge: give model_name, cache_salt or both (clear() drops everything)")
        if model_name is not None:
            ObjectKey(model_name, "0")  # the same check a key's model gets; raises ConfigError naming the field
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ConfigError(f"cache_salt: expected a string, got {type(cache_salt).__name__}")
        digest = None if cache_salt is None else salt_digest(cache_salt)
        match = KeyMatch(model_name, digest)

        def selects(key: ObjectKey) -> bool:
            return (model_name is None or key.model_name == model_name) and (
                digest is None or key.salt_digest == digest
            )

        def l2(tier: L2Tier, batch_size: int, report: Callable[[int, list[str]], None]) -> int:
            return tier.adapter.purge(match, batch_size, report)

        where = {"model_name": model_name, "salt_digest": digest}
        result = self._invalidate("purge", selects, l2=l2, batch_size=batch_size, progress=progress, where=where)
        result.pop("_l1_keys")
        return result

    @_call
    def clear(
        self, *, l1: bool = True, l2: bool = False, progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Drop every object from L1 (``l1``) and/or from every L2 tier (``l2``: the records kvtier stored; other
        data on the backend is left alone). Writes queued before this returns are skipped for the tiers cleared;
        while an L2 clear runs, reads may miss. Returns counts as :meth:`purge` does."""
        if not l1 and not l2:
            raise ValueError("clear: nothing to clear (l1=False and l2=False)")

        def all_of(tier: L2Tier, batch_size: int, report: Callable[[int, list[str]], None]) -> int:
            return tier.adapter.purge(KeyMatch(), batch_size, report)

        result = self._invalidate(
            "clear",
            lambda key: True,
            l2=all_of if l2 else None,
            batch_size=PURGE_BATCH,
            progress=progress,
            where={"clear_l1": l1, "clear_l2": l2},
            l1=l1,
        )
        result.pop("_l1_keys")
        return result

    def _invalidate(
        self,
        what: str,
        selects: Callable[[ObjectKey], bool],
        *,
        l2: Callable[[L2Tier, int, Callable[[int, list[str]], None]], int] | None,
        batch_size: int,
        progress: Callable[[dict[str, Any]], None] | None,
        where: dict[str, Any],
        l1: bool = True,
    ) -> dict[str, Any]:
        """The fenced invalidation every public one shares: open the fence, wait for the ops that began before
        it, sweep L1, walk each L2 tier, close the fence."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        start = time.monotonic()
        doc: dict[str, Any] = {"op": what, **where, "state": "waiting", "l1": 0, "l2_deleted": 0, "tier": None}
        fence = self._fence.open(selects)
        fence.progress = doc
        tiers: list[dict[str, Any]] = []
        errors: list[str] = []
        removed: list[ObjectKey] = []

        def report(**changes: Any) -> None:
            doc.update(changes, elapsed_s=round(time.monotonic() - start, 3))
            if progress is not None:
                progress(dict(doc))

        try:
            self._fence.wait_for_earlier_ops(fence)  # stores and loads that began before: done before the sweep
            # Their L1 backfills may still wait: stale them (later ops skip blocked keys when they submit one).
            self._backfill.stale_matching(selects)
            if l1:
                removed = self._pool.remove(selects) if what != "clear" else self._clear_l1_counted()
            self._invalidated_l1(removed)
            # Writes queued before the fence opened: drop the pending ones, wait for those being written (what
            # they wrote, the L2 walk below removes).
            self._add_count("purge_skipped_writes", self._writes.cancel(selects))  # not under _lock: writers count
            report(state="l1 done", l1=len(removed))
            total = 0
            for tier in self._tiers if l2 is not None else []:
                assert l2 is not None
                entry: dict[str, Any] = {"tier": tier.name, "deleted": 0}
                tiers.append(entry)
                base = total

                def tier_report(
                    n: int, batch: list[str], entry: dict[str, Any] = entry, base: int = base, tier: L2Tier = tier
                ) -> None:
                    entry["deleted"] = n
                    self._invalidated_l2(tier, batch)
                    report(state="l2", tier=entry["tier"], l2_deleted=base + n)

                try:
                    n = l2(tier, batch_size, tier_report)
                except (L2Error, NotImplementedError) as exc:
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                    errors.append(f"{tier.name}: {entry['error']}")
                    if isinstance(exc, L2Error):
                        self._l2_failed(tier, exc)
                    log.warning("%s: L2 %s not fully invalidated: %s", what, tier.name, exc)
                else:
                    entry["deleted"] = n
                total += entry["deleted"]
            report(state="done", l2_deleted=total)
        finally:
            self._fence.close(fence)
            with self._lock:
                self.counts["invalidations"] += 1
        return {
            "l1": len(removed),
            "l2": tiers,
            "l2_deleted": sum(t["deleted"] for t in tiers),
            "errors": errors,
            "elapsed_s": round(time.monotonic() - start, 3),
            "_l1_keys": removed,
        }

    def _invalidated_l1(self, keys: list[ObjectKey]) -> None:
        """``keys`` were removed from L1 by an invalidation (an operator's delete / purge / clear)."""
        self._emit("purged", keys, L1_TIER)

    def _invalidated_l2(self, tier: L2Tier, names: list[str]) -> None:
        """Records ``names`` (``ObjectKey.to_str()``) were removed from ``tier`` by an invalidation."""
        self._emit_names("purged", self._tier_label(tier), names)

    def _clear_l1_counted(self) -> list[ObjectKey]:
        removed = self._pool.remove(lambda key: True)
        self._pool.clear()  # gives the pages back too
        return removed

    def close(self) -> None:
        """Finish every pending L2 write, then release L1 and the adapters. Idempotent. Stores that come once
        closing began raise; the writers never die, so the drain always ends and this never hangs."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # from here on store() refuses to queue (checked under this lock)
        with self._calls:  # calls that began before: they finish (bounded by the adapters' timeouts) first
            self._calls.wait_for(lambda: self._in_flight == 0)
        self._writes.close()  # every acknowledged write is written or counted as failed first
        self._backfill.close()  # it copies into L1: done before L1 is unmapped
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
        self._emit_names("evicted", tier, names)

    def _on_l2_written(self, tier: L2Tier, keys: Sequence[ObjectKey], sizes: Sequence[int]) -> None:
        """The write pipeline wrote ``keys`` to ``tier``."""
        self._emit_stored(keys, keys, sizes, self._tier_label(tier))

    def _emit_names(self, kind: Kind, tier: str, names: Sequence[str]) -> None:
        """``kind`` events for records named ``names`` (``ObjectKey.to_str()`` strings)."""
        events = self._events
        if events is not None and events.has_listeners:
            events.emit(kind, _key_fields(names), tier)

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
    parsed = (parse_key_str(name) for name in names)
    return [(f.model_name, f.kv_rank, f.salt_digest, f.chunk_hash) for f in parsed if f is not None]
