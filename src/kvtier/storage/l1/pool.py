"""The L1 pool: objects as views into the arena, an eviction policy, and pins for in-flight reads and writes.

An object's life: :meth:`L1Pool.reserve` allocates room (evicting unpinned objects in policy order) and returns
the object pinned and invisible; the caller fills :meth:`L1Pool.view`; :meth:`L1Pool.commit` makes it visible
(replacing an older object of the same key) or :meth:`L1Pool.release` drops it. Readers :meth:`acquire` (pin)
objects, copy out, and :meth:`release` them. A pinned object is never evicted and its memory never reused; an
object replaced, cleared or evicted while pinned is freed when its last pin goes (vLLM's ``ref_cnt`` habit).
Every block is freed exactly once: when it is evicted, replaced or cleared unpinned, or else with its last pin,
so ``used_bytes`` is always the sum of the blocks of indexed and pinned objects.

The pool grows into its arena only as far as :class:`~kvtier.storage.l1.arena.MemoryBudget` allows (the
effective capacity, ``min(l1_size_gb, what the cgroup or host can give minus a headroom)``); past it a reserve
evicts, or raises :class:`CapacityError`, rather than touch pages the host cannot back.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import CapacityError
from kvtier.storage.l1.allocator import Allocator
from kvtier.storage.l1.arena import Arena, MemoryBudget
from kvtier.storage.policies import create_policy
from kvtier.types import ObjectKey


@dataclass(eq=False)
class L1Object:
    """One object in the arena: where it lives, what it holds, how many pins it has, whether it is indexed."""

    key: ObjectKey
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    pins: int = 1
    live: bool = False
    l2_held: int = 0  # bit i: L2 tier i holds this object or has its write queued (the Store's write admission)


class L1Pool:
    """``size`` bytes of memory (``backing``: ``anonymous``, ``memfd`` or ``hugepages``, see
    :class:`~kvtier.storage.l1.arena.Arena`) holding objects under ``policy`` (a name from :mod:`..policies`).
    ``headroom``: bytes the pool leaves to the rest of the host (default: 5 % of the memory limit, >= 256 MiB)."""

    def __init__(self, size: int, policy: str = "LRU", backing: str = "anonymous", headroom: int | None = None) -> None:
        self._policy = create_policy(policy)
        self.arena = Arena(size, backing)
        self._alloc = Allocator(self.arena.size)
        self._budget = MemoryBudget(self._alloc.size, headroom, reserved=self.arena.backing == "hugepages")
        self._high_water = 0  # [0, high_water) may be resident; growth past it costs the host memory
        self._index: dict[ObjectKey, L1Object] = {}
        self._lock = threading.Lock()
        self.counts = {"evictions": 0, "hits": 0, "misses": 0, "refused": 0}
        self._used = 0  # bytes of live and pinned objects

    @property
    def capacity(self) -> int:
        """The configured size in bytes (aligned)."""
        return self._alloc.size

    @property
    def effective_capacity(self) -> int:
        """The bytes the pool may use now: the configured size, or less when the host or cgroup is short."""
        with self._lock:
            return self._budget.limit(self._high_water)

    def view(self, obj: L1Object) -> torch.Tensor:
        """The object's memory as a tensor of its shape and dtype (valid while the caller holds a pin)."""
        flat = self.arena.buffer[obj.offset : obj.offset + obj.nbytes]
        return flat.view(obj.dtype).view(obj.shape)

    def reserve(self, key: ObjectKey, shape: Sequence[int], dtype: torch.dtype) -> L1Object:
        """Room for one object, pinned and not yet visible. Raises CapacityError when it cannot fit: larger than
        the pool, or too little unpinned memory to evict."""
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self._alloc.rounded(nbytes) > self.capacity:
            with self._lock:
                self.counts["refused"] += 1
            raise CapacityError(f"object {key.to_str()} of {nbytes} bytes is larger than the L1 pool ({self.capacity})")
        with self._lock:
            offset = self._alloc_locked(nbytes)
            if offset is None:
                for victim in self._policy.victims():
                    obj = self._index[victim]
                    if obj.pins:
                        continue
                    self._evict_locked(obj)
                    offset = self._alloc_locked(nbytes)
                    if offset is not None:
                        break
            if offset is None:
                self.counts["refused"] += 1
                limit = self._budget.limit(self._high_water)
                why = "the rest pinned by reads and writes in flight"
                if limit < self.capacity:
                    why += f"; the host's free memory caps the pool at {limit} of its {self.capacity} bytes"
                raise CapacityError(
                    f"L1 pool cannot fit {nbytes} bytes: {self._alloc.free_bytes} free in {self._alloc.free_blocks} "
                    f"block(s), {why}"
                )
            self._used += self._alloc.rounded(nbytes)
        return L1Object(key, offset, nbytes, shape, dtype)

    def _alloc_locked(self, nbytes: int) -> int | None:
        """A block inside the resident part, else one that grows it as far as the memory budget allows."""
        need = self._alloc.rounded(nbytes)
        offset = self._alloc.alloc(nbytes, self._high_water)
        if offset is None:
            offset = self._alloc.alloc(nbytes, self._budget.limit(self._high_water))
            if offset is not None:
                self._high_water = max(self._high_water, offset + need)
        return offset

    def commit(self, obj: L1Object, keep_pin: bool = False) -> None:
        """Make a reserved object visible, replacing an older one of its key; drop the reserve pin unless
        ``keep_pin`` (the caller then releases it later, e.g. after the L2 write)."""
        with self._lock:
            old = self._index.pop(obj.key, None)
            if old is not None and old is not obj:
                self._unindex_locked(old)
                if not old.pins:  # a pinned one goes with its last pin
                    self._free_locked(old)
            obj.live = True
            self._index[obj.key] = obj
            self._policy.insert(obj.key)
            if not keep_pin:
                self._unpin_locked(obj)

    def acquire(self, keys: Sequence[ObjectKey]) -> list[L1Object | None]:
        """Pin the visible objects of ``keys`` (``None`` for misses) and count the reads."""
        out: list[L1Object | None] = []
        with self._lock:
            for key in keys:
                obj = self._index.get(key)
                if obj is None:
                    self.counts["misses"] += 1
                else:
                    self.counts["hits"] += 1
                    obj.pins += 1
                    self._policy.access(key)
                out.append(obj)
        return out

    def release(self, objs: Sequence[L1Object | None]) -> None:
        """Drop one pin from each object; an unindexed object is freed with its last pin."""
        with self._lock:
            for obj in objs:
                if obj is not None:
                    self._unpin_locked(obj)

    def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def clear(self) -> None:
        """Drop every object and give the free memory's pages back to the kernel; pinned objects are freed when
        their pins go."""
        with self._lock:
            for obj in list(self._index.values()):
                self._unindex_locked(obj)
                if not obj.pins:
                    self._free_locked(obj)
            self._index.clear()
            self._trim_locked()

    def remove(self, selects: Callable[[ObjectKey], bool], batch: int = 4096) -> list[ObjectKey]:
        """Drop the visible objects whose key ``selects`` picks and return their keys (an invalidation, not an
        eviction: not counted as one). Pinned objects are freed when their pins go. The index is walked outside
        the lock and the keys removed in batches, so a purge of a large pool does not stall the serving path."""
        with self._lock:
            snapshot = list(self._index)
        picked = [k for k in snapshot if selects(k)]
        removed: list[ObjectKey] = []
        for start in range(0, len(picked), batch):
            with self._lock:
                for key in picked[start : start + batch]:
                    obj = self._index.pop(key, None)
                    if obj is None:
                        continue
                    self._unindex_locked(obj)
                    if not obj.pins:
                        self._free_locked(obj)
                    removed.append(key)
        return removed

    def _trim_locked(self) -> None:
        """Release the pages of every free block and lower the high-water mark to the highest live block."""
        for start, end in self._alloc.free_ranges():
            if start < self._high_water:
                self.arena.release_pages(start, min(end, self._high_water))
        self._high_water = self._alloc.used_end
        self._budget.refresh()

    def _evict_locked(self, obj: L1Object) -> None:
        del self._index[obj.key]
        self._unindex_locked(obj)
        self._free_locked(obj)
        self.counts["evictions"] += 1

    def _unindex_locked(self, obj: L1Object) -> None:
        obj.live = False
        self._policy.remove(obj.key)

    def _unpin_locked(self, obj: L1Object) -> None:
        if obj.pins <= 0:
            raise RuntimeError(f"L1 object {obj.key.to_str()} released more often than pinned")
        obj.pins -= 1
        if not obj.pins and not obj.live:
            self._free_locked(obj)

    def _free_locked(self, obj: L1Object) -> None:
        self._used -= self._alloc.rounded(obj.nbytes)
        self._alloc.free(obj.offset)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "capacity_bytes": self.capacity,
                "effective_capacity_bytes": self._budget.limit(self._high_water),
                "backing": self.arena.backing,
                "used_bytes": self._used,
                "objects": len(self._index),
                "free_blocks": self._alloc.free_blocks,
                "largest_free_block": self._alloc.largest_free,
                **self.counts,
            }

    def close(self) -> None:
        with self._lock:
            self._index.clear()
        self.arena.close()
