"""``{"type": "faulty", "inner": {...}}``: wraps another adapter and injects faults, for tests.

Faults are set on the instance at run time (``adapter.store_error = OSError(errno.ENOSPC, ...)``); they model
what a real backend reports, so the layers above can be tested on failure paths without mocks:

* ``store_error``: every store batch raises it before anything is written (a full disk, a lost connection);
* ``fail_store_after``: store that many items of a batch, then clean them up and raise ``store_error`` or an
  ``OSError`` (a backend that fails mid-batch and keeps its all-or-nothing promise);
* ``load_error``: every load / read_heads / contains batch raises it;
* ``corrupt_loads``: flip one bit in the middle of every record a load returns (damage on the way back);
* ``before_load``: called with the inner adapter and the batch's keys when a load starts, after the caller's
  lookup: it may remove, damage or replace records there (a concurrent eviction, a writer sharing the store);
* ``before_store``: called with the inner adapter and the batch's keys when a store starts, before anything is
  written: it may block (hold a write mid-way while a test purges) or change the inner adapter;
* ``purge_error``: every list / purge raises it (a backend that fails mid-walk);
* ``store_delay_s`` / ``load_delay_s`` / ``delete_delay_s`` (also config fields, so a server subprocess can be given
  them): every store / load / delete batch sleeps that long first (a slow backend: writes, loads and a purge's
  batches stay in flight long enough to race them or watch their progress);
* counters ``stores``, ``loads`` of batches seen.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kvtier.config import ConfigReader
from kvtier.l2.adapters.base import MISS, Buffer, KeyMatch, L2Adapter, Prepare, Progress


class FaultyAdapter(L2Adapter):
    """Delegates to ``inner``, raising or damaging data as its fault attributes say."""

    def __init__(
        self, inner: L2Adapter, store_delay_s: float = 0.0, load_delay_s: float = 0.0, delete_delay_s: float = 0.0
    ) -> None:
        super().__init__()
        self.inner = inner
        self.store_delay_s = store_delay_s
        self.load_delay_s = load_delay_s
        self.delete_delay_s = delete_delay_s
        self.store_error: BaseException | None = None
        self.fail_store_after: int | None = None
        self.load_error: BaseException | None = None
        self.corrupt_loads = False
        self.before_load: Callable[[L2Adapter, Sequence[str]], None] | None = None
        self.before_store: Callable[[L2Adapter, Sequence[str]], None] | None = None
        self.purge_error: BaseException | None = None
        self.stores = 0
        self.loads = 0

    @property
    def capacity_bytes(self) -> int | None:
        return self.inner.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.inner.used_bytes

    def _store(self, keys: Sequence[str], records: Sequence[Sequence[Buffer]]) -> None:
        self.stores += 1
        if self.store_delay_s:
            time.sleep(self.store_delay_s)
        if self.before_store is not None:
            self.before_store(self.inner, keys)
        if self.fail_store_after is not None:
            n = min(self.fail_store_after, len(keys))
            self.inner.store_records(keys[:n], records[:n])
            self.inner.delete(keys[:n])
            raise self.store_error or OSError(errno.EIO, f"injected fault after {n} item(s)")
        if self.store_error is not None:
            raise self.store_error
        self.inner.store_records(keys, records)

    def _load(self, keys: Sequence[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        self.loads += 1
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        if self.load_error is not None:
            raise self.load_error
        if self.before_load is not None:
            self.before_load(self.inner, keys)
        lengths = self.inner.load_records(keys, dsts)
        if self.corrupt_loads:
            for dst, length in zip(dsts, lengths, strict=True):
                if length != MISS:
                    _flip_middle_bit(dst, length)
        return lengths

    def _load_with(self, keys: Sequence[str], head_size: int, prepare: Prepare) -> list[int]:
        self.loads += 1
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        if self.load_error is not None:
            raise self.load_error
        if self.before_load is not None:
            self.before_load(self.inner, keys)
        given: dict[int, Sequence[Buffer]] = {}

        def watch(i: int, head: memoryview, length: int) -> Sequence[Buffer] | None:
            bufs = prepare(i, head, length)
            if bufs is not None:
                given[i] = bufs
            return bufs

        lengths = self.inner.load_records_with(keys, head_size, watch)
        if self.corrupt_loads:
            for i, bufs in given.items():
                if lengths[i] != MISS:
                    _flip_middle_bit(bufs, lengths[i])
        return lengths

    def _will_load(self, keys: Sequence[str]) -> None:
        self.inner.will_load(keys)

    def _read_heads(self, keys: Sequence[str], size: int) -> list[bytes | None]:
        if self.load_error is not None:
            raise self.load_error
        return self.inner.read_heads(keys, size)

    def _contains(self, keys: Sequence[str]) -> list[bool]:
        if self.load_error is not None:
            raise self.load_error
        return self.inner.contains(keys)

    def _delete(self, keys: Sequence[str]) -> None:
        if self.delete_delay_s:
            time.sleep(self.delete_delay_s)
        self.inner.delete(keys)

    def _list_keys(self, match: KeyMatch, batch_size: int) -> Iterator[list[str]]:
        if self.purge_error is not None:
            raise self.purge_error
        return self.inner.list_keys(match, batch_size)

    def _purge(self, match: KeyMatch, batch_size: int, progress: Progress | None) -> int:
        if self.purge_error is not None:
            raise self.purge_error
        if self.delete_delay_s:  # batch by batch through this adapter's slow deletes
            return super()._purge(match, batch_size, progress)
        return self.inner.purge(match, batch_size, progress)  # the inner backend's own (efficient) path

    def _close(self) -> None:
        self.inner.close()

    def stats(self) -> dict[str, Any]:
        return {**self.inner.stats(), "type": self.type_name, "inner": self.inner.type_name}


def _flip_middle_bit(dst: Sequence[Buffer], length: int) -> None:
    pos = length // 2
    for buf in dst:
        mv = memoryview(buf).cast("B")
        if pos < len(mv):
            mv[pos] ^= 0x10
            return
        pos -= len(mv)


def faulty_factory(config: dict[str, Any], where: str) -> FaultyAdapter:
    from kvtier.l2.adapters.registry import create_backend

    reader = ConfigReader(config, where)
    inner = reader.raw("inner")
    store_delay = reader.number("store_delay_s", 0.0, min=0.0)
    load_delay = reader.number("load_delay_s", 0.0, min=0.0)
    delete_delay = reader.number("delete_delay_s", 0.0, min=0.0)
    reader.finish()
    return FaultyAdapter(
        create_backend(inner, f"{where}.inner"),
        float(store_delay or 0.0),
        float(load_delay or 0.0),
        float(delete_delay or 0.0),
    )
