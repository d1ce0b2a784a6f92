"""The Store's write pipeline and in-place loads: ordering of re-stores, bounded pinned bytes under a slow
adapter, close() draining every acknowledged write, batching that keeps up where one call per store fell
behind, and L2 hits read into the caller's tensor then backfilled into L1 (checked, never over newer data)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier import ObjectKey, Store
from kvtier.storage import backfill as backfill_mod

MB = 1 / 1024  # GiB


def key(i: int) -> ObjectKey:
    return ObjectKey("m/pipe", format(i + 1, "x"))


def chunk(value: float, n: int = 4096) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float32)


def fs_config(path: Path) -> dict[str, Any]:
    return {"type": "fs", "base_path": str(path), "durability": "none"}


class Gate:
    """Wraps a tier's adapter ``_store``: each call waits for a token (or for ``open()``), and is counted."""

    def __init__(self, store: Store, tier: int = 0) -> None:
        self.adapter = store._tiers[tier].adapter
        self._inner: Callable[..., None] = self.adapter._store
        self._cv = threading.Condition()
        self._tokens = 0
        self._open = False
        self.entered = 0
        self.calls = 0
        self.batches: list[list[str]] = []
        self.adapter._store = self._store  # type: ignore[method-assign]

    def _store(self, keys: Sequence[str], records: Sequence[Any]) -> None:
        with self._cv:
            self.entered += 1
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._open or self._tokens > 0)
            if not self._open:
                self._tokens -= 1
        try:
            self._inner(keys, records)
        finally:
            with self._cv:
                self.calls += 1
                self.batches.append(list(keys))
                self._cv.notify_all()

    def allow(self, n: int = 1) -> None:
        with self._cv:
            self._tokens += n
            self._cv.notify_all()

    def open(self) -> None:
        with self._cv:
            self._open = True
            self._cv.notify_all()

    def wait_entered(self, n: int) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: self.entered >= n, 20)

    def wait_calls(self, n: int) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: self.calls >= n, 20)


def from_l2(store: Store, keys: Sequence[ObjectKey]) -> list[torch.Tensor | None]:
    store.clear_l1()
    return store.retrieve(keys)


def test_a_newer_store_is_never_overwritten_by_an_older_one_in_flight(tmp_path: Path) -> None:
    # fs runs several writers: while one writes v1, v2 must wait for it rather than land first and be overwritten.
    with Store(l1_size_gb=4 * MB, l2_adapters=[fs_config(tmp_path)]) as store:
        assert store._tiers[0].writers > 1
        gate = Gate(store)
        store.store([key(0)], [chunk(1)])
        gate.wait_entered(1)  # v1 is being written (held in the adapter)
        store.store([key(0)], [chunk(2)])
        store.store([key(0)], [chunk(3)])  # supersedes v2 while it waits: v2 is never written
        store.store([key(1)], [chunk(9)])  # another key is not held up by key 0
        gate.wait_entered(2)
        gate.open()
        store.flush()
        stats = store.stats()
        assert stats["l2_writes_superseded"] == 1
        assert stats["l2_written"] == 3 and stats["l2_writes_dropped"] == 0
        assert all(key(0).to_str() not in b or len(b) == 1 for b in gate.batches)
        got = from_l2(store, [key(0), key(1)])
        assert got[0] is not None and torch.equal(got[0], chunk(3))
        assert got[1] is not None and torch.equal(got[1], chunk(9))


