"""The purge fence: nothing stored before ``Store.purge()`` / ``delete()`` / ``clear()`` returns is served after it.

Stale data can come back three ways: from L1, from an L2 write still queued (or being written) when the purge
walks L2, and from a load in flight (it read the record before the walk removed it, and would put it into L1 or hand
it out afterwards). A fence closes all three with one monotonic *generation*:

* every Store operation (store, retrieve, lookup, the write-behind worker's write of a queued batch) runs as an *op*
  stamped with the generation at which it began; a queued write carries the generation of the store that queued it;
* a purge opens a fence (a new generation ``start``), waits until every op that began before ``start`` has left (a
  grace period: they are concurrent with the purge and ordered before it), then removes the keys from L1 and walks
  L2; it closes the fence by taking another generation ``end``;
* while a fence is open, and for every op stamped before its ``end``, the fence *blocks* its keys: a store skips
  them, a queued write skips them, a load does not put them into L1, a read reports them as misses.

So after ``purge()`` returns: L1 holds none of the keys (the ops that could add them either left before the L1 sweep
or were blocked), L2 holds none (writes stamped before ``end`` skip them, the walk removed the rest), and no op that
began before ``end`` hands one out. Ops that begin after ``end`` see the cache without them. The cost when no purge
runs is a few dict operations per op (no lock: an op is registered under its thread id, one op running per thread
at a time) and an integer compare per check (:meth:`PurgeFence.blocked` returns ``None`` at once when no fence can
concern the op); the purge, not the ops, pays for waiting (it polls).

Generations are process-wide (one counter for every Store), so a stamp taken anywhere orders correctly against any
Store's fences; a queued write stamped outside any op (a pipeline thread) takes the current generation.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.types import ObjectKey

#: Closed fences remembered for queued writes and ops stamped before their end; older ones are forgotten, and an
#: op or write stamped before the oldest one remembered is treated as blocked for every key (a dropped write, a
#: miss: safe for a cache, and only after this many invalidations while it waited).
HISTORY = 1024

_counter = itertools.count(1)
_counter_lock = threading.Lock()
_current = 0
_local = threading.local()


def _next_generation() -> int:
    global _current
    with _counter_lock:
        _current = next(_counter)
        return _current


def stamp() -> int:
    """The generation of the op running in this thread, else the current one (what a queued write carries)."""
    gen: int | None = getattr(_local, "gen", None)
    return _current if gen is None else gen


@dataclass(eq=False)
class Fence:
    """One invalidation: ``selects(key)`` says which keys it removes; open until :meth:`PurgeFence.close`."""

    start: int
    selects: Callable[[ObjectKey], bool]
    end: float = float("inf")  # the generation that closed it; inf while open
    progress: dict[str, Any] = field(default_factory=dict)


class PurgeFence:
    """The fence of one Store: op bookkeeping and the fences open or remembered (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # taken by fences only: ops never take it
        # thread id -> the stamp of the op that thread runs now. A dict item set / pop is atomic, so ops register
        # without a lock; one op runs per thread at a time (the write-behind worker too), so a thread id names one
        # op. -1 while an op registers and has not read its stamp yet.
        self._ops: dict[int, int] = {}
        self._fences: list[Fence] = []  # open and recently closed, by end (the open ones last); replaced, never mutated
        self._floor = 0  # ops stamped before this may predate a forgotten fence: everything is blocked for them

    # -- ops ----------------------------------------------------------------------------------------------------
    def enter(self, gen: int | None = None) -> int:
        """Begin an op stamped ``gen`` (default: now) in this thread; returns the stamp. Pair with :meth:`leave`.

        The op is registered before it reads its stamp: a fence that takes its generation after that read gives
        the op an older stamp and finds it registered (and waits for it); one that took it before gave the op a
        stamp that is not older (the op is then blocked by the fence instead)."""
        ident = threading.get_ident()
        self._ops[ident] = -1
        g = _current if gen is None else gen
        self._ops[ident] = g
        _local.gen = g
        return g

    def leave(self, gen: int) -> None:
        _local.gen = None
        self._ops.pop(threading.get_ident(), None)

    def blocked(self, keys: Sequence[ObjectKey], gen: int) -> list[bool] | None:
        """Which of ``keys`` a fence blocks for an op stamped ``gen``; ``None`` when none is (the common case,
        decided without looking at a key)."""
        fences = self._fences  # a consistent snapshot without the lock
        if not fences or (gen >= fences[-1].end and gen >= self._floor):
            return None
        if gen < self._floor:
            return [True] * len(keys)
        concerned = [f for f in fences if gen < f.end]
        if not concerned:
            return None
        out = [any(f.selects(k) for f in concerned) for k in keys]
        return out if any(out) else None

    # -- fences -------------------------------------------------------------------------------------------------
    def open(self, selects: Callable[[ObjectKey], bool]) -> Fence:
        """Open a fence; from now on its keys are blocked. Follow with :meth:`wait_for_earlier_ops`."""
        with self._lock:
            fence = Fence(_next_generation(), selects)
            self._fences = [*self._fences, fence]
        return fence

    def wait_for_earlier_ops(self, fence: Fence) -> None:
        """Wait until every op stamped before ``fence`` opened has left: a grace period, bounded by those ops' own
        timeouts; ops that begin meanwhile do not prolong it. Polled (from 0.5 ms up to 10 ms), so that ops pay
        for no wake-up of their own."""
        pause = 0.0005
        while any(g < fence.start for g in list(self._ops.values())):
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def close(self, fence: Fence) -> None:
        """Close ``fence``: ops stamped from now on are no longer blocked by it."""
        with self._lock:
            fence.end = _next_generation()
            fences = sorted(self._fences, key=lambda f: f.end)  # closed ones by end; the open ones (inf) last
            while len(fences) > HISTORY and fences[0].end != float("inf"):
                self._floor = max(self._floor, int(fences.pop(0).end))
            self._fences = fences

    def running(self) -> list[dict[str, Any]]:
        """The progress documents of the open fences (for stats)."""
        return [dict(f.progress) for f in self._fences if f.end == float("inf")]
