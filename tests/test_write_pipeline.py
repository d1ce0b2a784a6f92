"""The Store's write pipeline and in-place loads: ordering of re-stores, bounded pinned bytes under a slow
adapter, close() draining every acknowledged write, batching that keeps up where one call per store fell
behind, and L2 hits read into the caller's tensor then backfilled into L1 (checked, never over newer data)."""

from __future__ import annotations

import os
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
    """Holds the L1 backfill thread before each copy until the event is set."""
    go = threading.Event()
    real = backfill_mod.Backfill._run

    def held(self: backfill_mod.Backfill, job: Any) -> bool:
        assert go.wait(20)
        return real(self, job)

    monkeypatch.setattr(backfill_mod.Backfill, "_run", held)
    yield go
    go.set()


os.environ.setdefault("KVTIER_PIPELINE_TEST_KEY", "00112233445566778899aabbccddeeff" * 2)
#: tiers whose hits land in the caller's tensor: read in place (no serde), or decoded into it
IN_PLACE = {
    "none": None,
    "fp8": {"type": "fp8"},
    "fp8+zstd+aesgcm": [
        {"type": "fp8"}, {"type": "zstd", "level": 1}, {"type": "aesgcm", "key_env": "KVTIER_PIPELINE_TEST_KEY"}
    ],
}  # fmt: skip


def in_place_config(path: Path, serde: str) -> dict[str, Any]:
    config = fs_config(path)
    if IN_PLACE[serde] is not None:
        config["serde"] = IN_PLACE[serde]
    return config


def salted(i: int) -> ObjectKey:
    return ObjectKey("m/pipe", format(i + 1, "x"), cache_salt="tenant-a")  # AES-GCM binds the salt: kept too


def _stored_then_evicted(store: Store, n: int, keyf: Callable[[int], ObjectKey] = key) -> list[ObjectKey]:
    keys = [keyf(i) for i in range(n)]
    store.store(keys, [chunk(i) for i in range(n)])  # small integers: exact in fp8 too
    store.flush()
    store.clear_l1()
    return keys


@pytest.mark.parametrize("serde", IN_PLACE)
def test_an_l2_hit_loaded_into_the_callers_tensor_is_admitted_to_l1_afterwards(tmp_path: Path, serde: str) -> None:
    with Store(l1_size_gb=8 * MB, l2_adapters=[in_place_config(tmp_path, serde)]) as store:
        keys = _stored_then_evicted(store, 4, salted)
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


@pytest.mark.parametrize("serde", IN_PLACE)
def test_a_caller_that_reuses_its_tensor_at_once_does_not_poison_l1(
    tmp_path: Path, held_backfill: threading.Event, serde: str
) -> None:
    with Store(l1_size_gb=8 * MB, l2_adapters=[in_place_config(tmp_path, serde)]) as store:
        keys = _stored_then_evicted(store, 2, salted)
        outs = [torch.empty(4096) for _ in keys]
        called = threading.Event()
        assert store.retrieve_into(keys, outs, after=called.set) == 2
        # A decoded hit's L1 copy is decoded again from the record: the caller's memory is free at once (a
        # server unmaps the client's region); a hit read in place is copied from it, which must stay valid.
        assert called.is_set() == (serde != "none")
        outs[0].fill_(-1.0)  # the caller's own memory, overwritten before the backfill ran
        held_backfill.set()
        store.flush()
        assert called.is_set()
        stats = store.stats()
        if serde == "none":  # the copy no longer matches the record's checksum: dropped
            assert stats["l1_backfilled"] == 1 and stats["l1_backfill_skipped"] == 1
        else:  # decoded from the record's own bytes: the caller's -1s never reach L1
            assert stats["l1_backfilled"] == 2 and stats["l1_backfill_skipped"] == 0
        got = store.retrieve(keys)
        assert got[0] is not None and torch.equal(got[0], chunk(0))  # never the caller's -1s
        assert got[1] is not None and torch.equal(got[1], chunk(1))


