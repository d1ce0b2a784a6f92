"""The Store's write-behind pipeline: L1 objects on their way to the L2 tiers.

::

    Store.store() -> copy into L1 -> WritePipeline.submit(Write)        (no room: dropped, counted, never waited for)
                                       |  one lane per L2 tier: pending records by key, in arrival order
                                       v
                     lane writers (``L2Tier.writers`` threads) take batches -> L2Tier.store (encode | checksum | write,
                                                                                round k+1 encoding while k is written)

**Bounded.** A write holds its L1 objects pinned until every tier it is for is done with them, so pending writes
are bounded in bytes (the L1 pins they hold: below ``max_pending_bytes`` when a new one is accepted) and in
count (``max_pending`` store batches). Past either bound a new write is dropped at once, never waited for.

**Batched and concurrent.** A lane writer takes every pending record it can (up to a batch's share among the
lane's writers), so a slow backend sees fewer, larger batches (one directory fsync per batch on fs) rather than
falling behind one store call at a time; a backend that benefits (local disk: fsyncs of several batches
overlap) gets several writers.

**Ordered.** Per tier, a key is written by one writer at a time, and the pending record of a key is always its
newest: a newer store replaces a pending one in place (the older one is *superseded*: released, counted, never
written), and a key being written is not taken by another writer until that write returned. So a newer store of a
key is never overwritten in L2 by an older one still in the pipeline.

**Never stuck.** A writer survives anything a tier raises (counted as a failure of that batch's records) and
always releases its pins; :meth:`WritePipeline.drain` returns once every accepted write is done, failed or
superseded; :meth:`WritePipeline.close` drains, then stops the writers.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvtier.l2.tier import L2Tier
from kvtier.storage.l1 import L1Object, L1Pool
from kvtier.types import ObjectKey

log = logging.getLogger(__name__)

#: most records one writer hands to its tier in one call: enough to amortise a batch's fixed costs (a directory
#: fsync, a round trip), few enough that a failure fails little and other writers get work too
MAX_BATCH_RECORDS = 64


@dataclass(eq=False)
class Write:
    """One store call's objects on their way to L2 (the Store's ``_Write``). ``tiers``: the tiers it is for
    (``None``: every tier of the Store; admission policies name fewer). The pipeline takes over one pin of each
    object from the submitter and releases it when every tier is done with the object."""

    keys: list[ObjectKey]
    objs: list[L1Object]
    nbytes: int
    tiers: Sequence[L2Tier] | None = None
    # per object: how many tiers still have to write (or supersede) it
    _left: list[int] = field(default_factory=list, repr=False)


@dataclass(eq=False)
class _Entry:
    """One record waiting in, or being written by, one lane."""

    write: Write
    index: int  # of the object in ``write``

    @property
    def key(self) -> ObjectKey:
        return self.write.keys[self.index]

    @property
    def obj(self) -> L1Object:
        return self.write.objs[self.index]


class _Lane:
    """The pending records of one tier, by key (insertion order: the order they arrived), and its writers."""

    def __init__(self, tier: L2Tier) -> None:
        self.tier = tier
        self.writers = max(1, int(getattr(tier, "writers", 1)))
        self.pending: dict[ObjectKey, _Entry] = {}
        self.busy: set[ObjectKey] = set()  # keys a writer of this lane is writing now
        self.threads: list[threading.Thread] = []


Count = Callable[[str, int], None]
TierFailed = Callable[[L2Tier, BaseException, int], None]
TierOk = Callable[[L2Tier], None]
Written = Callable[[L2Tier, list[ObjectKey], list[int]], None]


class WritePipeline:
    """Write-behind of L1 objects to ``tiers``; see the module docstring. Thread-safe.

    ``count(name, n)`` adds to the Store's counters (``l2_written``, ``l2_writes_superseded``,
    ``l2_write_failures``); ``failed(tier, exc, n)`` / ``ok(tier)`` report a tier's batches, ``written(tier, keys,
    sizes)`` (optional) the records of a batch written. They are called without this pipeline's lock held.
    """

    def __init__(
        self,
        pool: L1Pool,
        tiers: Sequence[L2Tier],
        *,
        max_pending: int,
        max_pending_bytes: Callable[[], int],
        count: Count,
        failed: TierFailed,
        ok: TierOk,
        written: Written | None = None,
    ) -> None:
        self._pool = pool
        self._lanes = {id(t): _Lane(t) for t in tiers}
        self._order = [id(t) for t in tiers]
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._count = count
        self._failed = failed
        self._ok = ok
        self._written = written
        self._cv = threading.Condition()
        self._writes = 0  # accepted writes not yet done with every object
        self._bytes = 0  # bytes of the L1 objects those writes pin
        self._stopping = False
        #: writes refused for want of room, by the bound that refused them (a store's whole write counts once)
        self.refused = {"max_pending_l2_writes": 0, "pinned_bytes": 0}

    # -- what the Store reads ----------------------------------------------------------------------------------
    @property
    def pending_writes(self) -> int:
        return self._writes

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    # -- enqueue -----------------------------------------------------------------------------------------------
    def submit(self, write: Write) -> bool:
        """Accept ``write`` (True) or refuse it (False: no room, or closing; the caller keeps its pins).

        Room: fewer than ``max_pending`` writes pending and their pinned bytes below ``max_pending_bytes()``
        (half of L1's effective capacity: L1 always keeps unpinned room to evict, so stores are not refused).
        """
        lanes = [self._lanes[id(t)] for t in write.tiers] if write.tiers is not None else self._all_lanes()
        if not write.objs or not lanes:
            return False
        superseded: list[_Entry] = []
        with self._cv:
            if self._stopping:
                return False
            if self._writes >= self._max_pending:
                self.refused["max_pending_l2_writes"] += 1
                return False
            if self._bytes >= self._max_pending_bytes():
                self.refused["pinned_bytes"] += 1
                return False
            self._writes += 1
            self._bytes += write.nbytes
            write._left = [len(lanes)] * len(write.objs)
            for lane in lanes:
                for i, key in enumerate(write.keys):
                    old = lane.pending.get(key)
                    if old is not None:
                        superseded.append(old)
                    # Assigning an existing key keeps its place: a key re-stored again and again is not starved.
                    lane.pending[key] = _Entry(write, i)
                if not lane.threads:
                    self._start_locked(lane)
            self._cv.notify_all()
        if superseded:
            self._count("l2_writes_superseded", len(superseded))
            self._done(superseded)
        return True

    def _all_lanes(self) -> list[_Lane]:
        return [self._lanes[i] for i in self._order]

    def _start_locked(self, lane: _Lane) -> None:
        for n in range(lane.writers):
            thread = threading.Thread(
                target=self._write_loop, args=(lane,), name=f"kvtier-l2-writer-{lane.tier.name}-{n}", daemon=True
            )
            thread.start()
            lane.threads.append(thread)

    # -- writers -----------------------------------------------------------------------------------------------
    def _take_locked(self, lane: _Lane) -> list[_Entry]:
        """The oldest pending records whose keys no other writer is writing: this writer's share of them."""
        free = [key for key in lane.pending if key not in lane.busy]
        if not free:
            return []
        share = min(MAX_BATCH_RECORDS, math.ceil(len(free) / lane.writers))
        batch = [lane.pending.pop(key) for key in free[:share]]
        lane.busy.update(e.key for e in batch)
        return batch

    def _write_loop(self, lane: _Lane) -> None:
        while True:
            with self._cv:
                batch = self._take_locked(lane)
                while not batch:
                    if self._stopping and not lane.pending:
                        return
                    self._cv.wait()
                    batch = self._take_locked(lane)
            try:
                self._write_batch(lane.tier, batch)
            finally:
                with self._cv:
                    lane.busy.difference_update(e.key for e in batch)
                    self._cv.notify_all()  # a writer may wait for one of these keys
                self._done(batch)

    def _write_batch(self, tier: L2Tier, batch: list[_Entry]) -> None:
        """One batch to one tier. Whatever the tier raises is counted and logged, never fatal to the writer."""
        n = len(batch)
        try:
            tier.store([e.key for e in batch], [self._pool.view(e.obj) for e in batch])
        except Exception as exc:  # any failure of one tier, a bug included: counted and logged, not fatal
            self._failed(tier, exc, n)
        else:
            self._ok(tier)
            self._count("l2_written", n)
            if self._written is not None:
                self._written(tier, [e.key for e in batch], [e.obj.nbytes for e in batch])

    def _done(self, entries: Sequence[_Entry]) -> None:
        """Entries one lane is done with: an object every lane is done with loses its pin."""
        release: list[L1Object] = []
        with self._cv:
            for e in entries:
                left = e.write._left
                left[e.index] -= 1
                if left[e.index] == 0:
                    release.append(e.obj)
                    self._bytes -= e.obj.nbytes
                    if not any(left):
                        self._writes -= 1
            if release:
                self._cv.notify_all()  # drain() waits for these
        # Outside the lock: the pool has its own, and nothing here needs both.
        self._pool.release(release)

    # -- drain, cancel, close ----------------------------------------------------------------------------------
    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every accepted write is done (written, failed or superseded); False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._writes == 0 or self._dead_locked(), timeout)

    def _dead_locked(self) -> bool:
        """Whether records wait in a lane none of whose writers lives (only the interpreter stopping kills one)."""
        return any(
            lane.pending and lane.threads and not any(t.is_alive() for t in lane.threads)
            for lane in self._lanes.values()
        )

    def cancel(self, match: Callable[[ObjectKey], bool]) -> int:
        """Drop the pending (not yet started) records whose key ``match``es and wait for those being written;
        return how many were dropped. For a purge: after it, no write of such a key queued before lands later."""
        dropped: list[_Entry] = []
        with self._cv:
            for lane in self._lanes.values():
                for key in [k for k in lane.pending if match(k)]:
                    dropped.append(lane.pending.pop(key))
            self._cv.wait_for(lambda: not any(match(k) for lane in self._lanes.values() for k in lane.busy))
        self._done(dropped)
        return len(dropped)

    def close(self) -> None:
        """Drain every accepted write, then stop the writers. Idempotent; later submits are refused."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        while not self.drain(timeout=0.5):
            pass
        with self._cv:
            leftover = [e for lane in self._lanes.values() for e in lane.pending.values()]
            for lane in self._lanes.values():
                lane.pending.clear()
            self._cv.notify_all()
        if leftover:  # only when every writer of a lane died (the interpreter stopping): counted, released
            self._count("l2_write_failures", len(leftover))
            self._done(leftover)
        for lane in self._lanes.values():
            for thread in lane.threads:
                thread.join()
