"""``{"type": "memory", "max_capacity_gb": N}``: records in a dict. The reference semantics for tests."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from kvtier.config import ConfigReader
from kvtier.errors import CapacityError
from kvtier.l2.adapters.base import MISS, Buffer, L2Adapter, Prepare, scatter, total_length

GiB = 1 << 30


class MemoryAdapter(L2Adapter):
    """Records as ``bytes`` in process memory, least recently used evicted past ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int | None = None) -> None:
        super().__init__()
        self._capacity = capacity_bytes
        self._records: OrderedDict[str, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.evictions = 0

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
        with self._lock:
            for key in keys:  # replaced records free their room first
                old = self._records.pop(key, None)
                if old is not None:
                    self._used -= len(old)
            if self._capacity is not None:
                evicted = []
                while self._used + need > self._capacity and self._records:
                    name, victim = self._records.popitem(last=False)
                    self._used -= len(victim)
                    self.evictions += 1
                    evicted.append(name)
                self._evicted(evicted)
            for key, data in zip(keys, datas, strict=True):
                old = self._records.pop(key, None)  # a key twice in one batch: the last wins
                if old is not None:
                    self._used -= len(old)
                self._records[key] = data
                self._used += len(data)

    def _load(self, keys: Sequence[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        out = []
        for key, dst in zip(keys, dsts, strict=True):
            with self._lock:
                data = self._records.get(key)
                if data is not None:
                    self._records.move_to_end(key)
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
                    self._records.move_to_end(key)
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
                old = self._records.pop(key, None)
                if old is not None:
                    self._used -= len(old)

    def _close(self) -> None:
        with self._lock:
            self._records.clear()
            self._used = 0

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "records": len(self._records), "evictions": self.evictions}

    # Test helpers: reach a record's bytes to damage them (the conformance suite's corruption cases).
    def raw_record(self, key: str) -> bytes | None:
        with self._lock:
            return self._records.get(key)


def memory_factory(config: dict[str, Any], where: str) -> MemoryAdapter:
    reader = ConfigReader(config, where)
    gb = reader.number("max_capacity_gb", None, min=0.0)
    reader.finish()
    return MemoryAdapter(None if gb is None else max(1, int(gb * GiB)))
