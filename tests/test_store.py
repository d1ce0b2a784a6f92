"""kvtier.Store: write-through, prefetch through L1, caller-owned results, salts, serdes per adapter, failures."""

import errno
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtier
from kvtier import CapacityError, ConfigError, ObjectKey, Store
from kvtier.l2.adapters import FaultyAdapter
from kvtier.serde import registered_serdes
from kvtier.storage.keys import chunk_hashes
from kvtier.testing.adapters import chunk, ensure_test_serde

ensure_test_serde()
MB = 1 / 1024  # in GiB: l1_size_gb=MB is one MiB


def fs_config(path: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "fs", "base_path": str(path), "durability": "none", **extra}


def kv(seed: int, tokens: int = 16) -> torch.Tensor:
    return chunk(seed, tokens)


def test_public_names() -> None:
    assert kvtier.Store is Store and kvtier.ObjectKey is ObjectKey


def test_keys_for_tokens_is_a_rolling_prefix_hash() -> None:
    with Store(l1_size_gb=MB, chunk_size=4) as store:
        a = store.keys_for_tokens("m", list(range(10)))
        assert len(a) == 2, "the partial tail chunk gets no key"
        b = store.keys_for_tokens("m", [*range(4), 99, 5, 6, 7, 8])
        assert a[0] == b[0] and a[1] != b[1]
        c = store.keys_for_tokens("m", [0, 1, 2, 3], cache_salt="tenant-b")
        assert c[0].chunk_hash == a[0].chunk_hash and c[0] != a[0]
        assert store.keys_for_tokens("m", torch.arange(8)) == a
        assert chunk_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)[1] != a[1].chunk_hash, "chunk 1 depends on chunk 0"
        with pytest.raises(ConfigError, match="token_ids"):
            store.keys_for_tokens("m", [[1, 2]])


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="l1_size_gb"):
        Store(l1_size_gb=0)
    with pytest.raises(ConfigError, match="eviction_policy"):
        Store(l1_size_gb=MB, eviction_policy="RANDOM")
    with pytest.raises(ConfigError, match="chunk_size"):
        Store(l1_size_gb=MB, chunk_size=0)
    with pytest.raises(ConfigError, match=r"l2_adapters\[1\]\.durability"):
        Store(l1_size_gb=MB, l2_adapters=[fs_config(tmp_path / "a"), fs_config(tmp_path / "b", durability="x")])


@pytest.mark.parametrize("serde", [None, {"type": "raw"}, {"type": "fp8"}])
def test_fs_round_trip_without_engine(tmp_path: Path, serde: Any) -> None:
    if serde is not None and serde["type"] not in registered_serdes():
        pytest.skip(f"serde {serde['type']!r} is not registered in this build (it comes with the codecs issue)")
    config = fs_config(tmp_path) if serde is None else fs_config(tmp_path, serde=serde)
    src = [kv(i, tokens=32) for i in range(3)]
    with Store(l1_size_gb=4 * MB, l2_adapters=[config], chunk_size=32) as store:
        keys = store.keys_for_tokens("org/model", list(range(100)))
        store.store(keys, src)
        store.flush()
        store.clear_l1()
        assert store.stats()["l1"]["objects"] == 0
        assert store.lookup(keys) == 3
        out = store.retrieve(keys)
        lossless = serde is None or serde["type"] == "raw"
        for s, o in zip(src, out, strict=True):
            assert o is not None and o.shape == s.shape and o.dtype == s.dtype
            if lossless:
                assert torch.equal(o, s)
            else:
                assert (o.float() - s.float()).abs().max() <= 0.1 * s.float().abs().max()
        assert store.stats()["l2_prefetched"] == 3
        store.flush()  # an L2 hit reaches L1 in the background
        assert store.stats()["l1"]["objects"] == 3, "a prefetch lands in L1"


def test_retrieve_returns_caller_owned_copies() -> None:
    with Store(l1_size_gb=MB) as store:
        k = [ObjectKey("m", "a1")]
        src = kv(1)
        store.store(k, [src])
        (got,) = store.retrieve(k)
        assert got is not None
        got.zero_()  # the caller's tensor: changing it changes nothing stored
        src.zero_()  # nor does changing the tensor that was stored
        (again,) = store.retrieve(k)
        assert again is not None and torch.equal(again, kv(1))
        store.store(k, [kv(2)])  # a later store never changes a tensor handed out before
        assert torch.equal(again, kv(1))


