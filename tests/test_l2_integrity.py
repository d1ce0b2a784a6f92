"""Issue 11 regressions: a damaged, foreign or vanished L2 record is a miss, never wrong KV, never an exception.

Each test names the defect it pins; each failed on the code before the L2 tier was rebuilt.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier import ObjectKey, Store
from kvtier.errors import BatchError, ConfigError, L2Error
from kvtier.l2.adapters import FaultyAdapter, FSAdapter, create_backend
from kvtier.l2.record import FIXED_SIZE, RecordMeta, associated_data, pack_record, read_record
from kvtier.l2.tier import L2Tier
from kvtier.serde import AsyncSerdeProcessor, Deserializer, LayoutDesc, Serializer, registered_serdes
from kvtier.serde.base import RecordContext
from kvtier.testing.serde import kv_like

MB = 1 / 1024  # GiB


def fs(path: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "fs", "base_path": str(path), "durability": "none", **extra}


def keys(n: int, salt: str = "") -> list[ObjectKey]:
    return [ObjectKey("org/model", format(0x100 + i, "x"), cache_salt=salt) for i in range(n)]


def chunks(n: int, tokens: int = 64, hidden: int = 256, layers: int = 4) -> list[torch.Tensor]:
    return [kv_like((2, layers, tokens, hidden), torch.bfloat16, seed=i) for i in range(n)]


def record_path(store: Store, key: ObjectKey, tier: int = 0) -> Path:
    adapter = store._tiers[tier].adapter
    assert isinstance(adapter, FSAdapter)
    return adapter.path_for(key.to_str())


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


needs_fp8 = pytest.mark.skipif("fp8" not in registered_serdes(), reason="fp8 is not registered")


# -- defect 1: a pipelined round with nothing to decode must not hand its scratch to a round still decoding --
@needs_fp8
def test_defect1_damaged_round_never_serves_another_keys_kv(tmp_path: Path) -> None:
    ks, src = keys(8), chunks(8, tokens=256, hidden=1024, layers=8)  # 8 MiB: a decode still runs a while
    with Store(l1_size_gb=160 * MB, l2_adapters=[fs(tmp_path, serde={"type": "fp8"})]) as store:
        store.store(ks, src)
        store.flush()
        store.clear_l1()
        expected = store.retrieve(ks)  # what each undamaged record decodes to (fp8 is lossy)
        assert all(e is not None for e in expected)
        for k in ks[2:4]:
            path = record_path(store, k)
            flip(path, path.stat().st_size - 100)  # a payload bit of chunks 2 and 3
        for _ in range(5):  # the race lost on most runs before; a few tries make it certain
            store.clear_l1()
            got = store.retrieve(ks)
            for i, (g, e) in enumerate(zip(got, expected, strict=True)):
                if i in (2, 3):
                    assert g is None, f"chunk {i} is damaged: a miss"
                else:
                    assert g is not None and e is not None
                    assert torch.equal(g.view(torch.uint8), e.view(torch.uint8)), f"chunk {i}: another key's KV"
            for k in ks[2:4]:  # put the damage back for the next try (damaged records are removed)
                store._tiers[0].adapter.delete([k.to_str()])


# -- defect 2: a flipped header bit is a miss for that key only; the record is removed; nothing leaks -------
@pytest.mark.parametrize("serde", [None, {"type": "raw"}, "fp8"])
def test_defect2_damaged_header_is_a_miss_not_an_exception(tmp_path: Path, serde: Any) -> None:
    if serde == "fp8":
        if "fp8" not in registered_serdes():
            pytest.skip("fp8 is not registered")
        serde = {"type": "fp8"}
    ks, src = keys(4), chunks(4, tokens=16, hidden=64)
    config = fs(tmp_path) if serde is None else fs(tmp_path, serde=serde)
    with Store(l1_size_gb=4 * MB, l2_adapters=[config]) as store:
        store.store(ks, src)
        store.flush()
        for byte in (FIXED_SIZE + 8 + 6, FIXED_SIZE + 16 + 7, FIXED_SIZE + 24 + 4):  # high bits of the shape fields
            store.clear_l1()
            path = record_path(store, ks[1])
            if not path.exists():
                store.store(ks[1:2], src[1:2])
                store.flush()
                store.clear_l1()
            flip(path, byte, 6)
            got = store.retrieve(ks)
            assert got[1] is None
            assert all(got[i] is not None for i in (0, 2, 3)), "undamaged keys of the batch still hit"
            assert not path.exists(), "a damaged record is removed"
            store.clear_l1()
            assert store.stats()["l1"]["used_bytes"] == 0, "no L1 reservation of the batch leaked"


def test_defect2_every_header_bit_is_a_miss(tmp_path: Path) -> None:
    """Flip every bit of a record's header in turn: always a miss (or the same KV), never an exception."""
    (k,), (src,) = keys(1), chunks(1, tokens=2, hidden=8)
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path)]) as store:
        store.store([k], [src])
        store.flush()
        path = record_path(store, k)
        original = path.read_bytes()
        for bit in range(64 * 8 * 2):  # the first two 64-byte lines: fixed fields, shape, serde name, key
            store.clear_l1()
            data = bytearray(original)
            data[bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(bytes(data))
            (got,) = store.retrieve([k])
            assert got is None or torch.equal(got, src), f"bit {bit}"
            store.clear_l1()
            assert store.stats()["l1"]["used_bytes"] == 0
        assert store.stats()["l2_errors"] == 0


# -- defect 6: fs re-store at full capacity must not evict an unrelated record ---------------------------------
def test_defect6_fs_restore_at_full_capacity_keeps_other_records(tmp_path: Path) -> None:
    adapter = create_backend(fs(tmp_path, max_capacity_gb=10_000 / (1 << 30)))
    with adapter:
        cap = adapter.capacity_bytes
        assert cap is not None
        # "b" first: the least recently used record is then not the one being replaced
        adapter.store_records(["b", "a"], [[bytes(cap - cap // 2)], [bytes(cap // 2)]])
        assert adapter.used_bytes == cap
        adapter.store_records(["a"], [[b"\1" * (cap // 2)]])  # same key, same size: nothing else must go
        assert adapter.contains(["a", "b"]) == [True, True]
        assert adapter.used_bytes == cap


# -- defect 7: exceptions by kind; a worker that survives; close never blocks; stores refused once closing ----
@pytest.mark.timeout(60)
@pytest.mark.parametrize("exc", [TypeError("adapter bug"), ValueError("x"), RuntimeError("y"), KeyError("z")])
def test_defect7_write_behind_survives_any_exception(tmp_path: Path, exc: BaseException) -> None:
    config = {"type": "faulty", "inner": fs(tmp_path)}
    store = Store(l1_size_gb=4 * MB, l2_adapters=[config], max_pending_l2_writes=2)
    faulty = store._tiers[0].adapter
    assert isinstance(faulty, FaultyAdapter)
    faulty.store_error = exc
    ks, src = keys(6), chunks(6, tokens=8, hidden=32)
    for k, t in zip(ks[:3], src[:3], strict=True):
        store.store([k], [t])
    store.flush()  # hung before: the worker was dead
    stats = store.stats()
    assert stats["l2_write_failures"] + stats["l2_writes_dropped"] == 3
    assert stats["l2_pending_bytes"] == 0, "pins and pending bytes of failed writes are released"
    faulty.store_error = None
    store.store(ks[3:4], src[3:4])
    store.flush()
    assert store.stats()["l2_written"] == 1, "the worker still runs after the exception"
    for k, t in zip(ks[4:], src[4:], strict=True):
        store.store([k], [t])
    done = threading.Event()
    threading.Thread(target=lambda: (store.close(), done.set()), daemon=True).start()
    assert done.wait(30), "close() blocked"
    with Store(l1_size_gb=4 * MB, l2_adapters=[fs(tmp_path)]) as again:
        assert again.lookup(ks[3:]) == 3, "every acknowledged store reached L2 by close()"


@pytest.mark.timeout(60)
def test_defect7_store_racing_close_is_refused_or_written(tmp_path: Path) -> None:
    """A store() acknowledged while close() runs must be on L2 afterwards; once closing began, stores raise."""
    for attempt in range(5):
        base = tmp_path / str(attempt)
        store = Store(l1_size_gb=8 * MB, l2_adapters=[fs(base)], max_pending_l2_writes=256)
        ks, src = keys(200), chunks(1, tokens=4, hidden=16) * 200
        acked: list[ObjectKey] = []
        go = threading.Event()

        def writer() -> None:
            go.wait()
            for k, t in zip(ks, src, strict=True):
                try:
                    store.store([k], [t])
                except RuntimeError:
                    return  # refused: closing began
                acked.append(k)

        th = threading.Thread(target=writer)
        th.start()
        go.set()
        time.sleep(0.002 * attempt)
        store.close()
        th.join()
        with Store(l1_size_gb=8 * MB, l2_adapters=[fs(base)]) as again:
            assert again.lookup(acked) == len(acked), "an acknowledged store was lost"
        with pytest.raises(RuntimeError, match="closed"):
            store.store(ks[:1], src[:1])


def test_close_waits_for_a_store_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() unmaps L1 only after the calls in flight have left it: a store held in the middle of its copy into
    L1 while close() begins finishes (refused, never acknowledged) instead of writing into unmapped memory."""
    store = Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path)])
    ks, src = keys(2), chunks(2, tokens=4, hidden=16)
    entered, release = threading.Event(), threading.Event()
    real_view = store._pool.view

    def held_view(obj: Any) -> torch.Tensor:
        entered.set()
        release.wait(10)
        return real_view(obj)

    monkeypatch.setattr(store._pool, "view", held_view)
    outcome: list[str] = []

    def storer() -> None:
        try:
            store.store(ks, src)
            outcome.append("acknowledged")
        except RuntimeError:
            outcome.append("refused")

    th = threading.Thread(target=storer)
    th.start()
    assert entered.wait(10)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close() must wait for the store in flight"
    release.set()
    th.join(10)
    closer.join(10)
    assert not closer.is_alive() and outcome == ["refused"]
    with pytest.raises(RuntimeError, match="closed"):
        store.retrieve(ks)


def test_defect7_caller_mistake_raises_not_a_miss(tmp_path: Path) -> None:
    """A non-contiguous ``out`` is the caller's mistake: raised, not blurred into a miss."""
    ks, src = keys(2), chunks(2, tokens=8, hidden=32)
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path)]) as store:
        store.store(ks, src)
        store.flush()
        store.clear_l1()
        outs = [torch.empty(src[0].shape[::-1], dtype=src[0].dtype).transpose(0, 3) for _ in ks]
        assert not outs[0].is_contiguous()
        with pytest.raises(ValueError, match="contiguous"):
            store.retrieve_into(ks, outs)


def test_defect7_adapter_bug_on_load_raises_to_the_caller(tmp_path: Path) -> None:
    """Only L2Error (and integrity failures) become misses; an adapter's TypeError is a bug and raises."""
    ks, src = keys(2), chunks(2, tokens=8, hidden=32)
    with Store(l1_size_gb=MB, l2_adapters=[{"type": "faulty", "inner": fs(tmp_path)}]) as store:
        store.store(ks, src)
        store.flush()
        store.clear_l1()
        faulty = store._tiers[0].adapter
        assert isinstance(faulty, FaultyAdapter)
        faulty.load_error = TypeError("adapter bug")
        with pytest.raises(TypeError, match="adapter bug"):
            store.retrieve(ks)
        faulty.load_error = OSError(5, "EIO")  # a backend failure: translated to L2Error, a miss
        assert store.retrieve(ks) == [None, None]
        faulty.load_error = None
        assert store.stats()["l1"]["used_bytes"] == 0, "no L1 reservation leaked by the failed loads"
        got = store.retrieve(ks)
        assert all(g is not None and torch.equal(g, s) for g, s in zip(got, src, strict=True))


def test_l2_error_is_the_one_backend_error(tmp_path: Path) -> None:
    adapter = create_backend({"type": "faulty", "inner": fs(tmp_path)})
    assert isinstance(adapter, FaultyAdapter)
    with adapter:
        adapter.load_error = OSError(5, "EIO")
        with pytest.raises(L2Error):
            adapter.contains(["a"])
        with pytest.raises(L2Error):
            adapter.load_records(["a"], [[bytearray(4)]])


def test_outage_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 12: an L2 outage logs a line when it starts and one when it ends, not one per failed call."""
    ks, src = keys(2), chunks(2, tokens=8, hidden=32)
    with Store(l1_size_gb=MB, l2_adapters=[{"type": "faulty", "inner": fs(tmp_path)}]) as store:
        store.store(ks, src)
        store.flush()
        store.clear_l1()
        faulty = store._tiers[0].adapter
        assert isinstance(faulty, FaultyAdapter)
        faulty.load_error = ConnectionError("backend down")
        with caplog.at_level(logging.WARNING, logger="kvtier.storage.store"):
            for _ in range(50):
                assert store.retrieve(ks) == [None, None]
                assert store.lookup(ks) == 0
            faulty.load_error = None
            assert store.lookup(ks) == 2
        lines = [r.getMessage() for r in caplog.records if r.name == "kvtier.storage.store"]
        assert len(lines) == 2, lines
        assert "100" in lines[1], "the recovery line counts the failed calls"
        assert store.stats()["l2_errors"] == 100


# -- defect 8: any salt string, and only a keyed digest of it anywhere -----------------------------------------
SECRET_SALTS = ["tenant/secret+key==", "x" * 300, "ünï cödé salt", "a@b%c d"]


@pytest.mark.parametrize("salt", SECRET_SALTS)
def test_defect8_any_salt_accepted_and_never_written(
    tmp_path: Path, salt: str, caplog: pytest.LogCaptureFixture
) -> None:
    (k,) = keys(1, salt)
    assert salt not in k.to_str() and salt not in repr(k)
    (src,) = chunks(1, tokens=4, hidden=16)
    with caplog.at_level(logging.DEBUG), Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path)]) as store:
        store.store([k], [src])
        store.flush()
        store.clear_l1()
        record_path(store, k).write_bytes(record_path(store, k).read_bytes()[:-1])  # damaged: logged
        assert store.retrieve([k]) == [None]
        store.store([k], [src])
        store.flush()
        store.clear_l1()
        (got,) = store.retrieve([k])
        assert got is not None and torch.equal(got, src)
        assert salt not in str(store.stats())
    for path in tmp_path.rglob("*"):
        assert salt not in str(path)
        if path.is_file():
            assert salt.encode() not in path.read_bytes()
    assert not any(salt in r.getMessage() for r in caplog.records)
    other = keys(1, salt + "!")[0]
    assert other.to_str() != k.to_str(), "salts stay apart"


# -- defects 3 and 5, the tier side: the salt's key is used, records are bound to their key, a wrong key deletes
# nothing -----------------------------------------------------------------------------------------------------
os.environ.setdefault("KVTIER_INTEGRITY_KEY_A", "a0" * 32)
os.environ.setdefault("KVTIER_INTEGRITY_KEY_B", "b1" * 32)


def aes(env: str = "KVTIER_INTEGRITY_KEY_A") -> list[dict[str, Any]]:
    return [{"type": "raw"}, {"type": "aesgcm", "key_env": env}]


def test_defect3_records_use_the_salts_key_and_are_bound_to_their_key(tmp_path: Path) -> None:
    k_a, k_b = keys(1, "tenant-a")[0], keys(2, "tenant-b")[1]
    (src,) = chunks(1, tokens=8, hidden=32)
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path, serde=aes())]) as store:
        store.store([k_a, k_b], [src, src])
        store.flush()
        tier = store._tiers[0]
        assert tier.serde is not None
        meta, payload = read_record(record_path(store, k_a).read_bytes())
        out = torch.empty_like(src)
        ad = associated_data(meta)
        tier.serde.deserialize_batch([torch.frombuffer(bytearray(payload), dtype=torch.uint8)], [out],
                                     contexts=[RecordContext("tenant-a", ad)])  # fmt: skip
        assert torch.equal(out, src), "the record was encrypted with the key of its own salt"
        with pytest.raises(BatchError):
            tier.serde.deserialize_batch([torch.frombuffer(bytearray(payload), dtype=torch.uint8)], [out],
                                         contexts=[RecordContext("", ad)])  # fmt: skip
        # relabel: tenant a's record moved under tenant b's key, header rewritten, unkeyed checksum recomputed
        moved = pack_record(RecordMeta(meta.serde, meta.layout, k_b.to_str()), payload)
        record_path(store, k_b).write_bytes(moved)
        store.clear_l1()
        assert store.retrieve([k_b]) == [None], "a relabelled record fails authentication: a miss"
        assert store.retrieve([k_a])[0] is not None
        assert store.stats()["l2"][0]["foreign_misses"] == 1


def test_defect5_a_wrong_aesgcm_key_deletes_nothing(tmp_path: Path) -> None:
    ks, src = keys(3), chunks(3, tokens=8, hidden=32)
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path, serde=aes("KVTIER_INTEGRITY_KEY_A"))]) as store:
        store.store(ks, src)
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path, serde=aes("KVTIER_INTEGRITY_KEY_B"))]) as other:
        assert other.lookup(ks) == 0, "another deployment's records are no hits"
        assert other.retrieve(ks) == [None] * 3
        assert other.stats()["l2"][0]["foreign_misses"] == 3
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path, serde=aes("KVTIER_INTEGRITY_KEY_A"))]) as store:
        got = store.retrieve(ks)
        assert all(g is not None and torch.equal(g, s) for g, s in zip(got, src, strict=True)), "records survived"


def test_a_serde_without_identity_is_refused_at_start(tmp_path: Path) -> None:
    class Plain(Serializer):
        def serialize(self, src: torch.Tensor, dst: torch.Tensor) -> int:
            data = src.reshape(-1).view(torch.uint8)
            dst[: data.numel()].copy_(data)
            return data.numel()

        def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
            return layout_desc.nbytes

    class PlainBack(Deserializer):
        def deserialize(self, src: torch.Tensor, dst: torch.Tensor) -> None:
            dst.reshape(-1).view(torch.uint8).copy_(src)

    adapter = create_backend(fs(tmp_path))
    with pytest.raises(ConfigError, match="identity"):
        L2Tier(adapter, AsyncSerdeProcessor(Plain(), PlainBack()), config={})
    adapter.close()


def test_fs_base_path_is_one_process_at_a_time(tmp_path: Path) -> None:
    first = create_backend(fs(tmp_path))
    second = create_backend(fs(tmp_path))
    first.contains(["a"])
    with pytest.raises(ConfigError, match="in use"):
        second.contains(["a"])
    first.close()
    assert second.contains(["a"]) == [False], "free again once the first closed"
    second.close()
    script = (
        "import sys, time\nfrom kvtier.l2.adapters import create_backend\n"
        f"a = create_backend({{'type': 'fs', 'base_path': {str(tmp_path)!r}}})\na.contains(['x'])\n"
        "print('locked', flush=True)\ntime.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        third = create_backend(fs(tmp_path))
        with pytest.raises(ConfigError, match=rf"pid {proc.pid}"):
            third.contains(["a"])
        third.close()
    finally:
        proc.kill()
        proc.wait()