@pytest.mark.parametrize("serde", IN_PLACE)
def test_a_backfill_never_lands_over_a_newer_store(tmp_path: Path, held_backfill: threading.Event, serde: str) -> None:
    with Store(l1_size_gb=8 * MB, l2_adapters=[in_place_config(tmp_path, serde)]) as store:
        keys = _stored_then_evicted(store, 1)
        out = torch.empty(4096)
        assert store.retrieve_into(keys, [out]) == 1
        store.store(keys, [chunk(42)])  # newer than the L2 copy being backfilled
        held_backfill.set()
        store.flush()
        (got,) = store.retrieve(keys)
        assert got is not None and torch.equal(got, chunk(42))
        assert store.stats()["l1_backfilled"] == 0


@pytest.mark.parametrize("serde", ["fp8", "fp8+zstd+aesgcm"])
def test_a_purge_during_a_pending_backfill_keeps_it_out_of_l1(
    tmp_path: Path, held_backfill: threading.Event, serde: str
) -> None:
    with Store(l1_size_gb=8 * MB, l2_adapters=[in_place_config(tmp_path, serde)]) as store:
        keys = _stored_then_evicted(store, 3, salted)
        outs = [torch.empty(4096) for _ in keys]
        assert store.retrieve_into(keys, outs) == 3
        purger = threading.Thread(target=store.purge, kwargs={"model_name": "m/pipe"})
        purger.start()  # waits for nothing the held backfill holds: the backfill is marked stale
        purger.join(20)
        assert not purger.is_alive()
        held_backfill.set()
        store.flush()
        assert store.stats()["l1_backfilled"] == 0
        assert store.retrieve(keys) == [None, None, None]


