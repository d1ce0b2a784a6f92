"""The L2 adapter contract: registry, the memory and faulty adapters through the conformance suite, the
shared serde + record layer's failure handling."""

import errno
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier import BatchError, ConfigError, Store
from kvtier.errors import L2Error
from kvtier.l2.adapters import (
    FaultyAdapter,
    L2Adapter,
    MemoryAdapter,
    create_l2_adapter,
    register_l2_adapter,
    registered_l2_adapters,
    unregister_l2_adapter,
)
from kvtier.l2.adapters.registry import L2_ADAPTERS
from kvtier.testing import L2AdapterTests
from kvtier.testing.adapters import chunk, ensure_test_serde, keys

ensure_test_serde()


class TestMemoryAdapter(L2AdapterTests):
    def adapter_config(self, tmp_path: Path, capacity_gb: float | None = None) -> dict[str, Any]:
        return {"type": "memory", **({} if capacity_gb is None else {"max_capacity_gb": capacity_gb})}


class TestFaultyAdapterWithoutFaults(L2AdapterTests):
    """The fault wrapper with no fault set must behave exactly like the adapter it wraps."""

    def adapter_config(self, tmp_path: Path, capacity_gb: float | None = None) -> dict[str, Any]:
        inner = {"type": "memory", **({} if capacity_gb is None else {"max_capacity_gb": capacity_gb})}
        return {"type": "faulty", "inner": inner}


def test_registry_lists_and_rejects() -> None:
    assert {"memory", "faulty"} <= set(registered_l2_adapters())
    with pytest.raises(ConfigError, match=r"l2_adapter\.type: unknown L2 adapter 'nope'.*memory"):
        create_l2_adapter({"type": "nope"})
    with pytest.raises(ConfigError, match=r"l2_adapter\.type: required"):
        create_l2_adapter({})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['max_capacity_bg'\]"):
        create_l2_adapter({"type": "memory", "max_capacity_bg": 1})
    with pytest.raises(ConfigError, match=r"max_capacity_gb: expected a number"):
        create_l2_adapter({"type": "memory", "max_capacity_gb": "1"})
    with pytest.raises(ConfigError, match=r"l2_adapters\[1\]\.serde\.type: unknown serde 'nope'"):
        create_l2_adapter({"type": "memory", "serde": {"type": "nope"}}, "l2_adapters[1]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        create_l2_adapter([{"type": "memory"}])
    with pytest.raises(ConfigError, match="already registered"):
        register_l2_adapter("memory", lambda c, w: MemoryAdapter())


def test_a_user_adapter_registers_by_name() -> None:
    class Mine(MemoryAdapter):
        pass

    register_l2_adapter("mine-test", lambda config, where: Mine())
    try:
        tier = create_l2_adapter({"type": "mine-test", "serde": {"type": "raw"}})
        assert isinstance(tier.adapter, Mine) and tier.adapter.type_name == "mine-test"
        assert tier.config == {"type": "mine-test", "serde": {"type": "raw"}}
        assert json.loads(json.dumps(tier.config)) == tier.config
    finally:
        unregister_l2_adapter("mine-test")


def test_no_serde_pays_nothing_and_serde_is_lazy() -> None:
    plain = create_l2_adapter({"type": "memory"})
    assert plain.serde is None
    plain.store(keys(2), [chunk(0), chunk(1)])
    assert plain.stats()["scratch_bytes"] == 0
    with_serde = create_l2_adapter({"type": "memory", "serde": [{"type": "raw"}, {"type": "kvtier-test-xor"}]})
    assert with_serde.serde is not None and not with_serde.serde.started
    with_serde.store(keys(2), [chunk(0), chunk(1)])
    assert with_serde.stats()["scratch_bytes"] > 0  # counted, and reused by the next batch:
    held = with_serde.stats()["scratch_bytes"]
    with_serde.store(keys(2, start=5), [chunk(2), chunk(3)])
    assert with_serde.stats()["scratch_bytes"] == held


def _faulty(serde: Any = None) -> tuple[Any, FaultyAdapter]:
    config: dict[str, Any] = {"type": "faulty", "inner": {"type": "memory"}}
    if serde is not None:
        config["serde"] = serde
    tier = create_l2_adapter(config)
    assert isinstance(tier.adapter, FaultyAdapter)
    return tier, tier.adapter


@pytest.mark.parametrize("serde", [None, [{"type": "raw"}, {"type": "kvtier-test-xor", "max_workers": 2}]])
def test_disk_full_fails_the_batch_and_loads_keep_working(serde: Any) -> None:
    tier, faulty = _faulty(serde)
    old = keys(2)
    tier.store(old, [chunk(0), chunk(1)])
    faulty.store_error = OSError(errno.ENOSPC, "No space left on device")
    new = keys(6, start=10)
    with pytest.raises(OSError, match="No space"):
        tier.store(new, [chunk(i) for i in range(6)])
    assert tier.contains(new) == [False] * 6
    outs = [torch.empty_like(chunk(0)) for _ in old]
    assert tier.load_into(old, outs) == [True, True]
    assert torch.equal(outs[1], chunk(1))


def test_failure_mid_batch_in_a_later_serde_round_removes_earlier_rounds() -> None:
    # max_workers=1 -> rounds of 2 items: the first round lands, the second fails; the first must be removed.
    tier, faulty = _faulty([{"type": "raw"}, {"type": "kvtier-test-xor"}])
    ks = keys(4)
    calls = 0
    inner_store = faulty._store

    def fail_second(k: Any, r: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.EIO, "injected")
        inner_store(k, r)

    faulty._store = fail_second  # type: ignore[method-assign]
    with pytest.raises(OSError):
        tier.store(ks, [chunk(i) for i in range(4)])
    assert calls == 2
    assert tier.contains(ks) == [False] * 4


def test_fail_store_after_keeps_the_all_or_nothing_promise() -> None:
    tier, faulty = _faulty()
    faulty.fail_store_after = 1
    with pytest.raises(OSError):
        tier.store(keys(3), [chunk(i) for i in range(3)])
    assert tier.contains(keys(3)) == [False] * 3


@pytest.mark.parametrize("serde", [None, {"type": "raw"}, [{"type": "raw"}, {"type": "kvtier-test-xor"}]])
def test_damage_on_the_way_back_is_a_miss_and_removes_the_record(serde: Any) -> None:
    tier, faulty = _faulty(serde)
    ks = keys(2)
    tier.store(ks, [chunk(0), chunk(1)])
    faulty.corrupt_loads = True
    outs = [torch.empty_like(chunk(0)) for _ in ks]
    assert tier.load_into(ks, outs) == [False, False]
    faulty.corrupt_loads = False
    assert tier.contains(ks) == [False, False]
    assert tier.stats()["integrity_misses"] == 2


@pytest.mark.parametrize("serde", [None, [{"type": "raw"}, {"type": "kvtier-test-xor"}]])
def test_load_error_propagates_and_the_tier_keeps_working(serde: Any) -> None:
    tier, faulty = _faulty(serde)
    ks = keys(5)
    tier.store(ks, [chunk(i) for i in range(5)])
    faulty.load_error = OSError(errno.EIO, "I/O error")
    outs = [torch.empty_like(chunk(0)) for _ in ks]
    with pytest.raises(OSError):
        tier.load_into(ks, outs)
    faulty.load_error = None
    assert tier.load_into(ks, outs) == [True] * 5
    assert all(torch.equal(o, chunk(i)) for i, o in enumerate(outs))


def test_batch_error_is_a_runtime_error() -> None:
    assert issubclass(BatchError, RuntimeError)
    assert issubclass(FaultyAdapter, L2Adapter)


class TestFSAdapter(L2AdapterTests):
    def adapter_config(self, tmp_path: Path, capacity_gb: float | None = None) -> dict[str, Any]:
        extra = {} if capacity_gb is None else {"max_capacity_gb": capacity_gb}
        return {"type": "fs", "base_path": str(tmp_path / "l2"), "durability": "none", **extra}


def test_a_load_error_mid_pipeline_waits_for_running_decodes() -> None:
    # rounds of 2 items: round 0 is read and handed to the serde's thread, round 1's read fails
    tier, faulty = _faulty([{"type": "raw"}, {"type": "kvtier-test-xor"}])
    ks = keys(4)
    tier.store(ks, [chunk(i) for i in range(4)])
    inner_load = faulty._load_with
    calls = 0

    def fail_second(k: Any, h: int, p: Any) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.EIO, "injected")
        return inner_load(k, h, p)

    faulty._load_with = fail_second  # type: ignore[method-assign]
    outs = [torch.empty_like(chunk(0)) for _ in ks]
    with pytest.raises(L2Error):
        tier.load_into(ks, outs)
    assert calls == 2
    faulty._load_with = inner_load  # type: ignore[method-assign]
    assert tier.load_into(ks, outs) == [True] * 4
    assert all(torch.equal(o, chunk(i)) for i, o in enumerate(outs))


