"""KV events in the embedded Store: the schema, the chunk hash a router computes, the listener hook, gaps."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CapacityError, ObjectKey, Store
from kvtier.events import (
    KINDS,
    L1_TIER,
    SCHEMA_VERSION,
    TOPIC,
    EventBatch,
    EventHub,
    GapDetector,
    KVEvent,
    SchemaError,
    chunk_hashes,
    decode_batch,
    encode_batch,
    message_frames,
)
from kvtier.storage import keys as store_keys
from kvtier.storage.l1 import L1Pool
from kvtier.testing.adapters import chunk
from kvtier.types import salt_digest

MB = 1 / 1024  # in GiB: l1_size_gb=MB is one MiB


class Collector:
    """A listener that keeps every event (optionally blocking until released)."""

    def __init__(self) -> None:
        self.events: list[KVEvent] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, events: Sequence[KVEvent]) -> None:
        self.gate.wait()
        self.events.extend(events)

    def of(self, kind: str, tier: str | None = None) -> list[KVEvent]:
        return [e for e in self.events if e.kind == kind and (tier is None or e.tier == tier)]


def settle(store: Store) -> None:
    store.flush()
    events = store._events
    assert events is not None and events.drain(10.0)


# -- schema ---------------------------------------------------------------------------------------------------
hexes = st.text("0123456789abcdef", min_size=1, max_size=64)
events_st = st.builds(
    KVEvent,
    seq=st.integers(0, 2**63 - 1),
    kind=st.sampled_from(KINDS),
    model=st.text(max_size=40),
    salt=st.one_of(st.just(""), st.text("0123456789abcdef", min_size=32, max_size=32)),
    rank=st.integers(0, 65535),
    hash=hexes,
    parent=st.one_of(st.none(), hexes),
    tier=st.sampled_from(["l1", "fs", "redis+fp8", "fs#1"]),
    size=st.one_of(st.none(), st.integers(0, 2**40)),
    ts=st.floats(0, 2e9),
)


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(events_st, max_size=8),
    dropped=st.integers(0, 2**40),
    publisher=st.text("0123456789abcdef", min_size=32, max_size=32),
)
def test_schema_round_trip(events: list[KVEvent], dropped: int, publisher: str) -> None:
    batch = EventBatch(publisher=publisher, started=1.5, ts=2.5, dropped=dropped, events=events)
    assert decode_batch(encode_batch(batch)) == batch
    topic, first, payload = message_frames(batch)
    assert topic == TOPIC and int.from_bytes(first, "big") == (events[0].seq if events else 0)
    # A reader without kvtier: plain msgpack gives a map per batch and per event, with the documented names.
    doc = msgspec.msgpack.decode(payload)
    assert doc["v"] == SCHEMA_VERSION and doc["publisher"] == publisher and doc["dropped"] == dropped
    assert [e["seq"] for e in doc["events"]] == [e.seq for e in events]
    assert all(
        set(e) == {"seq", "kind", "model", "salt", "rank", "hash", "parent", "tier", "size", "ts"}
        for e in doc["events"]
    )


def test_schema_refuses_foreign_and_future_messages_and_reads_added_fields() -> None:
    with pytest.raises(SchemaError):
        decode_batch(b"\xc1 not msgpack")
    with pytest.raises(SchemaError):
        decode_batch(msgspec.msgpack.encode({"hello": 1}))
    future = {"v": SCHEMA_VERSION + 1, "publisher": "a", "started": 0.0, "ts": 0.0, "events": []}
    with pytest.raises(SchemaError, match="version"):
        decode_batch(msgspec.msgpack.encode(future))
    event = {"seq": 0, "kind": "stored", "model": "m", "salt": "", "rank": 0, "hash": "ab", "tier": "l1", "ts": 1.0}
    added = {**future, "v": SCHEMA_VERSION, "new_field": [1], "events": [{**event, "new": "x"}]}
    batch = decode_batch(msgspec.msgpack.encode(added))  # fields added within a version are ignored
    assert batch.events[0].hash == "ab" and batch.events[0].parent is None and batch.events[0].size is None


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40),
    chunk_size=st.integers(1, 9),
)
def test_router_chunk_hash_equals_the_store_hash(tokens: list[int], chunk_size: int) -> None:
    assert chunk_hashes(tokens, chunk_size) == store_keys.chunk_hashes(tokens, chunk_size)


def test_events_module_imports_without_torch() -> None:
    code = "import sys, kvtier.events; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr


def test_gap_detector() -> None:
    def batch(publisher: str, *seqs: int) -> EventBatch:
        evs = [KVEvent(seq=s, kind="stored", model="m", salt="", rank=0, hash="a", tier="l1", ts=0.0) for s in seqs]
        return EventBatch(publisher=publisher, started=0.0, ts=0.0, events=evs)

    gaps = GapDetector()
    assert gaps.feed(batch("a", 0, 1, 2)) == 0
    assert gaps.feed(batch("a", 3)) == 0
    assert gaps.feed(batch("a", 6, 7)) == 2  # 4 and 5 lost
    assert gaps.feed(batch("a", 9)) == 1
    assert gaps.feed(batch("b", 0)) == 0 and gaps.restarts == 1  # a new publisher: a restart, not a gap
    assert gaps.lost == 3


# -- the L1 pool's eviction callback ---------------------------------------------------------------------------
def test_pool_on_evict_reports_policy_evictions_outside_the_lock() -> None:
    seen: list[list[ObjectKey]] = []
    pool: L1Pool

    def on_evict(keys: Sequence[ObjectKey]) -> None:
        pool.contains(list(keys))  # takes the pool lock: would deadlock if called under it
        seen.append(list(keys))

    pool = L1Pool(1 << 20, "LRU", on_evict=on_evict)
    try:
        shape, dtype = (1 << 16,), torch.uint8  # 64 KiB: 16 fit
        keys = [ObjectKey("m", format(i + 1, "x")) for i in range(40)]
        for key in keys:
            pool.commit(pool.reserve(key, shape, dtype))
        again = pool.reserve(keys[-1], shape, dtype)  # a replacement is not an eviction ...
        pool.commit(again)
        evicted = [k for batch in seen for k in batch]
        assert evicted == keys[: len(evicted)], "LRU order, each once"
        assert len(evicted) == pool.stats()["evictions"] >= 24
        before = len(evicted)
        pool.clear()  # ... nor is a clear
        assert sum(len(b) for b in seen) == before
    finally:
        pool.close()


def test_pool_on_evict_reports_evictions_of_a_reserve_that_then_fails() -> None:
    seen: list[ObjectKey] = []
    pool = L1Pool(1 << 20, "LRU", on_evict=seen.extend)
    try:
        keys = [ObjectKey("m", format(i + 1, "x")) for i in range(16)]
        for key in keys:
            pool.commit(pool.reserve(key, (1 << 16,), torch.uint8))
        pinned = pool.acquire(keys[1::2])  # every other object pinned by a read in flight
        with pytest.raises(CapacityError):
            pool.reserve(ObjectKey("m", "b19"), (1 << 19,), torch.uint8)  # evicts the rest: 64 KiB holes, no room
        assert seen == keys[0::2] and pool.contains(keys[0::2]) == [False] * 8
        pool.release(pinned)
    finally:
        pool.close()


# -- the Store's listener hook ---------------------------------------------------------------------------------
def test_stored_events_carry_key_tier_size_and_parent(tmp_path: object) -> None:
    with Store(l1_size_gb=MB, chunk_size=4, l2_adapters=[{"type": "memory"}]) as store:
        got = Collector()
        store.add_listener(got)
        tokens = list(range(4 * 4))
        keys = store.keys_for_tokens("org/model", tokens, cache_salt="tenant-secret")
        store.store(keys[1:3], [chunk(i) for i in range(2)])  # a slice: chunk 1's parent is chunk 0
        settle(store)
        l1 = got.of("stored", L1_TIER)
        l2 = got.of("stored", "memory")
        assert [e.hash for e in l1] == [k.chunk_hash for k in keys[1:3]] == chunk_hashes(tokens, 4)[1:3]
        assert [e.hash for e in l2] == [e.hash for e in l1]
        assert [e.parent for e in l1] == [keys[0].chunk_hash, keys[1].chunk_hash]
        assert all(e.model == "org/model" and e.rank == 0 for e in got.events)
        assert all(e.salt == salt_digest("tenant-secret") and len(e.salt) == 32 for e in got.events)
        assert all(e.size == chunk(0).numel() * 2 for e in got.events)
        assert [e.seq for e in got.events] == list(range(len(got.events)))
        assert "tenant-secret" not in repr(got.events) and "tenant-secret" not in repr(store.stats())

        # Keys the Store did not compute: the parent is the key before it in the same call, when of one prompt.
        other = [ObjectKey("m", "a1"), ObjectKey("m", "a2"), ObjectKey("m", "a3", kv_rank=1)]
        store.store(other, [chunk(i) for i in range(3)])
        settle(store)
        assert [e.parent for e in got.of("stored", L1_TIER)[2:]] == [None, "a1", None]

        # Back from L2 into L1: stored in l1 again; clear_l1: one cleared event.
        store.clear_l1()
        assert store.retrieve(keys[1:2])[0] is not None
        settle(store)
        assert got.events[-2].kind == "cleared" and got.events[-2].tier == L1_TIER and got.events[-2].hash == ""
        assert got.events[-1].kind == "stored" and got.events[-1].tier == L1_TIER
        assert got.events[-1].hash == keys[1].chunk_hash and got.events[-1].parent == keys[0].chunk_hash
        assert [e.seq for e in got.events] == list(range(len(got.events)))


def test_l1_evictions_are_reported_in_order() -> None:
    with Store(l1_size_gb=MB) as store:
        got = Collector()
        store.add_listener(got)
        keys = [ObjectKey("m", format(0x100 + i, "x")) for i in range(400)]
        for key in keys:  # 6 KiB each: about 170 fit in 1 MiB
            store.store([key], [chunk(1)])
        settle(store)
        evicted = got.of("evicted", L1_TIER)
        assert len(evicted) == store.stats()["l1"]["evictions"] > 200
        assert [e.hash for e in evicted] == [k.chunk_hash for k in keys[: len(evicted)]]
        present = {k.chunk_hash for k, hit in zip(keys, store._pool.contains(keys), strict=True) if hit}
        stored = [e.hash for e in got.of("stored", L1_TIER)]
        assert set(stored) - {e.hash for e in evicted} == present, "stored minus evicted is what L1 holds"
        assert [e.seq for e in got.events] == list(range(len(got.events)))


def test_duplicate_tier_names_are_told_apart(tmp_path: object) -> None:
    with Store(l1_size_gb=MB, l2_adapters=[{"type": "memory"}, {"type": "memory"}]) as store:
        got = Collector()
        store.add_listener(got)
        store.store([ObjectKey("m", "1")], [chunk(1)])
        settle(store)
        assert sorted(e.tier for e in got.events) == ["l1", "memory#0", "memory#1"]


def test_a_blocked_listener_never_blocks_stores_and_the_gap_shows() -> None:
    with Store(l1_size_gb=MB) as store:
        got = Collector()
        store.add_listener(got)
        assert store._events is not None
        store._events.capacity = 50  # a small queue so that it overflows at once
        got.gate.clear()  # the listener hangs
        store.store([ObjectKey("m", "f0")], [chunk(0)])
        deadline = time.monotonic() + 10
        while store.stats()["events"]["queued"] and time.monotonic() < deadline:
            time.sleep(0.01)  # the thread took event 0 and is stuck in the listener
        keys = [ObjectKey("m", format(0x1000 + i, "x")) for i in range(200)]
        for key in keys:  # would hang here if a store waited for the listener
            store.store([key], [chunk(2)])
        stats = store.stats()["events"]
        assert stats["dropped"] > 0 and stats["queued"] == 50
        got.gate.set()
        settle(store)
        store.store([ObjectKey("m", "f1")], [chunk(3)])  # a gap shows with the next event that gets through
        settle(store)
        gaps = GapDetector()
        lost = gaps.feed(EventBatch(publisher="p", started=0.0, ts=0.0, events=got.events))
        assert lost == store.stats()["events"]["dropped"] > 0
        assert store.stats()["events"]["emitted"] == len(got.events) + lost


def test_a_listener_that_raises_is_counted_and_keeps_receiving() -> None:
    calls: list[int] = []

    def bad(events: Sequence[KVEvent]) -> None:
        calls.append(len(events))
        raise RuntimeError("listener bug")

    with Store(l1_size_gb=MB) as store:
        good = Collector()
        store.add_listener(bad)
        store.add_listener(good)
        for i in range(3):
            store.store([ObjectKey("m", format(i + 1, "x"))], [chunk(i)])
            settle(store)
        assert len(good.events) == 3 == sum(calls)
        assert store.stats()["events"]["listener_errors"] == len(calls)
        store.remove_listener(bad)
        store.store([ObjectKey("m", "ff")], [chunk(0)])
        settle(store)
        assert len(good.events) == 4 == sum(calls) + 1


def test_close_delivers_the_last_l2_writes_events(tmp_path: object) -> None:
    got = Collector()
    store = Store(l1_size_gb=MB, l2_adapters=[{"type": "memory"}])
    store.add_listener(got)
    keys = [ObjectKey("m", format(0x10 + i, "x")) for i in range(20)]
    store.store(keys, [chunk(i) for i in range(20)])
    store.close()
    assert len(got.of("stored", "memory")) == 20 and len(got.of("stored", L1_TIER)) == 20


def test_no_listener_no_events() -> None:
    with Store(l1_size_gb=MB) as store:
        store.store([ObjectKey("m", "1")], [chunk(1)])
        assert "events" not in store.stats() and store._events is None


def test_hub_rejects_bad_capacity_and_listener() -> None:
    with pytest.raises(ValueError, match="capacity"):
        EventHub(0)
    hub = EventHub()
    with pytest.raises(TypeError, match="callable"):
        hub.add_listener("not callable")  # type: ignore[arg-type]
    hub.close()
    with pytest.raises(RuntimeError, match="closed"):
        hub.add_listener(lambda events: None)


@pytest.mark.parametrize("kind", ["memory", "fs"])
def test_l2_adapter_evictions_are_reported(kind: str, tmp_path: Path) -> None:
    config: dict[str, object] = {"type": kind, "max_capacity_gb": 64 / (1 << 20)}  # 64 KiB: about 9 records
    if kind == "fs":
        config |= {"base_path": str(tmp_path), "durability": "none"}
    with Store(l1_size_gb=MB, l2_adapters=[config]) as store:
        got = Collector()
        store.add_listener(got)
        keys = [ObjectKey("org/m", format(0x200 + i, "x"), 2, "salt-x") for i in range(30)]
        for key in keys:
            store.store([key], [chunk(1)])
            store.flush()
        settle(store)
        evicted = got.of("evicted", kind)
        assert len(evicted) == store.stats()["l2"][0]["evictions"] >= 15
        assert [e.hash for e in evicted] == [k.chunk_hash for k in keys[: len(evicted)]]
        assert all(e.model == "org/m" and e.rank == 2 and e.salt == salt_digest("salt-x") for e in evicted)
        assert not got.of("evicted", L1_TIER)


def test_concurrent_stores_events_replay_to_what_l1_holds() -> None:
    """Four threads store (and retrieve) at once into a small L1: every seq number once, each key's stored before
    its evicted, and replaying the events gives exactly what L1 holds."""
    with Store(l1_size_gb=MB) as store:
        got = Collector()
        store.add_listener(got)
        keys = [[ObjectKey("m", format((t << 12) + i + 1, "x")) for i in range(150)] for t in range(4)]

        def work(mine: list[ObjectKey]) -> None:
            for i in range(0, len(mine), 3):
                store.store(mine[i : i + 3], [chunk(i) for _ in mine[i : i + 3]])
                store.retrieve(mine[max(0, i - 30) : i])  # hits refresh the LRU order meanwhile

        threads = [threading.Thread(target=work, args=(mine,)) for mine in keys]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        settle(store)
        assert [e.seq for e in got.events] == list(range(len(got.events)))
        held: dict[str, bool] = {}
        for e in got.events:
            if e.kind == "stored":
                assert not held.get(e.hash), "stored twice without an eviction between"
                held[e.hash] = True
            elif e.kind == "evicted":
                assert held.get(e.hash), "evicted before it was stored"
                held[e.hash] = False
        every = [k for mine in keys for k in mine]
        assert {k.chunk_hash for k, hit in zip(every, store._pool.contains(every), strict=True) if hit} == {
            h for h, present in held.items() if present
        }
        assert sum(not p for p in held.values()) > 300, "the test must evict"