@pytest.mark.parametrize("serde", ["fp8", "fp8+zstd+aesgcm"])
def test_a_record_damaged_or_removed_after_the_load_does_not_reach_l1_through_its_backfill(
    tmp_path: Path, held_backfill: threading.Event, serde: str
) -> None:
    # L1's copy is decoded from the bytes verified at load, not read again: what happens to the file between
    # the load and the backfill cannot put other KV into L1.
    from kvtier.l2.adapters.fs import FSAdapter

    with Store(l1_size_gb=8 * MB, l2_adapters=[in_place_config(tmp_path, serde)]) as store:
        keys = _stored_then_evicted(store, 2, salted)
        adapter = store._tiers[0].adapter
        assert isinstance(adapter, FSAdapter)
        outs = [torch.empty(4096) for _ in keys]
        assert store.retrieve_into(keys, outs) == 2
        damaged = adapter.path_for(keys[0].to_str())
        data = bytearray(damaged.read_bytes())
        for at in range(len(data) // 2, len(data), 97):  # the payload: every 97th byte
            data[at] ^= 0xFF
        damaged.write_bytes(bytes(data))
        adapter.path_for(keys[1].to_str()).unlink()
        held_backfill.set()
        store.flush()
        assert store.stats()["l1_backfilled"] == 2
        again = [torch.empty(4096) for _ in keys]
        assert store.retrieve_into(keys, again) == 2  # L1 hits: the KV that was verified
        assert all(torch.equal(a, chunk(i)) for i, a in enumerate(again))


def test_the_encoded_bytes_kept_for_backfills_go_back_to_the_tier(tmp_path: Path) -> None:
    # Each decoded hit keeps its record's bytes for L1's copy; they must come back, or a busy server leaks them.
    with Store(l1_size_gb=8 * MB, l2_adapters=[in_place_config(tmp_path, "fp8")]) as store:
        keys = _stored_then_evicted(store, 6)
        scratch = store._tiers[0]._scratch
        outs = [torch.empty(4096) for _ in keys]
        held_after_first = 0
        for round_ in range(40):
            store.clear_l1()
            assert store.retrieve_into(keys, outs) == 6
            store.flush()
            if round_ == 0:
                held_after_first = scratch.bytes_held
        assert store.stats()["l1_backfilled"] == 40 * 6
        assert 0 < scratch.bytes_held <= held_after_first  # reused, not growing


def test_a_refused_backfill_gives_its_encoded_bytes_back(tmp_path: Path, held_backfill: threading.Event) -> None:
    with Store(l1_size_gb=8 * MB, l2_adapters=[in_place_config(tmp_path, "fp8")]) as store:
        keys = _stored_then_evicted(store, 4)
        store._backfill._max_bytes = 1  # one backfill waits (held: a lone one is always taken), the rest are over
        scratch = store._tiers[0]._scratch
        outs = [torch.empty(4096) for _ in keys]
        assert store.retrieve_into(keys, outs) == 4
        assert all(torch.equal(o, chunk(i)) for i, o in enumerate(outs))
        assert store.stats()["l1_backfill_skipped"] == 3
        lent = scratch.bytes_held - sum(b.numel() for b in scratch._free)
        assert 0 < lent <= max(b.numel() for b in scratch._free)  # only the waiting backfill's record
        held_backfill.set()
        store.flush()
        stats = store.stats()
        assert stats["l1_backfilled"] == 1 and stats["l1"]["objects"] == 1
        assert sum(b.numel() for b in scratch._free) == scratch.bytes_held  # every buffer back


@pytest.mark.parametrize("serde", ["none", "fp8"])
def test_a_chunk_larger_than_the_backfill_bound_still_reaches_l1(tmp_path: Path, serde: str) -> None:
    # The backfill holds at most a quarter of L1; a chunk above that must not be shut out of L1 for good.
    with Store(l1_size_gb=8 * MB, l2_adapters=[in_place_config(tmp_path, serde)]) as store:
        big = torch.full((768 * 1024,), 3.0)  # 3 MiB > 8 MiB / 4
        store.store([key(0)], [big])
        store.flush()
        store.clear_l1()
        out = torch.empty_like(big)
        assert store.retrieve_into([key(0)], [out]) == 1
        store.flush()
        assert store.stats()["l1_backfilled"] == 1 and store.stats()["l1"]["objects"] == 1


def test_a_decoded_hit_is_not_decoded_on_the_serde_pool_twice_in_front_of_loads(tmp_path: Path) -> None:
    # L1's copy of a decoded hit is decoded again on the backfill's own thread, never queued on the tier's
    # serde workers, where it would delay the next caller's load.
    with Store(l1_size_gb=8 * MB, l2_adapters=[in_place_config(tmp_path, "fp8")]) as store:
        keys = _stored_then_evicted(store, 4)
        serde = store._tiers[0].serde
        assert serde is not None
        names: list[str] = []
        real = serde.deserialize_now

        def spy(*args: Any, **kwargs: Any) -> None:
            names.append(threading.current_thread().name)
            real(*args, **kwargs)

        serde.deserialize_now = spy  # type: ignore[method-assign]
        outs = [torch.empty(4096) for _ in keys]
        assert store.retrieve_into(keys, outs) == 4
        store.flush()
        assert names == ["kvtier-l1-backfill"] * 4


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


@pytest.mark.parametrize("serde", [None, {"type": "fp8"}])
def test_a_re_store_of_identical_bytes_is_not_written_again(tmp_path: Path, serde: dict[str, Any] | None) -> None:
    config = {**fs_config(tmp_path), **({"serde": serde} if serde else {})}
    with Store(l1_size_gb=8 * MB, l2_adapters=[config]) as store:
        tier = store._tiers[0]
        gate = Gate(store)
        gate.open()
        keys = [key(i) for i in range(4)]
        tier.store(keys, [chunk(i) for i in range(4)])
        calls = gate.calls  # one per round
        tier.store(keys, [chunk(i) for i in range(4)])  # identical: nothing written
        assert gate.calls == calls and tier.stats()["stored_unchanged"] == 4
        tier.store(keys[:2], [chunk(7), chunk(1)])  # key 0 changed, key 1 not: one record written
        assert gate.batches[-1] == [keys[0].to_str()]
        tier.delete(keys[1:2])  # gone: the same bytes must be written again
        tier.store(keys[1:2], [chunk(1)])
        assert gate.batches[-1] == [keys[1].to_str()]
        tier.adapter.delete([keys[2].to_str()])  # removed behind the tier's back (an eviction): written again
        tier.store(keys[2:3], [chunk(2)])
        assert gate.batches[-1] == [keys[2].to_str()]
        got = from_l2(store, keys)
        want = [chunk(7), chunk(1), chunk(2), chunk(3)]
        for g, w in zip(got, want, strict=True):
            assert g is not None
            assert torch.equal(g, w) if serde is None else torch.allclose(g, w, rtol=0.1)


def test_a_large_store_is_queued_in_groups_as_it_is_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.storage import store as store_mod

    monkeypatch.setattr(store_mod, "WRITE_GROUP_BYTES", 3 * 16384)  # three 16 KiB chunks per group
    with Store(l1_size_gb=8 * MB, l2_adapters=[{"type": "memory"}]) as store:
        gate = Gate(store)
        keys = [key(i) for i in range(8)]
        store.store(keys, [chunk(i) for i in range(8)])
        gate.wait_entered(1)
        assert store.stats()["l2_pending_writes"] == 3  # groups of 3, 3 and 2 objects
        gate.open()
        store.flush()
        got = from_l2(store, keys)
        assert all(g is not None and torch.equal(g, chunk(i)) for i, g in enumerate(got))

        bad = [chunk(i) for i in range(5)]
        real = store_mod.copy_into
        calls = [0]

        def failing(dst: torch.Tensor, src: torch.Tensor) -> None:
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("copy failed")
            real(dst, src)

        monkeypatch.setattr(store_mod, "copy_into", failing)
        with pytest.raises(RuntimeError, match="copy failed"):
            store.store([key(20 + i) for i in range(5)], bad)  # the first group of 3 is queued, then it fails
        store.flush()
        store.clear_l1()
        stats = store.stats()
        assert stats["l2_pending_bytes"] == 0 and stats["l1"]["used_bytes"] == 0


def test_concurrent_writers_hold_at_most_three_rounds_of_large_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight fs writers each used to encode two rounds ahead of their write, so that a slow disk held up to 32
    records in scratch, and every round took some of its buffers fresh (page faults on the serde's thread). The
    tier admits three rounds of large records at once across its writers: the scratch stays what the pool keeps,
    and writers that hold encoded rounds never wait for each other (every write lands). (The records here are
    16 KiB; the threshold below which more rounds are admitted is lowered to nothing so that they count as large.)"""
    from kvtier.l2 import tier as tier_mod

    monkeypatch.setattr(tier_mod, "SMALL_ROUNDS_BYTES", 0)
    config = {**fs_config(tmp_path), "serde": {"type": "zstd", "level": 1, "max_workers": 1}}
    n = 40
    with Store(l1_size_gb=8 * MB, l2_adapters=[config]) as store:
        tier = store._tiers[0]
        assert tier.serde is not None and tier._round == 2 and tier.writers == 8
        gate = Gate(store)
        keys = [key(i) for i in range(n)]
        store.store(keys, [chunk(i) for i in range(n)])

        def encoded() -> int:
            return int(tier.serde.stats()["serialize_items_total"])  # type: ignore[union-attr]

        gate.wait_entered(2)  # two writers hold a round each at the (closed) disk
        with gate._cv:
            assert gate._cv.wait_for(lambda: encoded() >= 6, 20)  # and a third round is encoded meanwhile
            assert not gate._cv.wait_for(lambda: encoded() > 6, 0.5)  # and nothing more until a write returns
        assert gate.calls == 0
        gate.open()
        store.flush()
        assert store.stats()["l2_written"] == n
        assert tier.stats()["scratch_bytes"] <= tier._scratch._keep * max(b.numel() for b in tier._scratch._free)
        store.clear_l1()
        got = from_l2(store, keys)
        assert all(g is not None and torch.equal(g, chunk(i)) for i, g in enumerate(got))


def test_concurrent_store_calls_with_failing_writes_all_end_and_give_back_every_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many threads store multi-round batches through one tier while a third of the writes fail: every call
    returns (writers holding encoded rounds write them before they wait to be admitted), a failed batch leaves none
    of its keys, a successful one loads back exactly, and every admitted round and scratch buffer comes back."""
    from kvtier.l2 import tier as tier_mod

    monkeypatch.setattr(tier_mod, "SMALL_ROUNDS_BYTES", 0)  # every round counts as large: the bound binds
    from kvtier.errors import L2Error
    from kvtier.l2.adapters import FaultyAdapter, MemoryAdapter
    from kvtier.l2.tier import L2Tier
    from kvtier.serde import create_serde_processor

    adapter = FaultyAdapter(MemoryAdapter(None))
    fail_lock, writes = threading.Lock(), [0]

    def sometimes_fail(_: object, keys: Sequence[str]) -> None:
        with fail_lock:
            writes[0] += 1
            if writes[0] % 3 == 0:
                raise OSError("injected write failure")

    adapter.before_store = sometimes_fail
    serde = create_serde_processor({"type": "zstd", "level": 1, "max_workers": 2})
    tier = L2Tier(adapter, serde, {"type": "faulty"})
    outcome: dict[int, bool] = {}

    def caller(t: int) -> None:
        for r in range(4):
            keys = [key(1000 * t + 10 * r + i) for i in range(7)]  # 7 records: rounds of 4, 3
            try:
                tier.store(keys, [chunk(t + r + i / 8) for i in range(7)])
                outcome[1000 * t + 10 * r] = True
            except (OSError, L2Error):
                outcome[1000 * t + 10 * r] = False

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    assert len(outcome) == 32 and 0 < sum(outcome.values()) < 32
    for base, ok in outcome.items():
        t, r = divmod(base, 1000)[0], (base % 1000) // 10
        keys = [key(base + i) for i in range(7)]
        dsts = [torch.empty(4096) for _ in keys]
        hits = tier.load_into(keys, dsts)
        if ok:
            assert all(hits) and all(torch.equal(d, chunk(t + r + i / 8)) for i, d in enumerate(dsts))
        else:
            assert not any(hits)
    assert tier._store_rounds.held == 0
    assert tier.stats()["scratch_bytes"] <= tier._scratch._keep * max(b.numel() for b in tier._scratch._free)
    tier.close()


def test_rounds_of_small_records_are_not_held_to_three(tmp_path: Path) -> None:
    """Small records cost no fresh pages, and with durability "fsync" each round's write is an fsync: their rounds
    are bounded by the writers alone, so while the disk holds writes, every writer has its rounds encoded."""
    config = {**fs_config(tmp_path), "serde": {"type": "zstd", "level": 1, "max_workers": 1}}
    n = 40
    with Store(l1_size_gb=8 * MB, l2_adapters=[config]) as store:
        tier = store._tiers[0]
        gate = Gate(store)
        keys = [key(i) for i in range(n)]
        store.store(keys, [chunk(i) for i in range(n)])
        try:
            gate.wait_entered(8)  # every writer holds a round at the (closed) disk, none waits to encode
            with gate._cv:
                assert gate._cv.wait_for(lambda: tier.serde.stats()["serialize_items_total"] >= 24, 20)  # type: ignore[union-attr]
        finally:
            gate.open()  # a failure above must not leave close() waiting on held writes
        store.flush()
        assert store.stats()["l2_written"] == n and tier._store_rounds.held == 0
