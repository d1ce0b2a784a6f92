"""L1 frees what it replaces (re-stores, duplicate keys in a batch, prefetch commits, threads), a state machine
of the pool, and the effective capacity that keeps the pool below what the host can give."""

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from kvtier import CapacityError, ObjectKey, Store
from kvtier.storage.l1 import L1Object, L1Pool
from kvtier.storage.l1 import arena as arena_mod

MB = 1 / 1024  # GiB


def fs_config(path: Path) -> dict[str, Any]:
    return {"type": "fs", "base_path": str(path), "durability": "none"}


def key(i: int) -> ObjectKey:
    return ObjectKey("m", format(i + 1, "x"))


def l1(store: Store) -> dict[str, Any]:
    stats: dict[str, Any] = store.stats()["l1"]
    return stats


def test_storing_one_key_10000_times_keeps_one_block_and_clear_frees_it() -> None:
    t = torch.arange(1024, dtype=torch.float32)  # 4 KiB
    with Store(l1_size_gb=0.01) as store:
        for i in range(10_000):
            store.store([key(0)], [t + i])
        assert l1(store)["used_bytes"] == 4096 and l1(store)["objects"] == 1
        (got,) = store.retrieve([key(0)])
        assert got is not None and torch.equal(got, t + 9999)
        store.clear_l1()
        assert (l1(store)["used_bytes"], l1(store)["objects"]) == (0, 0)


def test_re_stores_with_l2_free_each_replaced_block_after_its_write(tmp_path: Path) -> None:
    # With an L2 adapter the replaced object is still pinned for its L2 write: it must go with that pin.
    t = torch.arange(1024, dtype=torch.float32)
    with Store(l1_size_gb=MB, l2_adapters=[fs_config(tmp_path)]) as store:
        for i in range(300):
            store.store([key(0)], [t + i])
        store.flush()
        assert l1(store)["used_bytes"] == 4096
        store.clear_l1()
        assert (l1(store)["used_bytes"], l1(store)["objects"]) == (0, 0)


@pytest.mark.parametrize("with_l2", [False, True])
def test_duplicate_keys_in_one_batch(tmp_path: Path, with_l2: bool) -> None:
    ts = [torch.full((1024,), float(i)) for i in range(5)]
    adapters = [fs_config(tmp_path)] if with_l2 else []
    with Store(l1_size_gb=MB, l2_adapters=adapters) as store:
        store.store([key(0)] * 5, ts)
        store.flush()
        assert l1(store)["used_bytes"] == 4096 and l1(store)["objects"] == 1
        (got,) = store.retrieve([key(0)])
        assert got is not None and torch.equal(got, ts[-1]), "the last of the batch wins"
        store.clear_l1()
        assert (l1(store)["used_bytes"], l1(store)["objects"]) == (0, 0)


def test_prefetch_commits_over_an_existing_object_free_it() -> None:
    # Two loads of the same L2 key racing into L1 (two retrieve calls) both commit: the first one's block must go.
    pool = L1Pool(64 * 1024)
    try:
        a = pool.reserve(key(0), (1024,), torch.float32)
        b = pool.reserve(key(0), (1024,), torch.float32)
        pool.commit(a, keep_pin=True)
        pool.commit(b, keep_pin=True)
        pool.release([a])  # a was replaced while pinned: freed now
        pool.release([b])
        assert pool.stats()["used_bytes"] == 4096
        pool.clear()
        assert pool.stats()["used_bytes"] == 0
    finally:
        pool.close()


def test_l2_prefetch_again_and_again_then_clear(tmp_path: Path) -> None:
    ts = [torch.full((1024,), float(i)) for i in range(4)]
    ks = [key(i) for i in range(4)]
    with Store(l1_size_gb=MB, l2_adapters=[fs_config(tmp_path)]) as store:
        store.store(ks, ts)
        store.flush()
        for _ in range(50):
            store.clear_l1()
            got = store.retrieve(ks)  # every key from L2; into L1 by the background backfill
            assert all(g is not None and torch.equal(g, t) for g, t in zip(got, ts, strict=True))
        store.flush()
        assert l1(store)["used_bytes"] == 4 * 4096
        store.clear_l1()
        assert (l1(store)["used_bytes"], l1(store)["objects"]) == (0, 0)
        assert store.stats()["l2_prefetched"] == 200


