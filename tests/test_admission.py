"""L2 write admission: ``"admission": "second_hit"`` writes a chunk to a tier only once it was requested again
while in L1; ``always`` (the default) writes every stored chunk. Real fs tiers, a real server subprocess."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kvtier import ConfigError, ObjectKey, Store
from kvtier.cli import main as cli_main
from kvtier.client import Client
from kvtier.l2.adapters import FaultyAdapter, create_l2_adapter
from kvtier.server.process import ServerProcess, free_port
from kvtier.testing.adapters import chunk

MB = 1 / 1024  # in GiB: l1_size_gb=MB is one MiB
CHUNK = 16


def fs(path: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "fs", "base_path": str(path), "durability": "none", **extra}


def keys(n: int, first: int = 0, model: str = "m") -> list[ObjectKey]:
    return [ObjectKey(model, format(0xA000 + i, "x")) for i in range(first, first + n)]


def on_disk(path: Path, ks: list[ObjectKey]) -> list[bool]:
    """Which keys a fresh fs tier over ``path`` holds (the records a Store wrote there, nothing cached)."""
    with create_l2_adapter(fs(path)) as tier:
        return tier.contains(ks)


def tier_stats(store: Store, i: int = 0) -> dict[str, Any]:
    stats: dict[str, Any] = store.stats()["l2"][i]
    return stats


def test_one_shot_chunks_are_never_written(tmp_path: Path) -> None:
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path, admission="second_hit")]) as store:
        ks = keys(10)
        store.store(ks, [chunk(i) for i in range(10)])
        store.flush()
        stats = tier_stats(store)
        assert stats["admission"] == "second_hit"
        assert (stats["admission_skipped"], stats["admission_admitted"], stats["stored"]) == (10, 0, 0)
        assert store.stats()["l2_written"] == 0
        assert store.lookup(ks) == 10, "still served from L1"
        store.clear_l1()
        assert store.stats()["l1"]["used_bytes"] == 0, "nothing kept a pin for a write that never happened"
        # Evicted before a second request: never written; an L2 lookup or load of it is a miss.
        assert store.lookup(ks) == 0
        assert store.retrieve(ks) == [None] * 10
    assert on_disk(tmp_path, ks) == [False] * 10


def test_a_chunk_requested_again_is_written_once(tmp_path: Path) -> None:
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path, admission="second_hit")]) as store:
        ks = keys(4)
        data = [chunk(i) for i in range(4)]
        store.store(ks, data)
        got = store.retrieve(ks[:2])  # the second request of chunks 0 and 1, from L1
        assert all(g is not None and torch.equal(g, d) for g, d in zip(got, data, strict=False))
        outs = [torch.empty_like(data[2])]
        assert store.retrieve_into(ks[2:3], outs) == 1  # retrieve_into's hit admits too
        store.flush()
        stats = tier_stats(store)
        assert (stats["admission_skipped"], stats["admission_admitted"], stats["stored"]) == (4, 3, 3)
        store.retrieve(ks[:3])  # a third request: already written, nothing queued again
        store.flush()
        assert tier_stats(store)["stored"] == 3
        assert store._tiers[0].contains(ks) == [True, True, True, False]
        # Back from fs into L1, then hit again: that tier holds it, so it is not written to it once more.
        store.clear_l1()
        got = store.retrieve(ks)
        assert [g is not None for g in got] == [True, True, True, False]
        assert all(torch.equal(g, d) for g, d in zip(got[:3], data, strict=False) if g is not None)
        store.retrieve(ks[:3])
        store.flush()
        stats = tier_stats(store)
        assert (stats["admission_admitted"], stats["stored"]) == (3, 3)
        store.clear_l1()
        assert store.stats()["l1"]["used_bytes"] == 0, "every admitted write gave its pin back"


def test_a_key_twice_in_one_call_and_concurrent_hits_write_once(tmp_path: Path) -> None:
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path, admission="second_hit")]) as store:
        a, b = keys(2)
        store.store([a, b], [chunk(0), chunk(1)])
        got = store.retrieve([a, a, a])
        assert all(g is not None and torch.equal(g, chunk(0)) for g in got)
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []

        def hit() -> None:
            try:
                barrier.wait()
                for _ in range(20):
                    store.retrieve([b])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=hit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        store.flush()
        stats = tier_stats(store)
        assert (stats["admission_admitted"], stats["stored"]) == (2, 2)
        store.clear_l1()
        assert store.stats()["l1"]["used_bytes"] == 0


def test_concurrent_stores_hits_and_clears_of_the_same_keys(tmp_path: Path) -> None:
    """Threads re-store, retrieve and clear the same few keys: every chunk served is exact, every admitted write
    lands, and no pin is left behind."""
    tiers = [fs(tmp_path, admission="second_hit"), {"type": "memory"}]
    with Store(l1_size_gb=MB, l2_adapters=tiers, max_pending_l2_writes=4) as store:
        ks = keys(3)
        errors: list[BaseException] = []

        def work(seed: int) -> None:
            try:
                for n in range(40):
                    i = (seed + n) % 3
                    if n % 3 == 0:
                        store.store([ks[i]], [chunk(i)])
                    elif n % 11 == 0:
                        store.clear_l1()
                    else:
                        for k, got in zip(ks, store.retrieve(ks), strict=True):
                            assert got is None or torch.equal(got, chunk(ks.index(k)))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        store.flush()
        stats = tier_stats(store)
        # every queued admission was written, or superseded in the pipeline by a newer write of its key
        superseded = store.stats()["l2_writes_superseded"]
        assert 0 < stats["stored"] <= stats["admission_admitted"] <= stats["stored"] + superseded
        store.clear_l1()
        assert store.stats()["l1"]["used_bytes"] == 0


def test_always_tiers_are_written_at_store_second_hit_tiers_on_reuse(tmp_path: Path) -> None:
    """fs waits for a second hit, memory (always) gets every chunk. A chunk loaded from memory (fs missed it) is
    written to fs on its next hit: requested twice, so admitted, into the faster tier."""
    tiers = [fs(tmp_path, admission="second_hit"), {"type": "memory", "admission": "always"}]
    with Store(l1_size_gb=MB, l2_adapters=tiers) as store:
        ks = keys(3)
        store.store(ks, [chunk(i) for i in range(3)])
        store.flush()
        fs_stats, mem_stats = tier_stats(store, 0), tier_stats(store, 1)
        assert (fs_stats["stored"], mem_stats["stored"]) == (0, 3)
        assert (mem_stats["admission"], mem_stats["admission_skipped"]) == ("always", 0)
        store.clear_l1()
        assert all(g is not None for g in store.retrieve(ks[:1]))  # from memory into L1: the first request
        store.flush()
        assert tier_stats(store, 0)["stored"] == 0
        store.retrieve(ks[:1])  # the second, from L1
        store.flush()
        fs_stats, mem_stats = tier_stats(store, 0), tier_stats(store, 1)
        assert (fs_stats["stored"], fs_stats["admission_admitted"], mem_stats["stored"]) == (1, 1, 3)
    assert on_disk(tmp_path, ks) == [True, False, False]


def test_default_is_always(tmp_path: Path) -> None:
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path)]) as store:
        ks = keys(3)
        store.store(ks, [chunk(i) for i in range(3)])
        store.flush()
        stats = tier_stats(store)
        assert (stats["admission"], stats["admission_skipped"], stats["stored"]) == ("always", 0, 3)
    assert on_disk(tmp_path, ks) == [True] * 3


def test_an_admitted_write_that_cannot_be_queued_is_retried_by_the_next_hit(tmp_path: Path) -> None:
    gate = threading.Event()
    tiers = [{"type": "faulty", "inner": {"type": "memory"}, "admission": "second_hit"}]
    with Store(l1_size_gb=4 * MB, l2_adapters=tiers, max_pending_l2_writes=1) as store:
        faulty = store._tiers[0].adapter
        assert isinstance(faulty, FaultyAdapter)
        inner_store = faulty._store
        faulty._store = lambda k, r: (gate.wait(), inner_store(k, r))  # type: ignore[method-assign]
        ks = keys(3)
        store.store(ks, [chunk(i) for i in range(3)])
        store.retrieve(ks[:1])  # taken by the writer, which waits at the gate
        store.retrieve(ks[1:2])  # queued (the queue holds one)
        store.retrieve(ks[2:3])  # the queue is full: dropped, counted, not admitted
        stats = store.stats()
        assert stats["l2_writes_dropped"] >= 1
        dropped = stats["l2_writes_dropped"]
        assert tier_stats(store)["admission_admitted"] == 3 - dropped
        gate.set()
        store.flush()
        store.retrieve(ks)  # the next hit of the dropped ones queues them again
        store.flush()
        stats = tier_stats(store)
        assert (stats["admission_admitted"], stats["stored"]) == (3, 3)
        store.clear_l1()
        assert store.stats()["l1"]["used_bytes"] == 0


def test_a_failed_admitted_write_releases_its_pin(tmp_path: Path) -> None:
    tiers = [{"type": "faulty", "inner": {"type": "memory"}, "admission": "second_hit"}]
    with Store(l1_size_gb=MB, l2_adapters=tiers) as store:
        faulty = store._tiers[0].adapter
        assert isinstance(faulty, FaultyAdapter)
        faulty.store_error = OSError(28, "No space left on device")
        ks = keys(2)
        store.store(ks, [chunk(0), chunk(1)])
        store.retrieve(ks)
        store.flush()
        assert store.stats()["l2_write_failures"] == 2
        store.clear_l1()
        assert store.stats()["l1"]["used_bytes"] == 0


def test_an_enqueue_that_raises_leaks_no_pin_and_the_next_hit_admits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiers = [{"type": "memory", "admission": "second_hit"}, {"type": "memory", "admission": "second_hit"}]
    with Store(l1_size_gb=MB, l2_adapters=tiers) as store:
        ks = keys(3)
        store.store(ks, [chunk(i) for i in range(3)])
        store.retrieve(ks[:1])  # on both tiers: the writer thread runs
        real = store._writes.submit
        monkeypatch.setattr(store._writes, "submit", lambda write: (_ for _ in ()).throw(RuntimeError("no thread")))
        with pytest.raises(RuntimeError, match="no thread"):
            store.retrieve(ks)  # the hits of chunks 1 and 2: the enqueue raises
        monkeypatch.setattr(store._writes, "submit", real)
        assert [tier_stats(store, i)["admission_admitted"] for i in (0, 1)] == [1, 1]
        store.retrieve(ks)  # the next hit admits what the failed one could not
        store.flush()
        assert [tier_stats(store, i)["admission_admitted"] for i in (0, 1)] == [3, 3]
        assert [store._tiers[i].contains(ks) for i in (0, 1)] == [[True] * 3, [True] * 3]
        store.clear_l1()
        assert store.stats()["l1"]["used_bytes"] == 0, "the raising call released every pin it still held"


def test_an_enqueue_that_raises_leaves_later_tier_groups_for_the_next_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hits going to different sets of tiers are queued as separate writes; when the first raises, the ones never
    offered are not marked as held and the next hit writes them."""
    tiers = [{"type": "memory", "admission": "second_hit"}, {"type": "memory", "admission": "second_hit"}]
    with Store(l1_size_gb=MB, l2_adapters=tiers) as store:
        a, b = keys(2)
        store.store([a], [chunk(0)])
        store.retrieve([a])  # admitted to both tiers
        store.flush()
        store._tiers[1].delete([a])
        store.clear_l1()
        store.retrieve([a])  # loaded from tier 0 into L1: held by tier 0 only
        store.flush()  # the L1 copy of an L2 hit is made in the background
        store.store([b], [chunk(1)])  # held by none
        real = store._writes.submit
        monkeypatch.setattr(store._writes, "submit", lambda write: (_ for _ in ()).throw(RuntimeError("no room")))
        with pytest.raises(RuntimeError, match="no room"):
            store.retrieve([a, b])  # two writes: a to tier 1, b to both; the first raises
        monkeypatch.setattr(store._writes, "submit", real)
        store.retrieve([a, b])
        store.flush()
        assert [store._tiers[i].contains([a, b]) for i in (0, 1)] == [[True, True], [True, True]]
        store.clear_l1()
        assert store.stats()["l1"]["used_bytes"] == 0


