"""``{"type": "memory", "max_capacity_gb": N, "tenant_quota_gb": N, "tenant_quotas_gb": {DIGEST: N}}``: records in
a dict. The reference semantics for tests. Tenant quotas as in :mod:`kvtier.tenants`: a tenant at its quota
evicts its own least recently used records first."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from kvtier.config import ConfigReader
from kvtier.errors import CapacityError
from kvtier.l2.adapters.base import MISS, Buffer, KeyMatch, L2Adapter, Prepare, batched, scatter, total_length
from kvtier.tenants import TenantQuotas, UsageLedger, read_adapter_quotas, tenant_of_key_str

GiB = 1 << 30


class MemoryAdapter(L2Adapter):
    """Records as ``bytes`` in process memory, least recently used evicted past ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int | None = None, quotas: TenantQuotas | None = None) -> None:
        super().__init__()
        self._capacity = capacity_bytes
        self._usage = UsageLedger(quotas, "LRU")
        self._records: OrderedDict[str, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self.quota_evictions = 0

    @property
    def capacity_bytes(self) -> int | None:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def _store(self, keys: Sequence[str], records: Sequence[Sequence[Buffer]]) -> None:
        datas = [b"".join(bytes(memoryview(b).cast("B")) for b in r) for r in records]
        latest = {k: len(d) for k, d in zip(keys, datas, strict=True)}
        need = sum(latest.values())
        if self._capacity is not None and need > self._capacity:
            raise CapacityError(f"memory adapter: batch of {need} bytes exceeds the capacity of {self._capacity}")
        needs: dict[str, int] = {}
        for key, size in latest.items():
            tenant = tenant_of_key_str(key)[0]
            needs[tenant] = needs.get(tenant, 0) + size
        for tenant, size in needs.items():
            quota = self._usage.quotas.quota(tenant)
            if quota is not None and size > quota:
                raise CapacityError(f"memory adapter: batch of {size} bytes exceeds its tenant's quota of {quota}")
        with self._lock:
            for key in keys:  # replaced records free their room first
                self._pop_locked(key)
            evicted: list[str] = []
            for tenant, size in needs.items():  # a tenant at its quota evicts its own records first
                for victim in self._usage.victims(tenant):
                    if self._usage.excess(tenant, size) <= 0:
                        break
                    self._pop_locked(victim)
                    self.evictions += 1
                    self.quota_evictions += 1
                    evicted.append(victim)
            if self._capacity is not None:
                while self._used + need > self._capacity and self._records:
                    name = next(iter(self._records))
                    self._pop_locked(name)
                    self.evictions += 1
                    evicted.append(name)
            self._evicted(evicted)
            for key, data in zip(keys, datas, strict=True):
                self._pop_locked(key)  # a key twice in one batch: the last wins
                self._records[key] = data
                self._used += len(data)
                tenant, model = tenant_of_key_str(key)
                self._usage.insert(tenant, key)
                self._usage.change(tenant, model, len(data), 1)

    def _pop_locked(self, key: str) -> None:
        old = self._records.pop(key, None)
        if old is not None:
            self._used -= len(old)
            tenant, model = tenant_of_key_str(key)
            self._usage.remove(tenant, key)
            self._usage.change(tenant, model, -len(old), -1)

    def _touch_locked(self, key: str) -> None:
        self._records.move_to_end(key)
        self._usage.access(tenant_of_key_str(key)[0], key)

    def _load(self, keys: Sequence[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        out = []
        for key, dst in zip(keys, dsts, strict=True):
            with self._lock:
                data = self._records.get(key)
                if data is not None:
                    self._touch_locked(key)
            if data is None:
                out.append(MISS)
                continue
            if len(data) <= total_length(dst):
                scatter(data, dst)
            out.append(len(data))
        return out

    def _load_with(self, keys: Sequence[str], head_size: int, prepare: Prepare) -> list[int]:
        out = []
        for i, key in enumerate(keys):
            with self._lock:
                data = self._records.get(key)
                if data is not None:
                    self._touch_locked(key)
            if data is None:
                out.append(MISS)
                continue
            bufs = prepare(i, memoryview(data)[:head_size], len(data))
            if bufs is not None:
                scatter(data, bufs)
            out.append(len(data))
        return out

    def _read_heads(self, keys: Sequence[str], size: int) -> list[bytes | None]:
        with self._lock:
            return [None if (d := self._records.get(k)) is None else d[:size] for k in keys]

    def _contains(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [k in self._records for k in keys]

    def _delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._pop_locked(key)

    def _list_keys(self, match: KeyMatch, batch_size: int) -> Iterator[list[str]]:
        with self._lock:
            snapshot = list(self._records)  # one C-level copy under the lock; filtered outside it
        return batched((k for k in snapshot if match.matches(k)), batch_size)

    def _close(self) -> None:
        with self._lock:
            for key in list(self._records):
                self._pop_locked(key)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tenants, models = self._usage.tenants(), self._usage.models()
        return {
            **super().stats(),
            "records": len(self._records),
            "evictions": self.evictions,
            "quota_evictions": self.quota_evictions,
            "tenants": tenants,
            "models": models,
        }

    # Test helpers: reach a record's bytes to damage them (the conformance suite's corruption cases).
    def raw_record(self, key: str) -> bytes | None:
        with self._lock:
            return self._records.get(key)


def memory_factory(config: dict[str, Any], where: str) -> MemoryAdapter:
    reader = ConfigReader(config, where)
    gb = reader.number("max_capacity_gb", None, min=0.0)
    quotas = read_adapter_quotas(reader, where)
    reader.finish()
    return MemoryAdapter(None if gb is None else max(1, int(gb * GiB)), quotas)
