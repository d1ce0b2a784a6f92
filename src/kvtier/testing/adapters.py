"""The L2 adapter conformance suite: every adapter passes by subclassing :class:`L2AdapterTests`.

Example, in a backend's tests::

    from kvtier.testing import L2AdapterTests

    class TestMyAdapter(L2AdapterTests):
        def adapter_config(self, tmp_path, capacity_gb=None):
            return {"type": "mine", "url": ..., **({"max_capacity_gb": capacity_gb} if capacity_gb else {})}

``capacity_gb`` is set by the capacity tests; an unbounded adapter sets ``bounded = False`` and ignores it.
The suite checks the bytes contract (batches, scatter/gather, header-first loads, misses, overwrite, delete,
capacity, re-store at full capacity, close, lazy start) and the shared tier on top of the adapter (round trips
with no serde, raw and a bytes-stage chain; damaged records are misses and are removed, foreign ones are misses
left in place; a batch over several pipelined rounds mixing hits, misses, damaged and foreign records, with records
removed or damaged between the lookup and the load through the fault-injecting adapter: every hit exact, nothing
raised; a failed batch leaves nothing visible) and enumeration / purge by model, by tenant and both, in bounded
batches with progress, over model names that stress every key mapping.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from kvtier.errors import BatchError, CapacityError, SerdeError
from kvtier.l2.adapters import MISS, FaultyAdapter, KeyMatch, L2Adapter, create_backend, create_l2_adapter
from kvtier.l2.record import RecordMeta, pack_record
from kvtier.l2.tier import L2Tier, byte_view, layout_of
from kvtier.serde import AsyncSerdeProcessor, BytesDeserializer, BytesSerializer, LayoutDesc, register_serde_factory
from kvtier.serde.processor import SerdeIdentity
from kvtier.serde.registry import registered_serdes
from kvtier.testing.serde import kv_like
from kvtier.types import ObjectKey, salt_digest

TEST_SERDE = "kvtier-test-xor"


class _XorSerializer(BytesSerializer):
    """A bytes stage that changes every byte and refuses a poisoned input (for failed-batch tests)."""

    def serialize(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        n = src.numel()
        if n >= 4 and bytes(src[:4].numpy()) == b"FAIL":
            raise SerdeError("poisoned input")
        torch.bitwise_xor(src, 0x5A, out=dst[:n])
        return n

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return layout_desc.nbytes


class _XorDeserializer(BytesDeserializer):
    def decoded_size(self, src: torch.Tensor) -> int:
        return src.numel()

    def deserialize(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        torch.bitwise_xor(src, 0x5A, out=dst)


def ensure_test_serde() -> str:
    """Register the suite's bytes-stage serde once (``kvtier-test-xor``) and return its name."""
    if TEST_SERDE not in registered_serdes():
        register_serde_factory(TEST_SERDE, lambda config: AsyncSerdeProcessor(_XorSerializer(), _XorDeserializer()))
    return TEST_SERDE


def keys(n: int, salt: str = "", start: int = 0) -> list[ObjectKey]:
    return [ObjectKey("org/model", format(1000 + i, "x"), cache_salt=salt) for i in range(start, start + n)]


def chunk(seed: int, tokens: int = 16) -> torch.Tensor:
    return kv_like((2, 3, tokens, 32), torch.bfloat16, seed=seed)


def _is_started(adapter: L2Adapter) -> bool:
    return adapter.started  # a call, so that a type checker does not keep the earlier `not started` narrowing


def _replace(adapter: L2Adapter, key: str, data: bytes) -> None:
    """Put ``data`` under ``key`` whatever is there: delete, then store, so that a write-once adapter (an object
    store's conditional put keeps the first record of a key) is damaged as surely as one that overwrites."""
    adapter.delete([key])
    adapter.store_records([key], [[data]])