@pytest.mark.parametrize("value", ["sometimes", "Second_Hit", 2, None, ["always"]])
def test_config_errors_name_the_field(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ConfigError, match=r"l2_adapters\[1\]\.admission: expected one of \['always', 'second_hit'\]"):
        Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path / "a"), fs(tmp_path / "b", admission=value)])


def test_server_config_error_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = json.dumps(fs(tmp_path, admission="third_hit"))
    argv = ["server", "--l1-size-gb", "0.0625", "--port", str(free_port()), "--http-port", str(free_port())]
    assert cli_main([*argv, "--l2-adapter", adapter]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvtier: error: l2_adapters[0].admission: expected one of"), err
    assert "third_hit" in err


def test_server_second_hit_writes_no_one_shot_chunk(tmp_path: Path) -> None:
    """Through a real server: one-shot prompts leave the fs tier empty; reused prefixes are written once; the
    counters reach /stats and /metrics; the drain at SIGTERM writes nothing more."""
    base = tmp_path / "l2"
    l2 = json.dumps(fs(base, admission="second_hit"))
    args = ["--l1-size-gb", "0.0625", "--chunk-size", str(CHUNK), "--l2-adapter", l2, "--log-level", "warning"]
    one_shot = keys(12, model="test/admission")
    reused = keys(4, first=100, model="test/admission")
    data = {k: chunk(i, CHUNK) for i, k in enumerate(one_shot + reused)}
    with ServerProcess(args) as server, Client(server.address, timeout_s=20) as client:
        for k in one_shot + reused:
            client.store([k], [data[k]])
        got = client.retrieve(reused)  # the second request of the reused chunks
        assert all(g is not None and torch.equal(g, data[k]) for g, k in zip(got, reused, strict=True))
        outs = [torch.empty_like(data[k]) for k in reused]
        assert client.retrieve_into(reused, outs) == len(reused)  # a third: nothing more to write
        tier = client.stats()["store"]["l2"][0]
        assert (tier["admission"], tier["admission_skipped"], tier["admission_admitted"]) == ("second_hit", 16, 4)
        metrics = {
            s.name: s.value
            for family in text_string_to_metric_families(server.get("/metrics"))
            for s in family.samples
            if "admission" in s.name
        }
        assert metrics["kvtier_store_l2_admission_skipped_total"] == 16
        assert metrics["kvtier_store_l2_admission_admitted_total"] == 4
        assert server.stop(signal.SIGTERM) == 0  # drains the queued writes
    assert on_disk(base, reused) == [True] * 4
    assert on_disk(base, one_shot) == [False] * 12


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.sampled_from(["store", "retrieve", "retrieve_into", "clear"]), st.integers(0, 2)), max_size=30
    )
)
def test_second_hit_matches_a_model(ops: list[tuple[str, int]]) -> None:
    """Any sequence of stores, retrieves and L1 clears: the tier holds exactly the chunks that had an L1 hit, a
    chunk is admitted once per L1 object that was not already on the tier, every retrieve is exact."""
    ks = keys(3)
    in_l1 = [False] * 3
    on_tier = [False] * 3
    held = [False] * 3  # the L1 object's bit: its tier holds it (loaded from there, or admitted)
    admitted = skipped = 0
    with Store(l1_size_gb=MB, l2_adapters=[{"type": "memory", "admission": "second_hit"}]) as store:
        for op, i in ops:
            if op == "store":
                store.store([ks[i]], [chunk(i)])
                in_l1[i], held[i] = True, False
                skipped += 1
            elif op == "clear":
                store.flush()
                store.clear_l1()
                in_l1 = [False] * 3
            else:
                if op == "retrieve":
                    got = store.retrieve([ks[i]])[0]
                    hit = got is not None and torch.equal(got, chunk(i))
                    assert hit or got is None
                else:
                    out = torch.empty_like(chunk(i))
                    hit = store.retrieve_into([ks[i]], [out]) == 1
                    assert not hit or torch.equal(out, chunk(i))
                if in_l1[i]:
                    assert hit
                    if not held[i]:
                        admitted += 1
                    held[i] = on_tier[i] = True
                elif on_tier[i]:
                    assert hit, "loaded back from the tier"
                    in_l1[i] = held[i] = True
                else:
                    assert not hit
        store.flush()
        assert store._tiers[0].contains(ks) == on_tier
        stats = tier_stats(store)
        assert (stats["admission_skipped"], stats["admission_admitted"]) == (skipped, admitted)
        store.clear_l1()
        assert store.stats()["l1"]["used_bytes"] == 0


def test_a_chunk_backfilled_into_l1_from_a_tier_is_not_written_there_again(tmp_path: Path) -> None:
    """retrieve_into reads a raw fs record straight into the caller's tensor and copies it into L1 in the
    background: that L1 copy is marked as held by fs, so its next hit writes nothing."""
    with Store(l1_size_gb=MB, l2_adapters=[fs(tmp_path, admission="second_hit")]) as store:
        ks = keys(2)
        data = [chunk(0), chunk(1)]
        store.store(ks, data)
        store.retrieve(ks)  # admitted
        store.flush()
        assert tier_stats(store)["stored"] == 2
        store.clear_l1()
        outs = [torch.empty_like(d) for d in data]
        assert store.retrieve_into(ks, outs) == 2  # from fs, in place; L1 backfilled later
        assert all(torch.equal(o, d) for o, d in zip(outs, data, strict=True))
        store.flush()  # the backfill has landed
        assert store.stats()["l1"]["objects"] == 2
        store.retrieve(ks)  # L1 hits of chunks fs holds
        store.flush()
        stats = tier_stats(store)
        assert (stats["admission_admitted"], stats["stored"]) == (2, 2)
