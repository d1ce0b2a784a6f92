"""Background L1 backfill: an L2 hit loaded straight into a caller's tensor is still admitted to L1, later.

``retrieve_into`` loads an L2 hit straight into the caller's tensor (read in place for a tier without serde or
with ``raw``; decoded into it otherwise), so the caller waits for one read and one decode, not for a decode into
L1 and a copy out. The copy into L1 happens here, off the caller's critical path, on one thread:

* **Trusted.** The caller owns its tensor again once ``retrieve_into`` returned and may overwrite it at once. So
  L1's copy is made by the hit's :class:`~kvtier.l2.tier.Refill`: copied from the caller's tensor and checked
  against the record's own checksum (a record read in place: its payload *is* the tensor's bytes), or decoded
  again from the record's encoded bytes, verified at load and kept by the tier for this (fp8, compression,
  encryption: a checksum covers the encoded bytes, not the decoded ones). A copy that does not check out is
  dropped, never committed.
* **Never over newer data.** A store, delete or clear of a key marks its pending backfills stale
  (:meth:`Backfill.stale`, called *before* the store commits to L1), and a backfill commits only when it is not
  stale and L1 holds nothing under the key, both checked under one lock with the commit. So an older L2 copy
  never replaces a newer L1 object.
* **Bounded.** At most ``max_bytes`` of backfills wait (the caller's tensors they read, or the encoded bytes they
  keep; one larger backfill when none waits); past that, and when L1 has no unpinned room, a backfill is skipped
  (counted), never waited for.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from kvtier.errors import CapacityError
from kvtier.l2.tier import Refill
from kvtier.storage.l1 import L1Object, L1Pool
from kvtier.types import ObjectKey

log = logging.getLogger(__name__)


_RELEASED = torch.empty(0, dtype=torch.uint8)


@dataclass(eq=False)
class _Job:
    key: ObjectKey
    shape: tuple[int, ...]
    dtype: torch.dtype
    loaded: torch.Tensor  # the caller's tensor while the refill reads it, else _RELEASED
    refill: Refill
    done: Callable[[], None] | None
    stale: bool = False
    nbytes: int = 0
    l2_held: int = 0  # the L1 object's mark of the L2 tiers that hold it (the Store's write admission)


class Backfill:
    """One thread copying L2 hits from callers' tensors into L1; see the module docstring. ``count(name, n)``
    adds to the Store's counters (``l1_backfilled``, ``l1_backfill_skipped``)."""

    def __init__(
        self,
        pool: L1Pool,
        max_bytes: int,
        count: Callable[[str, int], None],
        landing: Callable[[L1Object], None] | None = None,
    ) -> None:
        self._landing = landing  # called with an object just before it commits (the Store's KV event)
        self._pool = pool
        self._max_bytes = max_bytes
        self._count = count
        self._cv = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._by_key: dict[ObjectKey, list[_Job]] = {}
        self._bytes = 0
        self._running = 0  # jobs taken by the thread and not finished
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(
        self,
        key: ObjectKey,
        loaded: torch.Tensor,
        refill: Refill,
        done: Callable[[], None] | None,
        l2_held: int = 0,
    ) -> bool:
        """Queue the L1 copy of ``loaded`` (the caller's tensor an L2 hit of ``key`` was loaded into), made by
        ``refill``, which the backfill closes. ``done`` is called once nothing reads ``loaded`` any more (after
        the job when the refill reads it, else at once; also at once when the job is refused: the return value is
        then False). ``l2_held``: set on the L1 object it commits (``L1Object.l2_held``: the tier it was read
        from holds it)."""
        reads = refill.reads_loaded
        job = _Job(
            key,
            tuple(loaded.shape),
            loaded.dtype,
            loaded if reads else _RELEASED,
            refill,
            done if reads else None,
            nbytes=loaded.numel() * loaded.element_size() if reads else refill.nbytes,
            l2_held=l2_held,
        )
        with self._cv:
            # Over the bound only when something is pending: an object larger than the bound still gets its turn.
            if self._closed or (self._bytes and self._bytes + job.nbytes > self._max_bytes):
                refused = True
            else:
                refused = False
                self._jobs.append(job)
                self._by_key.setdefault(key, []).append(job)
                self._bytes += job.nbytes
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="kvtier-l1-backfill", daemon=True)
                    self._thread.start()
                self._cv.notify_all()
        if refused:
            self._count("l1_backfill_skipped", 1)
            refill.close()
        if (refused or not reads) and done is not None:
            done()  # nothing of the caller's is read any more
        return not refused

    def stale(self, keys: Iterable[ObjectKey] | None) -> None:
        """Pending backfills of ``keys`` (``None``: all) must not land: call before a store of them commits to
        L1, and on a delete or clear."""
        if not self._by_key:  # nothing pending: the common case costs no lock
            return
        with self._cv:
            if keys is None:
                for jobs in self._by_key.values():
                    for job in jobs:
                        job.stale = True
                return
            for key in keys:
                for job in self._by_key.get(key, ()):
                    job.stale = True

    def stale_matching(self, selects: Callable[[ObjectKey], bool]) -> None:
        """Pending backfills of the keys ``selects`` picks must not land (a purge or delete of them)."""
        if not self._by_key:
            return
        with self._cv:
            for key, jobs in self._by_key.items():
                if selects(key):
                    for job in jobs:
                        job.stale = True

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    if self._closed:
                        return
                    self._cv.wait()
                job = self._jobs.popleft()
                self._running += 1
            landed = False
            try:
                landed = self._run(job)
            except Exception:  # a bug must not kill the thread (drain would hang): logged, the backfill skipped
                log.exception("L1 backfill of %s failed", job.key.to_str())
            finally:
                # Everything a job does is done before drain() can see it finished (flush() then close()).
                job.loaded = _RELEASED  # drop the reference to the caller's memory before saying so
                job.refill.close()
                self._count("l1_backfilled" if landed else "l1_backfill_skipped", 1)
                if job.done is not None:
                    job.done()
                with self._cv:
                    self._running -= 1
                    self._bytes -= job.nbytes
                    jobs = self._by_key.get(job.key, [])
                    if job in jobs:
                        jobs.remove(job)
                    if not jobs:
                        self._by_key.pop(job.key, None)
                    self._cv.notify_all()

    def _run(self, job: _Job) -> bool:
        if job.stale or self._pool.contains([job.key])[0]:
            return False
        try:
            obj = self._pool.reserve(job.key, job.shape, job.dtype)
        except CapacityError:  # L1 is pinned full: a cache may skip, it must not wait
            return False
        committed = False
        try:
            if not job.refill.fill(self._pool.view(obj), job.loaded):
                return False
            with self._cv:  # checked and committed under the lock stale() takes: a newer store always wins
                if job.stale or self._pool.contains([job.key])[0]:
                    return False
                obj.l2_held = job.l2_held  # not visible yet: no other thread reads it
                if self._landing is not None:
                    self._landing(obj)
                self._pool.commit(obj)
                committed = True
            return True
        finally:
            if not committed:
                self._pool.release([obj])

    def drain(self) -> None:
        """Wait until every queued backfill has run (or was skipped)."""
        with self._cv:
            self._cv.wait_for(lambda: not self._jobs and not self._running)

    def close(self) -> None:
        """Drain, then stop the thread; later submits are refused (their ``done`` called at once)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