def test_retrieve_into_fills_caller_tensors_and_counts_leading_hits(tmp_path: Path) -> None:
    with Store(l1_size_gb=MB, l2_adapters=[fs_config(tmp_path)]) as store:
        ks = [ObjectKey("m", format(i + 1, "x")) for i in range(4)]
        store.store([ks[0], ks[1], ks[3]], [kv(0), kv(1), kv(3)])
        store.flush()
        store.clear_l1()
        outs = [torch.empty_like(kv(0)) for _ in ks]
        assert store.retrieve_into(ks, outs) == 2
        assert torch.equal(outs[0], kv(0)) and torch.equal(outs[1], kv(1))
        assert store.retrieve_into(ks[3:], outs[3:]) == 1 and torch.equal(outs[3], kv(3))
        assert store.retrieve_into(ks[:1], [torch.empty(3)]) == 0, "a tensor of another shape is not filled"
        assert store.lookup(ks) == 2
        assert store.retrieve(ks)[2] is None


def test_cache_salt_isolates_tenants(tmp_path: Path) -> None:
    with Store(l1_size_gb=MB, l2_adapters=[fs_config(tmp_path)], chunk_size=16) as store:
        a = store.keys_for_tokens("m", list(range(16)), cache_salt="alice")
        b = store.keys_for_tokens("m", list(range(16)), cache_salt="bob")
        store.store(a, [kv(1)])
        store.flush()
        assert store.lookup(b) == 0 and store.retrieve(b) == [None]
        store.clear_l1()
        assert store.lookup(b) == 0 and store.retrieve(b) == [None]
        assert store.lookup(a) == 1


def test_two_adapters_with_different_serdes(tmp_path: Path) -> None:
    configs = [
        fs_config(tmp_path / "plain"),
        fs_config(tmp_path / "xor", serde=[{"type": "raw"}, {"type": "kvtier-test-xor", "max_workers": 2}]),
    ]
    src = [kv(i) for i in range(4)]
    ks = [ObjectKey("m", format(i + 1, "x")) for i in range(4)]
    with Store(l1_size_gb=MB, l2_adapters=configs) as store:
        store.store(ks, src)
    plain_files = sorted(p.read_bytes() for p in (tmp_path / "plain").rglob("*.kvtr"))
    xor_files = sorted(p.read_bytes() for p in (tmp_path / "xor").rglob("*.kvtr"))
    assert len(plain_files) == len(xor_files) == 4
    raw_bytes = src[0].view(torch.uint8).numpy().tobytes()
    assert any(raw_bytes in f for f in plain_files) and not any(raw_bytes in f for f in xor_files)
    # each adapter alone serves the objects back through its own serde (close flushed every write)
    for config in configs:
        with Store(l1_size_gb=MB, l2_adapters=[config]) as store:
            out = store.retrieve(ks)
            assert all(o is not None and torch.equal(o, s) for o, s in zip(out, src, strict=True))
    # the first adapter that has a key serves it: remove one from the first, the second fills in
    (tmp_path / "plain" / "x").mkdir()
    with Store(l1_size_gb=MB, l2_adapters=configs) as store:
        store._tiers[0].delete(ks[:1])
        out = store.retrieve(ks)
        assert all(o is not None and torch.equal(o, s) for o, s in zip(out, src, strict=True))
        hits = [t["hits"] for t in store.stats()["l2"]]
        assert hits == [3, 1]


def test_disk_full_keeps_loads_working(tmp_path: Path) -> None:
    config = {"type": "faulty", "inner": fs_config(tmp_path)}
    with Store(l1_size_gb=MB, l2_adapters=[config]) as store:
        old = [ObjectKey("m", "a"), ObjectKey("m", "b")]
        store.store(old, [kv(0), kv(1)])
        store.flush()
        faulty = store._tiers[0].adapter
        assert isinstance(faulty, FaultyAdapter)
        faulty.store_error = OSError(errno.ENOSPC, "No space left on device")
        new = [ObjectKey("m", "c")]
        store.store(new, [kv(2)])  # L1 takes it; the L2 write fails and is counted, not raised
        store.flush()
        assert store.stats()["l2_write_failures"] == 1
        store.clear_l1()
        assert store.lookup(old) == 2 and store.lookup(new) == 0
        out = store.retrieve(old)
        assert all(o is not None and torch.equal(o, kv(i)) for i, o in enumerate(out))