@pytest.mark.parametrize("with_l2", [False, True])
def test_concurrent_re_stores_and_reads_leave_nothing_behind(tmp_path: Path, with_l2: bool) -> None:
    adapters = [fs_config(tmp_path)] if with_l2 else []
    errors: list[BaseException] = []
    with Store(l1_size_gb=MB / 4, l2_adapters=adapters, max_pending_l2_writes=1024) as store:

        def work(seed: int) -> None:
            try:
                for i in range(300):
                    k = [key((seed + i) % 6), key((seed * 7 + i) % 6)]  # overlapping keys, duplicates in a batch
                    v = [torch.full((512,), float(k[0].chunk_hash == k[1].chunk_hash)) for _ in k]
                    store.store(k, v)
                    for got in store.retrieve(k):
                        assert got is None or got.shape == (512,)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store.flush()
        assert not errors, errors[:1]
        stats = l1(store)
        assert stats["used_bytes"] == stats["objects"] * 2048 <= 6 * 2048
        store.clear_l1()
        assert (l1(store)["used_bytes"], l1(store)["objects"]) == (0, 0)
        assert store.stats()["l1_store_refused"] == 0


class PoolMachine(RuleBasedStateMachine):
    """Random reserve / commit / acquire / release / clear sequences (eviction happens inside reserve): the
    pool's used bytes are always the sum of the blocks of indexed and pinned objects, blocks never overlap, and
    an object's bytes never change while it is indexed or pinned."""

    reserved = Bundle("reserved")  # pinned, not yet committed
    pinned = Bundle("pinned")  # one pin each: acquired, or committed with keep_pin

    def __init__(self) -> None:
        super().__init__()
        self.pool = L1Pool(16 * 1024, "LRU")
        self.pins: dict[int, tuple[L1Object, int]] = {}  # id -> (object, pins we hold)
        self.fill = 0

    def _pin(self, obj: L1Object) -> L1Object:
        o, n = self.pins.get(id(obj), (obj, 0))
        self.pins[id(obj)] = (o, n + 1)
        return obj

    def _unpin(self, obj: L1Object) -> None:
        o, n = self.pins[id(obj)]
        if n == 1:
            del self.pins[id(obj)]
        else:
            self.pins[id(obj)] = (o, n - 1)

    @rule(target=reserved, k=st.integers(0, 7), n=st.sampled_from([16, 256, 700, 1024, 3000]))
    def reserve(self, k: int, n: int) -> L1Object | None:
        try:
            obj = self.pool.reserve(key(k), (n,), torch.uint8)
        except CapacityError:
            return None
        self.fill = (self.fill + 1) % 251
        self.pool.view(obj).fill_(self.fill)
        return self._pin(obj)

    @rule(target=pinned, obj=consumes(reserved), keep=st.booleans())
    def commit(self, obj: L1Object | None, keep: bool) -> L1Object | None:
        if obj is None:
            return None
        self.pool.commit(obj, keep_pin=keep)
        if keep:
            return obj
        self._unpin(obj)
        return None

    @rule(obj=consumes(reserved))
    def drop(self, obj: L1Object | None) -> None:
        self.release(obj)

    @rule(obj=consumes(pinned))
    def release(self, obj: L1Object | None) -> None:
        if obj is not None:
            self.pool.release([obj])
            self._unpin(obj)

    @rule(target=pinned, k=st.integers(0, 7))
    def acquire(self, k: int) -> L1Object | None:
        (obj,) = self.pool.acquire([key(k)])
        return None if obj is None else self._pin(obj)

    @rule()
    def clear(self) -> None:
        self.pool.clear()

    @invariant()
    def blocks_add_up(self) -> None:
        alloc = self.pool._alloc
        live = {id(o): o for o in self.pool._index.values()}
        live.update({i: o for i, (o, _) in self.pins.items()})
        blocks = alloc.used_blocks
        assert sorted(blocks) == sorted(o.offset for o in live.values()), "a block without an owner, or shared"
        assert self.pool.stats()["used_bytes"] == sum(blocks.values())
        end = 0
        for off in sorted(blocks):
            assert off >= end, "overlapping blocks"
            end = off + blocks[off]
        assert alloc.free_bytes + sum(blocks.values()) == alloc.size
        for o in live.values():
            v = self.pool.view(o)
            assert v.numel() == 0 or bool(torch.all(v == v[0])), "an object changed under its owner"

    def teardown(self) -> None:
        for o, n in list(self.pins.values()):
            self.pool.release([o] * n)
        self.pins.clear()
        self.pool.clear()
        assert self.pool.stats()["used_bytes"] == 0
        self.pool.close()


PoolMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
test_pool_state_machine = PoolMachine.TestCase


def test_effective_capacity_follows_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    free = [64 * 1024]  # the host (faked) can give 64 KiB more
    monkeypatch.setattr(arena_mod, "available_memory", lambda: (free[0], 1 << 30))
    pool = L1Pool(1 << 30, "LRU", headroom=16 * 1024)
    try:
        assert pool.stats()["effective_capacity_bytes"] == 48 * 1024  # 64 KiB minus the headroom
        for i in range(20):  # 20 x 4 KiB through 48 KiB: evicts, never grows past it
            obj = pool.reserve(key(i), (1024,), torch.float32)
            pool.commit(obj)
        stats = pool.stats()
        assert stats["objects"] == 12 and stats["evictions"] == 8 and stats["used_bytes"] == 48 * 1024
        pinned = pool.acquire([key(i) for i in range(8, 20)])
        with pytest.raises(CapacityError, match="host's free memory caps the pool"):
            pool.reserve(key(99), (1024,), torch.float32)
        pool.release(pinned)
        free[0] = 0  # the host ran short: what is resident stays usable, no growth
        pool._budget.refresh()
        obj = pool.reserve(key(99), (1024,), torch.float32)
        assert obj.offset + 4096 <= 48 * 1024
        pool.commit(obj)
        free[0] = 1 << 20  # memory came back: re-checked, the pool grows again
        pool._budget.refresh()
        for i in range(100, 120):
            pool.commit(pool.reserve(key(i), (1024,), torch.float32))
        assert pool.stats()["objects"] == 32
    finally:
        pool.close()


def test_waiting_l2_writes_pin_at_most_half_the_effective_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    # 100 MiB configured, but the host (faked) leaves the pool 512 KiB: writes waiting for a stalled L2 may pin
    # half of that, not half of 100 MiB, so stores keep finding unpinned room to evict.
    monkeypatch.setattr(arena_mod, "available_memory", lambda: ((256 << 20) + (512 << 10), 1 << 30))
    gate = threading.Event()
    with Store(l1_size_gb=100 * MB, l2_adapters=[{"type": "faulty", "inner": {"type": "memory"}}]) as store:
        faulty = store._tiers[0].adapter
        inner_store = faulty._store  # type: ignore[attr-defined]
        faulty._store = lambda k, r: (gate.wait(), inner_store(k, r))  # type: ignore[attr-defined]
        try:
            assert l1(store)["effective_capacity_bytes"] == 512 << 10
            for i in range(64):  # 64 x 16 KiB through 512 KiB while the L2 writer is stuck
                store.store([key(i)], [torch.full((4096,), float(i))])
            stats = store.stats()
            assert stats["l1_store_refused"] == 0
            assert stats["l2_pending_bytes"] <= 256 << 10
            assert stats["l1"]["used_bytes"] <= 512 << 10
        finally:
            gate.set()


def test_reserved_huge_pages_are_not_capped_by_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # hugetlbfs pages are reserved for the whole pool at mmap and are not part of MemAvailable
    monkeypatch.setattr(arena_mod, "available_memory", lambda: (0, 1 << 30))
    assert arena_mod.MemoryBudget(1 << 30, headroom=0, reserved=True).limit(0) == 1 << 30
    assert arena_mod.MemoryBudget(1 << 30, headroom=0).limit(0) == 0
