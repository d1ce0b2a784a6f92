"""Property: whatever happens to stored records, a Store serves each key its own KV or a miss, and never raises.

Records are mutated (bit flips anywhere, truncation, appended bytes, swapped records, records of another key,
shape, serde or salt, and for the authenticated pipeline relabels with the unkeyed checksum recomputed), both before
the call and between the lookup and the load (the fault-injecting adapter's ``before_load``), in batches spanning
four pipelined rounds (8 keys, ``max_workers`` 1: rounds of 2), through a Store with raw, fp8 and
``[fp8, zstd, aesgcm]``. Wrong = differs bit-wise from what the unmutated record decodes to.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier import ObjectKey, Store
from kvtier.l2.adapters import FaultyAdapter, L2Adapter, MemoryAdapter
from kvtier.l2.record import RecordMeta, pack_record, read_record
from kvtier.serde import registered_serdes
from kvtier.testing.serde import kv_like

os.environ.setdefault("KVTIER_PROPERTY_KEY", "0f1e2d3c4b5a69788796a5b4c3d2e1f0" * 2)
AES = {"type": "aesgcm", "key_env": "KVTIER_PROPERTY_KEY"}
SERDES: dict[str, Any] = {"raw": {"type": "raw"}, "fp8": {"type": "fp8"}, "fp8+zstd+aesgcm": [
    {"type": "fp8"},
    {"type": "zstd", "level": 1},
    AES,
]}  # fmt: skip
OTHER_SERDE: dict[str, Any] = {"raw": [{"type": "raw"}, {"type": "lz4"}], "fp8": {"type": "raw"}, "fp8+zstd+aesgcm": [
    {"type": "fp8"},
    {"type": "zstd", "level": 1},
]}  # fmt: skip
N_KEYS = 8  # > 6 x max_workers (1): four pipelined rounds of 2
SALT = "tenant/ü+secret=="
EXAMPLES = 110  # x 3 pipelines x ~7 mutated keys: over 2,000 mutated reads per run
MUTATIONS = [
    "none",
    "flip",
    "truncate",
    "append",
    "swap",
    "other_key",
    "other_shape",
    "other_serde",
    "other_salt",
    "relabel",  # only where a stage authenticates: without a key, a relabelled record is indistinguishable
    "remove",
]


def _keys(salt: str = SALT) -> list[ObjectKey]:
    return [ObjectKey("org/model", format(0xA00 + i, "x"), cache_salt=salt) for i in range(N_KEYS)]


def _chunk(i: int, tokens: int = 8) -> torch.Tensor:
    return kv_like((2, 2, tokens, 64), torch.bfloat16, seed=i)


def _records(serde: Any, keys: list[ObjectKey], tensors: list[torch.Tensor]) -> dict[str, tuple[bytes, torch.Tensor]]:
    """The records a memory tier with ``serde`` writes for ``keys`` and what each decodes to, by key string."""
    with Store(l1_size_gb=1 / 64, l2_adapters=[{"type": "memory", "serde": serde}]) as store:
        store.store(keys, tensors)
        store.flush()
        inner = store._tiers[0].adapter
        assert isinstance(inner, MemoryAdapter)
        store.clear_l1()
        decoded = store.retrieve(keys)
        out = {}
        for k, d in zip(keys, decoded, strict=True):
            record = inner.raw_record(k.to_str())
            assert record is not None and d is not None
            out[k.to_str()] = (record, d)
        return out


def _relabel(record: bytes, key: str) -> bytes:
    """Another record moved under ``key``: header rewritten, the (unkeyed) checksum recomputed: an attacker
    with write access to the store and no key."""
    meta, payload = read_record(record)
    return pack_record(RecordMeta(meta.serde, meta.layout, key), payload)


@pytest.mark.parametrize("name", list(SERDES))
def test_mutated_records_are_never_wrong_kv(name: str) -> None:
    serde = SERDES[name]
    if "fp8" in name and "fp8" not in registered_serdes():
        pytest.skip("fp8 is not registered")
    keys = _keys()
    strs = [k.to_str() for k in keys]
    src = [_chunk(i) for i in range(N_KEYS)]
    config = {"type": "faulty", "inner": {"type": "memory"}, "serde": serde}
    store = Store(l1_size_gb=1 / 64, l2_adapters=[config])
    try:
        store.store(keys, src)
        store.flush()
        faulty = store._tiers[0].adapter
        assert isinstance(faulty, FaultyAdapter)
        inner = faulty.inner
        assert isinstance(inner, MemoryAdapter)
        original = {s: inner.raw_record(s) or b"" for s in strs}
        store.clear_l1()
        expected = store.retrieve(keys)  # what each unmutated record decodes to (fp8 is lossy)
        assert all(e is not None for e in expected)
        aliens = {
            "other_key": _records(serde, [ObjectKey("org/model", "beef", cache_salt=SALT)], src[:1]),
            "other_shape": _records(serde, keys, [_chunk(i, tokens=16) for i in range(N_KEYS)]),
            "other_serde": _records(OTHER_SERDE[name], keys, src),
            "other_salt": _records(serde, _keys("another tenant"), src),
        }
        counted = {"mutated reads": 0}

        def mutate(adapter: L2Adapter, plan: list[tuple[str, int, int]], i: int) -> None:
            """Put mutation ``plan[i]`` of key ``i``'s record in place (through ``adapter``)."""
            kind, a, b = plan[i]
            key = strs[i]
            record = original[key]
            if kind == "none":
                data = record
            elif kind == "flip":
                data = bytearray(record)
                data[a % len(data)] ^= 1 << (b % 8)
                data = bytes(data)
            elif kind == "truncate":
                data = record[: a % len(record)]
            elif kind == "append":
                data = record + bytes([b % 256]) * (1 + a % 70)
            elif kind == "swap":
                data = original[strs[(i + 1 + a % (N_KEYS - 1)) % N_KEYS]]
            elif kind == "other_key":
                data = next(iter(aliens["other_key"].values()))[0]
            elif kind in ("other_shape", "other_serde"):
                data = aliens[kind][key][0]
            elif kind == "other_salt":
                data = aliens["other_salt"][_keys("another tenant")[i].to_str()][0]
            elif kind == "relabel":
                donor = (i + 1 + a % (N_KEYS - 1)) % N_KEYS
                data = _relabel(original[strs[donor]], key)
            else:  # remove
                adapter.delete([key])
                return
            adapter.store_records([key], [[data]])

        kinds = [m for m in MUTATIONS if m != "relabel" or "aesgcm" in name]
        plans = st.lists(
            st.tuples(st.sampled_from(kinds), st.integers(0, 1 << 20), st.integers(0, 255)),
            min_size=N_KEYS,
            max_size=N_KEYS,
        )

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            database=None,
        )
        @given(plan=plans, when=st.lists(st.booleans(), min_size=N_KEYS, max_size=N_KEYS))
        def check(plan: list[tuple[str, int, int]], when: list[bool]) -> None:
            inner.store_records(strs, [[original[s]] for s in strs])  # every record whole again
            for i in range(N_KEYS):
                if not when[i]:
                    mutate(inner, plan, i)  # before the call

            def late(adapter: L2Adapter, batch: Any) -> None:
                for i in range(N_KEYS):
                    if when[i] and strs[i] in batch:
                        mutate(adapter, plan, i)

            faulty.before_load = late  # between the lookup and the load
            store.clear_l1()
            store.lookup(keys)
            got = store.retrieve(keys)
            faulty.before_load = None
            for i, (g, e) in enumerate(zip(got, expected, strict=True)):
                assert e is not None
                if plan[i][0] != "none":
                    counted["mutated reads"] += 1
                if g is None:
                    continue
                if plan[i][0] == "other_shape" and g.shape != e.shape:
                    # a whole record of this key, only of another shape: its own KV, or nothing, is right
                    e = aliens["other_shape"][strs[i]][1]
                assert g.shape == e.shape and torch.equal(g.view(torch.uint8), e.view(torch.uint8)), (name, i, plan[i])

        check()
        assert counted["mutated reads"] >= 2000 // len(SERDES)
        stats = store.stats()
        assert stats["l2_errors"] == 0, "no mutation may look like a backend failure"
    finally:
        store.close()