def test_full_queue_drops_l2_writes_without_blocking(tmp_path: Path) -> None:
    gate = threading.Event()
    config = {"type": "faulty", "inner": {"type": "memory"}}
    with Store(l1_size_gb=4 * MB, l2_adapters=[config], max_pending_l2_writes=2) as store:
        faulty = store._tiers[0].adapter
        assert isinstance(faulty, FaultyAdapter)
        inner_store = faulty._store
        faulty._store = lambda k, r: (gate.wait(), inner_store(k, r))  # type: ignore[method-assign]
        for i in range(6):  # 1 in the writer's hands, 2 queued, the rest dropped
            store.store([ObjectKey("m", format(i + 1, "x"))], [kv(i)])
        assert store.stats()["l2_writes_dropped"] >= 3
        gate.set()
    # close() drained what was queued; dropped writes are counted, stored ones are all on L2
    stats = store.stats()
    assert stats["l2_written"] + stats["l2_writes_dropped"] == 6


def test_object_larger_than_pool_is_refused(tmp_path: Path) -> None:
    with Store(l1_size_gb=MB) as store:
        with pytest.raises(CapacityError, match="larger than the L1 pool"):
            store.store([ObjectKey("m", "a")], [torch.zeros(2 << 20, dtype=torch.uint8)])
        assert store.lookup([ObjectKey("m", "a")]) == 0


def test_l1_eviction_and_l2_backfill_under_sustained_writes(tmp_path: Path) -> None:
    with Store(l1_size_gb=MB, eviction_policy="S3-FIFO", l2_adapters=[fs_config(tmp_path)]) as store:
        ks = [ObjectKey("m", format(i + 1, "x")) for i in range(64)]  # 64 x 24 KiB through a 1 MiB L1
        for i, k in enumerate(ks):
            store.store([k], [kv(i, tokens=64)])
            stats = store.stats()
            assert stats["l1"]["used_bytes"] <= stats["l1"]["capacity_bytes"]
            assert stats["l2_pending_bytes"] <= stats["l1"]["capacity_bytes"] // 2 + 24 * 1024
        store.flush()
        stats = store.stats()
        assert stats["l1"]["evictions"] > 0
        assert stats["l1_store_refused"] == 0, "waiting L2 writes may pin at most half of L1"
        out = store.retrieve(ks)
        for i, o in enumerate(out):
            assert o is None or torch.equal(o, kv(i, tokens=64)), "a chunk is exact or a miss, never wrong"
        # the writer may fall behind on a loaded machine: what it could not take was dropped and counted
        missing = sum(o is None for o in out)
        assert missing <= stats["l2_writes_dropped"]
        assert stats["l2_written"] + stats["l2_writes_dropped"] == 64


def test_stats_are_json_and_close_is_idempotent(tmp_path: Path) -> None:
    store = Store(l1_size_gb=MB, l2_adapters=[fs_config(tmp_path)])
    store.store([ObjectKey("m", "a")], [kv(0)])
    json.dumps(store.stats())
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.lookup([ObjectKey("m", "a")])
    with Store(l1_size_gb=MB, l2_adapters=[fs_config(tmp_path)]) as again:
        assert again.lookup([ObjectKey("m", "a")]) == 1, "close flushed the pending write"


def test_no_l2_means_no_threads() -> None:
    before = threading.active_count()
    with Store(l1_size_gb=MB) as store:
        store.store([ObjectKey("m", "a")], [kv(0)])
        assert threading.active_count() == before


@pytest.mark.parametrize("with_l2", [False, True])
def test_a_failed_copy_leaks_no_pin(tmp_path: Path, with_l2: bool) -> None:
    adapters = [fs_config(tmp_path)] if with_l2 else []
    with Store(l1_size_gb=MB, l2_adapters=adapters) as store:
        ks = [ObjectKey("m", "a"), ObjectKey("m", "b")]
        with pytest.raises((NotImplementedError, RuntimeError)):
            store.store(ks, [kv(0), torch.empty(16, device="meta")])
        store.clear_l1()
        assert store.stats()["l1"]["used_bytes"] == 0, "every pin was released, so clear freed everything"


def test_stats_report_serde_time_per_adapter(tmp_path: Path) -> None:
    """/stats needs the serde time of each adapter with a serde; an adapter without one reports none."""
    raw_dir, serde_dir = tmp_path / "plain", tmp_path / "serde"
    adapters = [
        {"type": "fs", "base_path": str(raw_dir)},
        {"type": "fs", "base_path": str(serde_dir), "serde": [{"type": "raw"}, {"type": "checksum"}]},
    ]
    with Store(l1_size_gb=MB, l2_adapters=adapters) as store:
        store.store([ObjectKey("m", "a")], [kv(0)])
        store.flush()
        plain, with_serde = store.stats()["l2"]
    assert "serde_time" not in plain
    assert with_serde["serde_time"]["serialize_items_total"] == 1
    assert with_serde["serde_time"]["serialize_seconds_total"] > 0.0
