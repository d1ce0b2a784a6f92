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

Tenants. A :class:`~kvtier.tenants.UsageLedger` keeps the bytes and objects of each tenant (salt digest) and
model: a tenant's bytes are the blocks held for its objects (reserved, indexed, or replaced but still pinned), so
they add up to ``used_bytes``; its objects are its indexed ones, adding up to ``objects``. With quotas
(:class:`~kvtier.tenants.TenantQuotas`), a reserve that would take a tenant past its quota first evicts that
tenant's own unpinned objects in policy order, so one tenant's burst evicts its own objects, not everyone's. A
tenant goes over its quota only by objects pinned by reads and writes in flight (a store batch larger than the
quota still reaches L2: its objects stay pinned until written); when such a pin goes, the tenant's objects are
evicted back down to its quota at once. So at any moment a tenant over its quota has every object pinned, and
holds no more than its quota once its operations in flight are done. An object larger than its tenant's quota is
refused.
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
from kvtier.tenants import TenantQuotas, UsageLedger
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
    ``headroom``: bytes the pool leaves to the rest of the host (default: 5 % of the memory limit, >= 256 MiB).
    ``on_evict``: called with the keys of the objects the pool evicted (by policy or quota; not replaced, cleared
    or purged ones), outside the pool lock, by the thread whose reserve (or, for a tenant trimming back to its quota,
    release or commit) evicted them; it must not block.
    ``quotas``: per-tenant quotas (none by default; see the module docstring)."""

    def __init__(
        self,
        size: int,
        policy: str = "LRU",
        backing: str = "anonymous",
        headroom: int | None = None,
        on_evict: Callable[[Sequence[ObjectKey]], None] | None = None,
        *,
        quotas: TenantQuotas | None = None,
    ) -> None:
        self._on_evict = on_evict
        self._evicted: list[ObjectKey] = []  # evicted under the lock, handed to on_evict once it is released
        self._policy = create_policy(policy)
        self._usage = UsageLedger(quotas, policy)
        self._quotas_on = self._usage.quotas.enabled  # without quotas the hot paths skip their checks
        self.arena = Arena(size, backing)
        self._alloc = Allocator(self.arena.size)
        self._budget = MemoryBudget(self._alloc.size, headroom, reserved=self.arena.backing == "hugepages")
        self._high_water = 0  # [0, high_water) may be resident; growth past it costs the host memory
        self._index: dict[ObjectKey, L1Object] = {}
        self._lock = threading.Lock()
        self.counts = {"evictions": 0, "hits": 0, "misses": 0, "refused": 0, "quota_evictions": 0, "quota_refused": 0}
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
        the pool or its tenant's quota, or too little unpinned memory to evict."""
        try:
            return self._reserve(key, shape, dtype)
        finally:
            self._notify_evicted()

    def _notify_evicted(self) -> None:
        """Hand the keys evicted so far to ``on_evict``, outside the lock (evictions happen under it)."""
        if self._evicted and self._on_evict is not None:
            with self._lock:
                evicted, self._evicted = self._evicted, []
            if evicted:
                self._on_evict(evicted)

    def _reserve(self, key: ObjectKey, shape: Sequence[int], dtype: torch.dtype) -> L1Object:
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self._alloc.rounded(nbytes) > self.capacity:
            with self._lock:
                self.counts["refused"] += 1
            raise CapacityError(f"object {key.to_str()} of {nbytes} bytes is larger than the L1 pool ({self.capacity})")
        with self._lock:
            return self._reserve_locked(key, nbytes, shape, dtype)

    def _reserve_locked(self, key: ObjectKey, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> L1Object:
        tenant, need = key.salt_digest, self._alloc.rounded(nbytes)
        quota = self._usage.quotas.quota(tenant) if self._quotas_on else None
        if quota is not None and need > quota:
            self.counts["refused"] += 1
            self.counts["quota_refused"] += 1
            # The tenant is named by its salt digest only: the salt is a secret.
            raise CapacityError(
                f"L1 pool: object of {nbytes} bytes is larger than the quota of tenant {tenant or '(no salt)'} "
                f"({quota} bytes)"
            )
        if quota is not None and self._usage.excess(tenant, need) > 0:
            self._trim_tenant_locked(tenant, need)
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
        need = self._alloc.rounded(nbytes)
        self._used += need
        self._usage.change(key.salt_digest, key.model_name, need)
        return L1Object(key, offset, nbytes, shape, dtype)

    def _trim_tenant_locked(self, tenant: str, extra: int) -> None:
        """Evict the tenant's own unpinned objects, in policy order, until ``extra`` more bytes fit in its quota (or
        none is left unpinned: it then stays over by pinned objects until their pins go)."""
        for victim in self._usage.victims(tenant):
            if self._usage.excess(tenant, extra) <= 0:
                return
            obj = self._index[victim]
            if obj.pins:
                continue
            self._evict_locked(obj)
            self.counts["quota_evictions"] += 1

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
            self._usage.change(obj.key.salt_digest, obj.key.model_name, 0, 1)
            if self._quotas_on:
                self._usage.insert(obj.key.salt_digest, obj.key)
            if not keep_pin:
                self._unpin_locked(obj)
        self._notify_evicted()  # a tenant over its quota by this pin trimmed itself

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
                    if self._quotas_on:
                        self._usage.access(key.salt_digest, key)
                out.append(obj)
        return out

    def release(self, objs: Sequence[L1Object | None]) -> None:
        """Drop one pin from each object; an unindexed object is freed with its last pin."""
        with self._lock:
            for obj in objs:
                if obj is not None:
                    self._unpin_locked(obj)
        self._notify_evicted()  # a tenant over its quota by these pins trimmed itself

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
        if self._on_evict is not None:
            self._evicted.append(obj.key)

    def _unindex_locked(self, obj: L1Object) -> None:
        obj.live = False
        self._policy.remove(obj.key)
        if self._quotas_on:
            self._usage.remove(obj.key.salt_digest, obj.key)
        self._usage.change(obj.key.salt_digest, obj.key.model_name, 0, -1)

    def _unpin_locked(self, obj: L1Object) -> None:
        if obj.pins <= 0:
            raise RuntimeError(f"L1 object {obj.key.to_str()} released more often than pinned")
        obj.pins -= 1
        if obj.pins:
            return
        if not obj.live:
            self._free_locked(obj)
        elif self._quotas_on and self._usage.excess(obj.key.salt_digest, 0) > 0:
            # over its quota by pinned objects: now it can trim
            self._trim_tenant_locked(obj.key.salt_digest, 0)

    def _free_locked(self, obj: L1Object) -> None:
        self._used -= self._alloc.rounded(obj.nbytes)
        self._usage.change(obj.key.salt_digest, obj.key.model_name, -self._alloc.rounded(obj.nbytes))
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
                "tenants": self._usage.tenants(),
                "models": self._usage.models(),
            }

    def close(self) -> None:
        with self._lock:
            self._index.clear()
        self.arena.close()