def test_the_same_key_again_and_again_from_threads_ends_with_the_last_store(tmp_path: Path) -> None:
    with Store(l1_size_gb=8 * MB, l2_adapters=[fs_config(tmp_path)]) as store:
        barrier = threading.Barrier(4)

        def hammer(t: int) -> None:
            barrier.wait()
            for i in range(200):
                store.store([key(t % 2)], [chunk(t * 1000 + i)])

        threads = [threading.Thread(target=hammer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        last = store.retrieve([key(0), key(1)])  # what L1 ended with: what L2 must hold once the writes drained
        store.flush()
        stats = store.stats()
        assert stats["l2_pending_writes"] == 0 and stats["l2_pending_bytes"] == 0
        got = from_l2(store, [key(0), key(1)])
        for want, have in zip(last, got, strict=True):
            assert want is not None and have is not None and torch.equal(want, have)


def test_pending_writes_pin_at_most_half_of_l1_under_a_slow_adapter() -> None:
    obj = 64 << 10
    with Store(l1_size_gb=MB, l2_adapters=[{"type": "memory"}], max_pending_l2_writes=1000) as store:
        gate = Gate(store)
        half = store.stats()["l1"]["effective_capacity_bytes"] // 2
        for i in range(40):  # 40 x 64 KiB = 2.5 MiB offered to a 1 MiB L1 while nothing gets written
            store.store([key(i)], [torch.zeros(obj // 4, dtype=torch.float32)])
            stats = store.stats()
            assert stats["l2_pending_bytes"] <= half + obj
        stats = store.stats()
        assert stats["l2_writes_dropped"] > 0 and stats["l1_store_refused"] == 0
        gate.open()
        store.flush()
        stats = store.stats()
        assert stats["l2_pending_bytes"] == 0 and stats["l2_pending_writes"] == 0
        assert stats["l2_written"] + stats["l2_writes_dropped"] == stats["stored"] == 40


def test_close_drains_every_acknowledged_write(tmp_path: Path) -> None:
    store = Store(l1_size_gb=8 * MB, l2_adapters=[fs_config(tmp_path)], max_pending_l2_writes=1000)
    gate = Gate(store)
    for i in range(50):
        store.store([key(i)], [chunk(i)])
    gate.wait_entered(1)
    dropped = store.stats()["l2_writes_dropped"]
    closer = threading.Thread(target=store.close)
    closer.start()
    gate.open()  # close() must wait for all of them, not just the ones in flight
    closer.join(30)
    assert not closer.is_alive()
    assert dropped == 0
    with pytest.raises(RuntimeError, match="closed"):
        store.store([key(0)], [chunk(0)])
    with Store(l1_size_gb=8 * MB, l2_adapters=[fs_config(tmp_path)]) as again:
        got = again.retrieve([key(i) for i in range(50)])
        assert all(g is not None and torch.equal(g, chunk(i)) for i, g in enumerate(got))


def test_batching_keeps_up_with_a_rate_one_call_per_store_could_not() -> None:
    # A deterministic slow adapter: one store call per tick. 8 store() calls arrive per tick. One call per store()
    # (the old single writer) falls 7 behind every tick and drops once max_pending is reached; the pipeline hands
    # everything pending to the next call, so it never drops below its ceiling (64 records per call): at most
    # 1 + 7 + 8 + 7 = 23 writes are ever pending here (the first call may take 1 record, the second 15).
    with Store(l1_size_gb=16 * MB, l2_adapters=[{"type": "memory"}], max_pending_l2_writes=32) as store:
        gate = Gate(store)
        n = 0
        for tick in range(30):
            for _ in range(8):
                store.store([key(n)], [chunk(n, 256)])
                n += 1
            if tick:
                gate.allow(1)
                gate.wait_calls(tick)
            gate.wait_entered(tick + 1)
        gate.open()
        store.flush()
        stats = store.stats()
        assert stats["l2_writes_dropped"] == 0
        assert stats["l2_written"] == n
        assert gate.calls <= 31  # batched: far fewer calls than store() calls


@pytest.fixture
def held_backfill(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Holds the L1 backfill thread before its copy until the event is set."""
    go = threading.Event()
    real = backfill_mod.copy_into

    def slow(dst: torch.Tensor, src: torch.Tensor) -> None:
        assert go.wait(20)
        real(dst, src)

    monkeypatch.setattr(backfill_mod, "copy_into", slow)
    yield go
    go.set()


def _stored_then_evicted(store: Store, n: int) -> list[ObjectKey]:
    keys = [key(i) for i in range(n)]
    store.store(keys, [chunk(i) for i in range(n)])
    store.flush()
    store.clear_l1()
    return keys


def test_an_l2_hit_loaded_into_the_callers_tensor_is_admitted_to_l1_afterwards(tmp_path: Path) -> None:
    with Store(l1_size_gb=8 * MB, l2_adapters=[fs_config(tmp_path)]) as store:
        keys = _stored_then_evicted(store, 4)
        outs = [torch.empty(4096) for _ in keys]
        called: list[int] = []
        assert store.retrieve_into(keys, outs, after=lambda: called.append(1)) == 4
        assert all(torch.equal(o, chunk(i)) for i, o in enumerate(outs))
        store.flush()
        assert called == [1]
        stats = store.stats()
        assert stats["l1_backfilled"] == 4 and stats["l1"]["objects"] == 4
        hits_before = store.stats()["l2"][0]["hits"]
        again = [torch.empty(4096) for _ in keys]
        assert store.retrieve_into(keys, again) == 4  # from L1 now
        assert store.stats()["l2"][0]["hits"] == hits_before
        assert all(torch.equal(o, chunk(i)) for i, o in enumerate(again))


def test_a_caller_that_reuses_its_tensor_at_once_does_not_poison_l1(
    tmp_path: Path, held_backfill: threading.Event
) -> None:
    with Store(l1_size_gb=8 * MB, l2_adapters=[fs_config(tmp_path)]) as store:
        keys = _stored_then_evicted(store, 2)
        outs = [torch.empty(4096) for _ in keys]
        called = threading.Event()
        assert store.retrieve_into(keys, outs, after=called.set) == 2
        assert not called.is_set()  # the backfill still reads the caller's tensors
        outs[0].fill_(-1.0)  # the caller's own memory, overwritten before the backfill copied it
        held_backfill.set()
        store.flush()
        assert called.is_set()
        stats = store.stats()
        assert stats["l1_backfilled"] == 1 and stats["l1_backfill_skipped"] == 1
        got = store.retrieve(keys)
        assert got[0] is not None and torch.equal(got[0], chunk(0))  # from L2 again, not the caller's -1s
        assert got[1] is not None and torch.equal(got[1], chunk(1))


def test_a_backfill_never_lands_over_a_newer_store(tmp_path: Path, held_backfill: threading.Event) -> None:
    with Store(l1_size_gb=8 * MB, l2_adapters=[fs_config(tmp_path)]) as store:
        keys = _stored_then_evicted(store, 1)
        out = torch.empty(4096)
        assert store.retrieve_into(keys, [out]) == 1
        store.store(keys, [chunk(42)])  # newer than the L2 copy being backfilled
        held_backfill.set()
        store.flush()
        (got,) = store.retrieve(keys)
        assert got is not None and torch.equal(got, chunk(42))
        assert store.stats()["l1_backfilled"] == 0


def test_a_serde_tier_still_loads_through_l1(tmp_path: Path) -> None:
    # Decoded output has no checksum to check a later copy against: it is decoded into L1 and copied out.
    config = {**fs_config(tmp_path), "serde": {"type": "zstd", "level": 1}}
    with Store(l1_size_gb=8 * MB, l2_adapters=[config]) as store:
        keys = _stored_then_evicted(store, 3)
        outs = [torch.empty(4096) for _ in keys]
        assert store.retrieve_into(keys, outs) == 3
        assert all(torch.equal(o, chunk(i)) for i, o in enumerate(outs))
        stats = store.stats()
        assert stats["l1_backfilled"] == 0 and stats["l1"]["objects"] == 3


def test_an_fs_batch_with_fsync_syncs_twice_not_twice_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.l2.adapters import fs as fs_mod

    real = fs_mod._syncfs
    if real is None:
        pytest.skip("no syncfs(2) here")
    calls: list[int] = []

    def counting(fd: int) -> int:
        calls.append(fd)
        return int(real(fd))

    monkeypatch.setattr(fs_mod, "_syncfs", counting)
    config = {"type": "fs", "base_path": str(tmp_path), "durability": "fsync"}
    with Store(l1_size_gb=8 * MB, l2_adapters=[config]) as store:
        tier = store._tiers[0]
        keys = [key(i) for i in range(8)]
        tier.store(keys, [chunk(i) for i in range(8)])
        assert len(calls) == 2  # data, then names: for the whole batch
        tier.store([key(99)], [chunk(99)])
        assert len(calls) == 2  # a small batch: per-file fdatasync and per-directory fsync instead
        got = from_l2(store, [*keys, key(99)])
        assert all(g is not None for g in got)


def test_a_tier_encodes_the_next_round_while_the_current_one_is_written(tmp_path: Path) -> None:
    config = {**fs_config(tmp_path), "serde": {"type": "zstd", "level": 1, "max_workers": 1}}
    with Store(l1_size_gb=8 * MB, l2_adapters=[config]) as store:
        tier = store._tiers[0]
        assert tier.serde is not None and tier._round == 2
        gate = Gate(store)
        done = threading.Event()
        keys = [key(i) for i in range(6)]
        writer = threading.Thread(target=lambda: (tier.store(keys, [chunk(i) for i in range(6)]), done.set()))
        writer.start()
        gate.wait_entered(1)  # round 1 is being written and held there
        with gate._cv:  # round 2 gets encoded meanwhile (the old path encoded it only after round 1's write)
            assert gate._cv.wait_for(lambda: tier.serde.stats()["serialize_items_total"] >= 4, 20)
            assert gate.calls == 0
        gate.open()
        writer.join(20)
        assert done.is_set()
        got = from_l2(store, keys)
        assert all(g is not None and torch.equal(g, chunk(i)) for i, g in enumerate(got))
        assert tier.stats()["scratch_bytes"] > 0
