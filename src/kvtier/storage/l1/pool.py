"""The L1 pool: objects as views into the arena, an eviction policy, and pins for in-flight reads and writes.

An object's life: :meth:`L1Pool.reserve` allocates room (evicting unpinned objects in policy order) and returns
the object pinned and invisible; the caller fills :meth:`L1Pool.view`; :meth:`L1Pool.commit` makes it visible
(replacing an older object of the same key) or :meth:`L1Pool.release` drops it. Readers :meth:`acquire` (pin)
objects, copy out, and :meth:`release` them. A pinned object is never evicted and its memory never reused; an
object replaced, cleared or evicted while pinned is freed when its last pin goes (vLLM's ``ref_cnt`` habit).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import CapacityError
from kvtier.storage.l1.allocator import Allocator
from kvtier.storage.l1.arena import Arena
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


class L1Pool:
    """``size`` bytes of shared memory holding objects under ``policy`` (a name from :mod:`..policies`)."""

    def __init__(self, size: int, policy: str = "LRU") -> None:
        self._policy = create_policy(policy)
        self.arena = Arena(size)
        self._alloc = Allocator(self.arena.size)
        self._index: dict[ObjectKey, L1Object] = {}
        self._lock = threading.Lock()
        self.counts = {"evictions": 0, "hits": 0, "misses": 0, "refused": 0}
        self._used = 0  # bytes of live and pinned objects

    @property
    def capacity(self) -> int:
        return self._alloc.size

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
            offset = self._alloc.alloc(nbytes)
            if offset is None:
                for victim in self._policy.victims():
                    obj = self._index[victim]
                    if obj.pins:
                        continue
                    self._evict_locked(obj)
                    offset = self._alloc.alloc(nbytes)
                    if offset is not None:
                        break
            if offset is None:
                self.counts["refused"] += 1
                raise CapacityError(
                    f"L1 pool cannot fit {nbytes} bytes: {self._alloc.free_bytes} free in {self._alloc.free_blocks} "
                    "block(s), the rest pinned by reads and writes in flight"
                )
            self._used += self._alloc.rounded(nbytes)
        return L1Object(key, offset, nbytes, shape, dtype)

    def commit(self, obj: L1Object, keep_pin: bool = False) -> None:
        """Make a reserved object visible, replacing an older one of its key; drop the reserve pin unless
        ``keep_pin`` (the caller then releases it later, e.g. after the L2 write)."""
        with self._lock:
            old = self._index.pop(obj.key, None)
            if old is not None:
                self._unindex_locked(old)
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
        """Drop every object; pinned ones are freed when their pins go."""
        with self._lock:
            for obj in list(self._index.values()):
                self._unindex_locked(obj)
                if not obj.pins:
                    self._free_locked(obj)
            self._index.clear()

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
                "used_bytes": self._used,
                "objects": len(self._index),
                "free_blocks": self._alloc.free_blocks,
                "largest_free_block": self._alloc.largest_free,
                "shm_path": str(self.arena.path),
                **self.counts,
            }

    def close(self) -> None:
        with self._lock:
            self._index.clear()
        self.arena.close()