class L2AdapterTests:
    """Subclass and implement :meth:`adapter_config`."""

    #: whether the adapter honours a capacity (``max_capacity_gb`` or the like)
    bounded: ClassVar[bool] = True

    def adapter_config(self, tmp_path: Path, capacity_gb: float | None = None) -> dict[str, Any]:
        raise NotImplementedError("subclasses return the adapter's config (without serde)")

    def serde_configs(self) -> list[Any]:
        """Serde configs the round-trip tests run through (``None``: no serde)."""
        return [None, {"type": "raw"}, [{"type": "raw"}, {"type": ensure_test_serde()}]]

    def make_tier(self, tmp_path: Path, serde: Any = None, capacity_gb: float | None = None) -> L2Tier:
        config = self.adapter_config(tmp_path, capacity_gb)
        if serde is not None:
            config = {**config, "serde": serde}
        return create_l2_adapter(json.loads(json.dumps(config)))

    def make_adapter(self, tmp_path: Path, capacity_gb: float | None = None) -> L2Adapter:
        return create_backend(json.loads(json.dumps(self.adapter_config(tmp_path, capacity_gb))))

    # -- bytes contract -----------------------------------------------------------------------------------
    def test_lazy_start_and_config_round_trip(self, tmp_path: Path) -> None:
        adapter = self.make_adapter(tmp_path)
        assert not adapter.started, "an adapter must create no resources before its first operation"
        again = create_backend(json.loads(json.dumps(adapter.config)))
        assert adapter == again
        assert adapter.contains(["x"]) == [False]
        assert _is_started(adapter), "the first operation starts the adapter"
        adapter.close()
        again.close()

    def test_records_round_trip_scatter_gather(self, tmp_path: Path) -> None:
        with self.make_adapter(tmp_path) as adapter:
            recs = {f"k{i}": bytes(range(i, i + 100)) * (i + 1) for i in range(5)}
            adapter.store_records(list(recs), [[v[:7], v[7:]] for v in recs.values()])
            assert adapter.contains([*recs, "nope"]) == [True] * 5 + [False]
            for key, value in recs.items():
                head, rest = bytearray(10), bytearray(len(value) - 10)
                assert adapter.load_records([key], [[head, rest]]) == [len(value)]
                assert bytes(head + rest) == value
            assert adapter.read_heads(["k1", "nope"], 5) == [recs["k1"][:5], None]
            small = bytearray(3)
            assert adapter.load_records(["k4"], [[small]]) == [len(recs["k4"])], "a record too large reports its size"

    def test_missing_keys_are_misses(self, tmp_path: Path) -> None:
        with self.make_adapter(tmp_path) as adapter:
            assert adapter.load_records(["a", "b"], [[bytearray(4)], [bytearray(4)]]) == [MISS, MISS]
            assert adapter.contains(["a"]) == [False]
            adapter.delete(["a"])  # absent keys are ignored
            adapter.will_load(["a", "b"])  # a read-ahead hint for absent keys is not an error
            assert adapter.load_records([], []) == []

    def test_overwrite_and_delete(self, tmp_path: Path) -> None:
        with self.make_adapter(tmp_path) as adapter:
            adapter.store_records(["k"], [[b"first-version"]])
            adapter.store_records(["k"], [[b"second"]])
            buf = bytearray(6)
            assert adapter.load_records(["k"], [[buf]]) == [6] and bytes(buf) == b"second"
            assert adapter.used_bytes == 6
            adapter.delete(["k"])
            assert adapter.contains(["k"]) == [False]
            assert adapter.used_bytes == 0

    def test_capacity_accounting(self, tmp_path: Path) -> None:
        with self.make_adapter(tmp_path) as adapter:
            before = adapter.used_bytes
            adapter.store_records(["a", "b"], [[bytes(1000)], [bytes(3000)]])
            assert adapter.used_bytes == before + 4000
            adapter.delete(["a"])
            assert adapter.used_bytes == before + 3000

    def test_capacity_bound_under_sustained_writes(self, tmp_path: Path) -> None:
        if not self.bounded:
            pytest.skip("adapter is unbounded")
        capacity_gb = 64 * 1024 / (1 << 30)  # 64 KiB
        with self.make_adapter(tmp_path, capacity_gb) as adapter:
            cap = adapter.capacity_bytes
            assert cap is not None and 60_000 <= cap <= 70_000
            for i in range(60):
                adapter.store_records([f"k{i}", f"j{i}"], [[bytes([i % 256]) * 5000], [bytes(2000)]])
                assert adapter.used_bytes <= cap
            assert adapter.contains(["k59", "j59"]) == [True, True], "the newest records must survive eviction"
            assert adapter.contains(["k0"]) == [False], "the oldest records must have been evicted"
            with pytest.raises(CapacityError):
                adapter.store_records(["small", "huge"], [[b"x"], [bytes(cap + 1)]])
            assert adapter.contains(["small", "huge"]) == [False, False], "a failed batch leaves nothing visible"

    def test_close_is_idempotent_and_final(self, tmp_path: Path) -> None:
        adapter = self.make_adapter(tmp_path)
        adapter.store_records(["k"], [[b"v"]])
        adapter.close()
        adapter.close()
        with pytest.raises(RuntimeError, match="closed"):
            adapter.contains(["k"])

    def test_concurrent_batches(self, tmp_path: Path) -> None:
        with self.make_adapter(tmp_path) as adapter:
            errors: list[BaseException] = []

            def work(t: int) -> None:
                try:
                    for i in range(20):
                        key = f"t{t}-{i}"
                        value = f"{key}:".encode() * 50
                        adapter.store_records([key], [[value]])
                        buf = bytearray(len(value))
                        if adapter.load_records([key], [[buf]]) != [len(value)] or bytes(buf) != value:
                            raise AssertionError(f"bad read of {key}")
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert not errors, errors

    # -- the shared serde + record layer on this adapter ----------------------------------------------------
    def test_tensor_round_trip_through_each_serde(self, tmp_path: Path) -> None:
        for serde in self.serde_configs():
            tier = self.make_tier(tmp_path / str(abs(hash(json.dumps(serde)))), serde)
            try:
                ks = keys(4)
                src = [chunk(i) for i in range(3)] + [kv_like((7, 5), torch.float32, seed=9)]
                tier.store(ks, src)
                outs = [torch.empty_like(s) for s in src]
                assert tier.load_into([*ks, *keys(1, start=50)], [*outs, torch.empty_like(src[0])]) == [
                    True,
                    True,
                    True,
                    True,
                    False,
                ]
                for s, o in zip(src, outs, strict=True):
                    assert torch.equal(s.view(torch.uint8), o.view(torch.uint8)), f"serde {serde}"
                assert tier.layouts(ks[:1]) == [layout_of(src[0])]
                assert tier.stats()["integrity_misses"] == 0
            finally:
                tier.close()

    def _cases(self, tier: L2Tier, key: ObjectKey, good: torch.Tensor) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """Records to put under ``key``: physically damaged ones, and intact ones that are not ``tier``'s."""
        name = key.to_str()
        meta = RecordMeta(tier.identity, layout_of(good), name)
        record = pack_record(meta, byte_view(good.clone()))
        flipped = bytearray(record)
        flipped[len(record) - 10] ^= 1
        header_flip = bytearray(record)
        header_flip[48 + 8 + 6] ^= 0x40  # a high bit of a shape field: the header contradicts the length
        damaged = {
            "flipped payload bit": bytes(flipped),
            "flipped shape bit": bytes(header_flip),
            "truncated": record[:-1],
            "padded": record + b"\0",
            "not a record": b"hello world" * 10,
            "empty": b"",
        }
        foreign = {
            "foreign serde": pack_record(
                RecordMeta(SerdeIdentity("other", bytes(16)), meta.layout, name), record[-100:]
            ),
            "another key's record": pack_record(
                RecordMeta(tier.identity, meta.layout, keys(1, start=7)[0].to_str()), record[-100:]
            ),
        }
        return damaged, foreign

    def test_damaged_records_are_removed_foreign_ones_kept(self, tmp_path: Path) -> None:
        for serde in (None, [{"type": "raw"}, {"type": ensure_test_serde()}]):
            with self.make_tier(tmp_path / str(serde is None), serde) as tier:
                good = chunk(1)
                (key,) = keys(1)
                damaged, foreign = self._cases(tier, key, good)
                for what, data in {**damaged, **foreign}.items():
                    _replace(tier.adapter, key.to_str(), data)
                    assert tier.lookup([key]) == [False] or what in damaged, f"{what}: not a hit for lookup()"
                    out = torch.zeros_like(good)
                    assert tier.load_into([key], [out]) == [False], what
                    kept = tier.contains([key]) == [True]
                    assert kept == (what in foreign), f"{what}: damaged is removed, foreign is left in place"
                stats = tier.stats()
                assert stats["integrity_misses"] == len(damaged) and stats["foreign_misses"] == len(foreign)

    def test_mixed_batch_hits_misses_damaged_and_foreign(self, tmp_path: Path) -> None:
        """One batch spanning several pipelined rounds: every hit exact, nothing raised, damaged removed, foreign
        kept, with damage both before the call and between the lookup and the load."""
        for serde in self.serde_configs():
            self._check_mixed_batch(tmp_path / str(abs(hash(json.dumps(serde)))), serde)

    def _check_mixed_batch(self, path: Path, serde: Any) -> None:
        config = {"type": "faulty", "inner": self.adapter_config(path)}
        if serde is not None:
            config["serde"] = serde
        with create_l2_adapter(json.loads(json.dumps(config))) as tier:
            ks = keys(14)
            src = [chunk(i) for i in range(14)]
            tier.store(ks, src)
            assert tier.lookup(ks) == [True] * 14
            bad = {1: "flipped payload bit", 5: "truncated", 9: "flipped shape bit"}
            strange = {2: "foreign serde", 10: "another key's record"}
            for i, what in {**bad, **strange}.items():
                damaged, foreign = self._cases(tier, ks[i], src[i])
                _replace(tier.adapter, ks[i].to_str(), {**damaged, **foreign}[what])
            tier.delete([ks[3]])  # a miss
            late = {6: "removed", 7: "flipped payload bit", 12: "foreign serde"}

            def between(inner: L2Adapter, batch: Any) -> None:  # after the caller's lookup, before the read
                for i, what in late.items():
                    if ks[i].to_str() not in batch:
                        continue
                    if what == "removed":
                        inner.delete([ks[i].to_str()])
                    else:
                        damaged, foreign = self._cases(tier, ks[i], src[i])
                        _replace(inner, ks[i].to_str(), {**damaged, **foreign}[what])

            faulty = tier.adapter
            assert isinstance(faulty, FaultyAdapter)
            faulty.before_load = between
            outs = [torch.zeros_like(s) for s in src]
            hits = tier.load_into(ks, outs)
            faulty.before_load = None
            misses = {3, *bad, *strange, *late}
            assert hits == [i not in misses for i in range(14)], serde
            for i in range(14):
                if hits[i]:
                    assert torch.equal(outs[i].view(torch.uint8), src[i].view(torch.uint8)), f"{serde}: key {i}"
            present = tier.contains(ks)
            for i in {*bad, 7}:
                assert not present[i], f"{serde}: damaged record {i} is removed"
            for i in {*strange, 12}:
                assert present[i], f"{serde}: foreign record {i} is left in place"

    def test_restore_at_full_capacity_evicts_nothing_else(self, tmp_path: Path) -> None:
        if not self.bounded:
            pytest.skip("adapter is unbounded")
        with self.make_adapter(tmp_path, 64 * 1024 / (1 << 30)) as adapter:
            cap = adapter.capacity_bytes
            assert cap is not None
            adapter.store_records(["b"], [[bytes(cap - cap // 2)]])
            adapter.store_records(["a"], [[bytes(cap // 2)]])
            assert adapter.used_bytes <= cap
            for _ in range(3):  # the same key again and again, at full capacity
                adapter.store_records(["a"], [[b"\1" * (cap // 2)]])
                assert adapter.contains(["a", "b"]) == [True, True], "re-storing a key evicts no other record"
                assert adapter.used_bytes <= cap

    def test_load_records_with_reads_header_first(self, tmp_path: Path) -> None:
        with self.make_adapter(tmp_path) as adapter:
            recs = {"small": b"0123456789", "big": bytes(range(256)) * 40, "skip": b"x" * 5000}
            adapter.store_records(list(recs), [[v] for v in recs.values()])
            got: dict[str, bytearray] = {}
            names = [*recs, "absent"]

            def prepare(i: int, head: memoryview, length: int) -> Any:
                name = names[i]
                assert length == len(recs[name]) and bytes(head) == recs[name][:64]
                if name == "skip":
                    return None
                got[name] = bytearray(length)
                return [memoryview(got[name])[:3], memoryview(got[name])[3:]]

            lengths = adapter.load_records_with(names, 64, prepare)
            assert lengths == [len(v) for v in recs.values()] + [MISS]
            assert {k: bytes(v) for k, v in got.items()} == {"small": recs["small"], "big": recs["big"]}

    def test_failed_serde_batch_leaves_nothing(self, tmp_path: Path) -> None:
        tier = self.make_tier(tmp_path, [{"type": "raw"}, {"type": ensure_test_serde()}])
        with tier:
            ks = keys(5)
            src = [chunk(i) for i in range(5)]
            poisoned = torch.frombuffer(bytearray(b"FAIL" + bytes(60)), dtype=torch.uint8)
            with pytest.raises(BatchError):
                tier.store(ks, [*src[:4], poisoned])
            assert tier.contains(ks) == [False] * 5, "a failed batch must leave none of its keys"
            assert tier.stats()["store_failures"] == 5

    def test_oversized_item_fails_the_whole_batch(self, tmp_path: Path) -> None:
        if not self.bounded:
            pytest.skip("adapter is unbounded")
        with self.make_tier(tmp_path, capacity_gb=64 * 1024 / (1 << 30)) as tier:
            ks = keys(2)
            with pytest.raises(CapacityError):
                tier.store(ks, [chunk(0, tokens=2), torch.zeros(100_000, dtype=torch.uint8)])
            assert tier.contains(ks) == [False, False]

    # -- enumeration and purge ----------------------------------------------------------------------------------
    #: models whose names stress every mapping (path separators, characters quoted in key strings, a leading dot
    #: that an object name cannot start a segment with, a model named like another's prefix)
    PURGE_MODELS: ClassVar[tuple[str, ...]] = ("org/model", "org", "m+1:x.y_z-w", ".hidden", "_")
    PURGE_SALTS: ClassVar[tuple[str, ...]] = ("", "tenant-a", "tenant-b")

    def _fill_for_purge(self, adapter: L2Adapter) -> dict[str, ObjectKey]:
        held: dict[str, ObjectKey] = {}
        for m, model in enumerate(self.PURGE_MODELS):
            for s, salt in enumerate(self.PURGE_SALTS):
                for rank in (0, 1):
                    key = ObjectKey(model, format(0xA000 + 16 * m + 4 * s + rank, "x"), rank, salt)
                    held[key.to_str()] = key
        names = list(held)
        adapter.store_records(names, [[f"record {n}".encode()] for n in names])
        adapter.store_records(["not-a-kvtier-key"], [[b"foreign"]])  # never selected by a purge
        return held

    def _listed(self, adapter: L2Adapter, match: KeyMatch) -> set[str]:
        return {k for batch in adapter.list_keys(match, batch_size=3) for k in batch}

    def test_list_keys_selects_by_model_and_salt(self, tmp_path: Path) -> None:
        with self.make_adapter(tmp_path) as adapter:
            held = self._fill_for_purge(adapter)
            for model in (*self.PURGE_MODELS, None):
                for salt in (*self.PURGE_SALTS, None):
                    match = KeyMatch(model, None if salt is None else salt_digest(salt))
                    want = {
                        name
                        for name, key in held.items()
                        if (model is None or key.model_name == model) and (salt is None or key.cache_salt == salt)
                    }
                    assert self._listed(adapter, match) == want, match
            assert all(len(b) <= 3 for b in adapter.list_keys(KeyMatch(), batch_size=3)), "batches are bounded"

    def test_purge_by_model_by_salt_and_both(self, tmp_path: Path) -> None:
        with self.make_adapter(tmp_path) as adapter:
            held = self._fill_for_purge(adapter)
            progress: list[int] = []
            reported: set[str] = set()

            def report(n: int, batch: list[str]) -> None:
                progress.append(n)
                reported.update(batch)

            n = adapter.purge(KeyMatch("org", None), batch_size=2, progress=report)
            gone = {name for name, key in held.items() if key.model_name == "org"}
            assert n >= len(gone) and progress and progress[-1] == n and progress == sorted(progress)
            assert reported == gone, "each batch's keys are reported"
            n = adapter.purge(KeyMatch(None, salt_digest("tenant-a")), batch_size=2)
            gone |= {name for name, key in held.items() if key.cache_salt == "tenant-a"}
            adapter.purge(KeyMatch(".hidden", ""))
            gone |= {name for name, key in held.items() if key.model_name == ".hidden" and not key.cache_salt}
            names = list(held)
            assert dict(zip(names, adapter.contains(names), strict=True)) == {k: k not in gone for k in names}
            assert adapter.contains(["not-a-kvtier-key"]) == [True], "a purge removes only kvtier's records"
            assert self._listed(adapter, KeyMatch()) == set(held) - gone
            adapter.purge(KeyMatch())
            assert adapter.contains(names) == [False] * len(names)
            assert self._listed(adapter, KeyMatch()) == set()
            assert adapter.contains(["not-a-kvtier-key"]) == [True]
            assert adapter.purge(KeyMatch("org/model")) == 0, "purging nothing is no error"

    def test_purge_then_store_again(self, tmp_path: Path) -> None:
        with self.make_tier(tmp_path) as tier:
            ks = keys(3, salt="s")
            tier.store(ks, [chunk(i) for i in range(3)])
            tier.adapter.purge(KeyMatch("org/model", salt_digest("s")))
            assert tier.lookup(ks) == [False] * 3
            tier.store(ks[:1], [chunk(7)])
            got = tier.load(ks[:1], lambda i, layout: torch.empty(layout.shape, dtype=layout.dtype))
            assert got[0] is not None and torch.equal(got[0], chunk(7))
            if self.bounded or tier.adapter.used_bytes:
                assert tier.adapter.used_bytes > 0
