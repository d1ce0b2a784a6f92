"""Eviction policies (order per policy), the allocator, and the L1 pool (capacity, pins, lazy pages)."""

import threading

import pytest
import torch

from kvtier import CapacityError, ConfigError
from kvtier.storage.l1 import Allocator, Arena, L1Pool
from kvtier.storage.policies import POLICIES, create_policy
from kvtier.types import ObjectKey


def order(policy_name: str, ops: list[tuple[str, int]]) -> list[int]:
    policy = create_policy(policy_name)
    for op, key in ops:
        getattr(policy, op)(key)
    return list(policy.victims())


def test_lru_lfu_fifo_order() -> None:
    ops = [("insert", 1), ("insert", 2), ("insert", 3), ("access", 1), ("access", 1), ("access", 2)]
    assert order("LRU", ops) == [3, 1, 2]
    assert order("FIFO", ops) == [1, 2, 3]
    assert order("LFU", ops) == [3, 2, 1]  # counts 3: 1, 2: 2, 1: 3
    assert order("lru", [("insert", 1), ("insert", 2), ("remove", 1)]) == [2]


def test_lfu_ties_go_least_recent_first() -> None:
    assert order("LFU", [("insert", 1), ("insert", 2), ("access", 2), ("access", 1)]) == [2, 1]


def test_s3fifo_resists_a_scan() -> None:
    policy = create_policy("S3-FIFO")
    hot = list(range(10))
    for k in hot:
        policy.insert(k)
    for k in hot:
        policy.access(k)  # read while on probation -> promoted to the main queue at the next eviction walk
    for k in range(100, 200):  # a one-off scan
        policy.insert(k)
    victims = []
    for v in policy.victims():
        victims.append(v)
        policy.remove(v)
        if len(victims) == 50:
            break
    assert not set(victims) & set(hot), "the scan must be evicted before the reused keys"
    # evicted probationary keys are remembered: re-inserted, they skip probation
    policy.insert(victims[0])
    assert victims[0] in policy


def test_victims_walk_ends_when_everything_is_skipped() -> None:
    for name in POLICIES:
        policy = create_policy(name)
        for k in range(20):
            policy.insert(k)
            policy.access(k)
        walked = list(policy.victims())  # the owner evicts nothing (all pinned)
        assert sorted(walked) == list(range(20)), name


def test_unknown_policy_lists_known() -> None:
    with pytest.raises(ConfigError, match=r"eviction_policy: unknown eviction policy 'MRU'.*S3-FIFO"):
        create_policy("MRU")


def test_allocator_aligns_coalesces_and_reports_fragmentation() -> None:
    a = Allocator(10 * 256, align=256)
    blocks = [a.alloc(100) for _ in range(10)]
    assert blocks == [i * 256 for i in range(10)]
    assert a.alloc(1) is None and a.free_bytes == 0
    for off in blocks[::2]:
        a.free(off)
    assert a.free_bytes == 5 * 256 and a.free_blocks == 5
    assert a.alloc(512) is None, "fragmented: no 512-byte hole although 1280 bytes are free"
    a.free(blocks[1])  # joins blocks 0, 1, 2
    assert a.free_blocks == 4 and a.largest_free == 3 * 256
    assert a.alloc(600) == 0
    for off in (blocks[3], blocks[5], blocks[7], blocks[9]):
        a.free(off)
    a.free(0)
    assert a.free_blocks == 1 and a.largest_free == 10 * 256
    with pytest.raises(ValueError):
        Allocator(100, align=3)


def key(i: int, salt: str = "") -> ObjectKey:
    return ObjectKey("m", format(i + 1, "x"), cache_salt=salt)


def test_arena_pages_are_touched_lazily() -> None:
    arena = Arena(4 << 30)  # 4 GiB asked, nothing touched
    try:
        assert arena.backing == "anonymous" and arena.buffer.numel() == 4 << 30
        arena.buffer[123] = 7
        assert int(arena.buffer[123]) == 7
        assert arena.release_pages(0, 1 << 20) == 1 << 20
        assert int(arena.buffer[123]) == 0, "released pages read as zeros"
    finally:
        arena.close()


def test_arena_refuses_a_bad_backing() -> None:
    with pytest.raises(ConfigError, match="l1_backing"):
        Arena(1 << 20, "tmpfs")


def test_pool_evicts_by_policy_and_refuses_oversized_objects() -> None:
    pool = L1Pool(4 * 1024, "LRU")
    try:
        for i in range(4):
            obj = pool.reserve(key(i), (256,), torch.float32)
            pool.view(obj).fill_(i)
            pool.commit(obj)
        pool.release(pool.acquire([key(0)]))  # 0 is now the most recently used
        obj = pool.reserve(key(9), (256,), torch.float32)
        pool.commit(obj)
        assert pool.contains([key(i) for i in range(4)]) == [True, False, True, True]
        with pytest.raises(CapacityError, match="larger than the L1 pool"):
            pool.reserve(key(10), (2000,), torch.float32)
    finally:
        pool.close()


def test_pinned_objects_are_never_evicted_or_reused() -> None:
    pool = L1Pool(2 * 1024, "FIFO")
    try:
        for i in range(2):
            obj = pool.reserve(key(i), (256,), torch.float32)
            pool.view(obj).fill_(float(i))
            pool.commit(obj)
        (held,) = pool.acquire([key(0)])
        assert held is not None
        new = pool.reserve(key(5), (256,), torch.float32)  # must evict 1, not the pinned 0
        pool.commit(new)
        assert pool.contains([key(0), key(1)]) == [True, False]
        (also,) = pool.acquire([key(5)])
        with pytest.raises(CapacityError, match="pinned"):
            pool.reserve(key(6), (256,), torch.float32)
        pool.clear()  # pinned objects leave the index, but their memory stays until released
        assert pool.contains([key(0)]) == [False]
        assert torch.all(pool.view(held) == 0.0)
        pool.release([held, also])
        assert pool.stats()["used_bytes"] == 0
    finally:
        pool.close()


def test_pins_under_concurrent_reads_and_writes() -> None:
    pool = L1Pool(64 * 1024, "LRU")  # room for 16 objects; 40 keys churn through it
    errors: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            k = i % 40
            try:
                obj = pool.reserve(key(k), (1024,), torch.float32)
            except CapacityError:
                continue
            pool.view(obj).fill_(float(k))
            pool.commit(obj)
            i += 1

    def reader() -> None:
        for _ in range(3000):
            objs = pool.acquire([key(k) for k in range(0, 40, 7)])
            for obj in objs:
                if obj is not None:
                    v = pool.view(obj)
                    first = float(v[0])
                    # a pinned object cannot be evicted and refilled under us: every element keeps its value
                    if not (torch.all(v == first) and first == float(int(obj.key.chunk_hash, 16) - 1)):
                        errors.append(f"object {obj.key} changed while pinned")
            pool.release(objs)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    stats = pool.stats()
    pool.close()
    assert not errors, errors[:3]
    assert stats["evictions"] > 0 and stats["hits"] > 0
    assert stats["used_bytes"] <= stats["capacity_bytes"]
