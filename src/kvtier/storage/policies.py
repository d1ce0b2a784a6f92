"""Eviction policies by name, apart from storage: a policy only orders victims (cachetools' habit).

The owner (the L1 pool, the fs adapter) tells the policy what happens (``insert``, ``access``, ``remove``) and,
when it needs room, walks :meth:`EvictionPolicy.victims`: candidates in eviction order. It skips the ones it
cannot evict now (pinned objects) and calls ``remove`` for each one it does evict. Policies count objects, not
bytes: the owner keeps evicting until the bytes it needs are free. Not thread-safe: the owner holds its lock.

``LRU`` (default), ``LFU``, ``FIFO`` and ``S3-FIFO`` (scan-resistant: a small probationary FIFO in front of the
main one, and a ghost list of recently evicted keys, after Yang et al., SOSP 2023).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

from kvtier.errors import ConfigError

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(ABC, Generic[K]):
    """Orders the keys an owner holds for eviction."""

    @abstractmethod
    def insert(self, key: K) -> None:
        """A new key was stored (a key already present is treated as an access)."""

    @abstractmethod
    def access(self, key: K) -> None:
        """A present key was read."""

    @abstractmethod
    def remove(self, key: K) -> None:
        """The key is gone (evicted or deleted); unknown keys are ignored."""

    @abstractmethod
    def victims(self) -> Iterator[K]:
        """Present keys, best victim first. The owner may stop early; each key appears at most once."""

    @abstractmethod
    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool:
        raise NotImplementedError


class LRUPolicy(EvictionPolicy[K]):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()

    def insert(self, key: K) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: K) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: K) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[K]:
        return _windowed(lambda: iter(self._order), self.__contains__)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


class FIFOPolicy(LRUPolicy[K]):
    """First stored first; reads do not change the order."""

    def insert(self, key: K) -> None:
        if key not in self._order:
            self._order[key] = None

    def access(self, key: K) -> None:
        pass


class LFUPolicy(EvictionPolicy[K]):
    """Least frequently used first; among equals, the least recently used."""

    def __init__(self) -> None:
        self._count: dict[K, int] = {}
        self._buckets: dict[int, OrderedDict[K, None]] = {}

    def _move(self, key: K, old: int | None, new: int) -> None:
        if old is not None:
            bucket = self._buckets[old]
            del bucket[key]
            if not bucket:
                del self._buckets[old]
        self._buckets.setdefault(new, OrderedDict())[key] = None
        self._count[key] = new

    def insert(self, key: K) -> None:
        if key in self._count:
            self.access(key)
        else:
            self._move(key, None, 1)

    def access(self, key: K) -> None:
        old = self._count.get(key)
        if old is not None:
            self._move(key, old, old + 1)

    def remove(self, key: K) -> None:
        old = self._count.pop(key, None)
        if old is not None:
            bucket = self._buckets[old]
            del bucket[key]
            if not bucket:
                del self._buckets[old]

    def victims(self) -> Iterator[K]:
        return _windowed(lambda: (k for c in sorted(self._buckets) for k in self._buckets[c]), self.__contains__)

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, key: object) -> bool:
        return key in self._count


class S3FIFOPolicy(EvictionPolicy[K]):
    """S3-FIFO: new keys enter a small FIFO (10 % of the keys); a key read while there is promoted to the main
    FIFO, one never read again is evicted early, so a one-off scan cannot flush the reused working set. The main
    FIFO gives each key up to 3 more chances by its read count. Keys evicted from the small FIFO are remembered
    in a ghost list; re-inserted, they go straight to the main FIFO."""

    SMALL_RATIO = 0.1
    MAX_FREQ = 3

    def __init__(self) -> None:
        self._small: OrderedDict[K, None] = OrderedDict()
        self._main: OrderedDict[K, None] = OrderedDict()
        self._ghost: OrderedDict[K, None] = OrderedDict()
        self._freq: dict[K, int] = {}

    def insert(self, key: K) -> None:
        if key in self._freq:
            self.access(key)
            return
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def access(self, key: K) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, self.MAX_FREQ)

    def remove(self, key: K) -> None:
        if self._freq.pop(key, None) is None:
            return
        if key in self._small:
            del self._small[key]
            # Evicted straight from probation: remember it, so a quick return earns the main queue.
            self._ghost[key] = None
            while len(self._ghost) > max(len(self._freq), 1):
                self._ghost.popitem(last=False)
        else:
            self._main.pop(key, None)

    def victims(self) -> Iterator[K]:
        # Each pass reorders as S3-FIFO does (promote, give chances); bounded so that an owner whose keys are
        # all pinned ends the walk instead of spinning.
        seen: set[K] = set()
        for _ in range(4 * len(self._freq) + 4):
            key = self._next_candidate()
            if key is None:
                return
            if key in seen:
                # Everything left was offered once already: offer the rest in queue order and stop.
                yield from [k for k in (*self._small, *self._main) if k not in seen]
                return
            seen.add(key)
            yield key
        yield from [k for k in (*self._small, *self._main) if k not in seen]

    def _next_candidate(self) -> K | None:
        while self._small or self._main:
            if self._small and (len(self._small) >= self.SMALL_RATIO * len(self._freq) or not self._main):
                key = next(iter(self._small))
                if self._freq[key] > 0:  # read while on probation: promote
                    del self._small[key]
                    self._freq[key] = 0
                    self._main[key] = None
                    continue
                self._small.move_to_end(key)  # the owner may skip it (pinned); do not offer it again first
                return key
            key = next(iter(self._main))
            if self._freq[key] > 0:
                self._freq[key] -= 1
                self._main.move_to_end(key)
                continue
            self._main.move_to_end(key)
            return key
        return None

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq


def _windowed(front: Callable[[], Iterator[K]], present: Callable[[K], bool]) -> Iterator[K]:
    """The keys of an order (``front()`` iterates it from the best victim), each offered once, read in windows.

    The owner removes keys while walking, so the order cannot be iterated across a ``yield``; copying all of it per
    eviction costs O(keys) (milliseconds for 100,000s of keys). The keys offered and skipped (pinned) stay at the
    front, so each window spans them plus a few new ones, doubling while the owner keeps skipping: an eviction that
    takes the first unpinned key copies a handful of keys."""
    seen: set[K] = set()
    kept = 0  # keys offered and still present: the part of the front the next window must reach past
    want = 8
    while True:
        size = kept + want
        window = list(itertools.islice(front(), size))
        fresh = [k for k in window if k not in seen]
        for key in fresh:
            seen.add(key)
            yield key
        if len(window) < size and not fresh:
            return  # the window held the whole order and nothing new
        # What the owner left of this window stays at the front (keys it read moved back: the window then reaches a
        # little further than it needs). O(window), so a whole walk copies O(keys) in all.
        kept = len(window) - len(fresh) + sum(1 for k in fresh if present(k))
        want = min(want * 2, 1 << 16)


POLICIES: dict[str, Callable[[], EvictionPolicy[Any]]] = {
    "LRU": LRUPolicy,
    "LFU": LFUPolicy,
    "FIFO": FIFOPolicy,
    "S3-FIFO": S3FIFOPolicy,
}


def create_policy(name: str, field: str = "eviction_policy") -> EvictionPolicy[Any]:
    """A new policy by name (case-insensitive); an unknown name lists the known ones."""
    if isinstance(name, str):
        for known, factory in POLICIES.items():
            if known.lower() == name.lower():
                return factory()
    raise ConfigError(f"{field}: unknown eviction policy {name!r}; expected one of {list(POLICIES)}")