def test_max_workers_does_not_change_the_record_identity() -> None:
    one = create_l2_adapter({"type": "memory", "serde": [{"type": "raw"}, {"type": "kvtier-test-xor"}]})
    two = create_l2_adapter(
        {"type": "memory", "serde": [{"type": "raw", "max_workers": 2}, {"type": "kvtier-test-xor"}]}
    )
    assert one.identity == two.identity
    two.adapter = one.adapter  # same records, read with another thread count
    one.store(keys(1), [chunk(0)])
    out = torch.empty_like(chunk(0))
    assert two.load_into(keys(1), [out]) == [True] and torch.equal(out, chunk(0))
    other = create_l2_adapter({"type": "memory", "serde": {"type": "raw"}})
    assert other.identity != one.identity


def test_third_party_adapter_from_an_entry_point(tmp_path: Path) -> None:
    """An adapter installed in the environment (entry-point group ``kvtier.l2_adapter``) is found by name, so a
    Store (and ``kvtier server``) built from a config uses it; it is imported only when a config names it."""
    info = tmp_path / "kvtier_test_l2_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvtier-test-l2-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kvtier.l2_adapter]\nplugged = kvtier_plugin_l2:factory\n")
    (tmp_path / "kvtier_plugin_l2.py").write_text(
        "from kvtier.l2.adapters import MemoryAdapter\n\n\ndef factory(config, where):\n    return MemoryAdapter()\n"
    )
    sys.path.insert(0, str(tmp_path))
    L2_ADAPTERS.rescan()
    try:
        assert "plugged" in registered_l2_adapters()
        assert "kvtier_plugin_l2" not in sys.modules, "entry points are imported on first use only"
        with Store(l1_size_gb=1 / 1024, l2_adapters=[{"type": "plugged", "serde": {"type": "raw"}}]) as store:
            store.store(keys(1), [chunk(0)])
            store.flush()
            store.clear_l1()
            (got,) = store.retrieve(keys(1))
            assert got is not None and torch.equal(got, chunk(0))
            assert store.stats()["l2"][0]["type"] == "plugged"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("kvtier_plugin_l2", None)
        L2_ADAPTERS.unregister("plugged")
        L2_ADAPTERS.rescan()
