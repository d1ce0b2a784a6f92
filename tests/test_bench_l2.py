"""``kvtier bench l2`` runs each mode end to end on tiny chunks: every figure beside its interleaved baseline,
the durability stated, the machine's load recorded, no target or verdict in the output, nothing left behind."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier.bench import l2
from kvtier.cli import main
from kvtier.l2.tier import L2Tier
from kvtier.serde import registered_serdes
from kvtier.storage.store import Store

TINY = ["--chunks", "3", "--batch", "2", "--shape", "2,2,16,32", "--rounds", "2"]
CHUNKS, ROUNDS = 3, 2


class _SeenStore(Store):
    """A real Store that keeps its stats at close, by directory label (``emptied``, ``steady``, ``loading``)."""

    seen: dict[str, dict[str, Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label = Path(kwargs["l2_adapters"][0]["base_path"]).name

    def close(self) -> None:
        if self.label not in self.seen:
            self.seen[self.label] = self.stats()
        super().close()


@pytest.fixture
def seen_stores(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """The stats of every Store the benchmark made, taken as it closed them."""
    seen: dict[str, dict[str, Any]] = {}
    monkeypatch.setattr(_SeenStore, "seen", seen, raising=False)
    monkeypatch.setattr(l2, "Store", _SeenStore)
    return seen


@pytest.fixture
def seen_tiers(monkeypatch: pytest.MonkeyPatch) -> list[L2Tier]:
    """Every L2 tier the benchmark made itself (its tier mode's and the tier alone of its store mode)."""
    tiers: list[L2Tier] = []
    real = l2.create_l2_adapter

    def create(config: dict[str, Any], *args: Any) -> L2Tier:
        tier = real(config, *args)
        tiers.append(tier)
        return tier

    monkeypatch.setattr(l2, "create_l2_adapter", create)
    return tiers


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    assert main(["bench", "l2", *TINY, "--dir", str(tmp_path), "--json", *extra]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == [], "the benchmark removes its files"
    for fig in doc["figures"]:
        assert fig["value"] > 0 and fig["baseline_value"] > 0 and fig["rounds"] == 2
        assert len(fig["spread"]) == 2 and fig["spread"][0] <= fig["spread"][1]
        assert "target" not in fig
    assert doc["load"]["cpus"] >= 1 and "steal_pct" in doc["load"]
    return {f["name"]: f for f in doc["figures"]}


def test_encode_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = _run(tmp_path, capsys, "--mode", "encode", "--serde", "raw", "--workers", "2")
    assert set(figures) == {"encode: raw serialize", "encode: raw deserialize"}
    assert figures["encode: raw serialize"]["baseline"] == "memcpy"
    assert "max_workers 2" in figures["encode: raw serialize"]["note"]


def test_tier_mode_with_fsync(tmp_path: Path, capsys: pytest.CaptureFixture[str], seen_tiers: list[L2Tier]) -> None:
    figures = _run(tmp_path, capsys, "--mode", "tier", "--serde", "raw", "--durability", "fsync")
    assert figures["tier: raw store (fsync)"]["baseline"] == "plain write (fsync)"
    assert figures["tier: raw hot load"]["baseline"] == "plain read (page cache)"
    assert figures["tier: raw cold load"]["baseline"] == "plain cold read"
    # Every store call (the warm-up and each round) wrote every record: a round of the bytes the tier wrote last
    # is left unwritten (stored_unchanged) and would time a checksum, not a write.
    (tier,) = seen_tiers
    assert tier.counts["stored_unchanged"] == 0
    assert tier.counts["stored"] == CHUNKS * (1 + ROUNDS)


STORE_ROWS = {
    "Store: raw store (no fsync), L1 emptied": "plain write (no fsync)",
    "Store: raw store (no fsync), steady state": "plain write (no fsync)",
    "Store: raw hot load, L1 emptied": "tier raw hot load",
    "Store: raw hot load, steady state": "tier raw hot load, sets A, B in turn",
}


def _check_store_mode(figures: dict[str, Any], seen: dict[str, dict[str, Any]], serde: str, chunks: int) -> None:
    rows = {k.replace("raw", serde): v.replace("raw", serde) for k, v in STORE_ROWS.items()}
    if serde != "raw":
        rows = {k: f"{serde} encode alone" if "store" in k else v for k, v in rows.items()}
    assert {k: figures[k]["baseline"] for k in rows} == rows
    for label, fig in figures.items():
        if label.startswith("Store:") and label.endswith("L1 emptied"):
            assert "L1 emptied before each round: first-touch page faults" in fig["note"]
        elif label.startswith("Store:"):
            assert label.endswith("steady state") and "pages resident (steady state)" in fig["note"]
    for stats in (seen[f"store-{label}-{serde}"] for label in ("emptied", "steady", "loading")):
        assert stats["l2"][0]["stored_unchanged"] == 0, "a store round re-stored identical bytes"
        assert stats["l2_writes_dropped"] == 0 and stats["l1_store_refused"] == 0
    # The store rounds wrote every chunk to L2, each time: emptied (the loads' records, the harness's warm-up,
    # the rounds), steady (one untimed round, the warm-up, the rounds).
    assert seen[f"store-emptied-{serde}"]["l2_written"] == chunks * (2 + ROUNDS)
    steady = seen[f"store-steady-{serde}"]
    assert steady["l2_written"] == chunks * (2 + ROUNDS)
    assert steady["l1"]["objects"] == chunks and steady["l1"]["evictions"] == 0  # replaced, never cleared
    # The steady-state loads went to L2 every round (two untimed loads, the warm-up, the rounds; each call also
    # checks it), evicting the other key set: no load ever found its key in L1.
    loading = seen[f"store-loading-{serde}"]
    assert loading["l2_prefetched"] >= chunks * (3 + ROUNDS)
    assert loading["l1"]["evictions"] >= chunks * (3 + ROUNDS)
    assert loading["l1"]["objects"] == chunks


def test_store_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str], seen_stores: dict[str, dict[str, Any]]) -> None:
    figures = _run(tmp_path, capsys, "--mode", "store", "--serde", "raw", "--order", "random")
    _check_store_mode(figures, seen_stores, "raw", CHUNKS)


@pytest.mark.skipif("fp8" not in registered_serdes(), reason="fp8 serde not registered")
def test_fp8_baselines_are_the_serde_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seen_stores: dict[str, dict[str, Any]]
) -> None:
    figures = _run(tmp_path, capsys, "--serde", "raw", "--serde", "fp8", "--chunks", "2")
    assert figures["tier: fp8 store (no fsync)"]["baseline"] == "fp8 encode alone"
    assert figures["tier: fp8 hot load"]["baseline"] == "fp8 decode alone"
    assert figures["tier: fp8 cold load"]["baseline"] == "tier raw cold load"
    assert figures["encode: fp8 deserialize"]["baseline"] == "memcpy"
    for serde in ("raw", "fp8"):
        _check_store_mode(figures, seen_stores, serde, 2)


def test_table_output_has_ratios_and_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "l2", *TINY, "--dir", str(tmp_path), "--mode", "encode", "--serde", "raw"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "encode: raw serialize" in out and "machine load:" in out
    assert "MISSED" not in out and " met" not in out


@pytest.mark.parametrize("mode", ["tier", "store"])
def test_a_store_round_of_identical_bytes_stops_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # Both sources the same bytes: the tier leaves the re-stores unwritten, which the round must refuse to time.
    monkeypatch.setattr(l2, "_differing", lambda src: src)
    with pytest.raises(SystemExit, match=r"re-store.* of identical bytes unwritten"):
        main(["bench", "l2", *TINY, "--dir", str(tmp_path), "--json", "--mode", mode, "--serde", "raw"])
    assert list(tmp_path.iterdir()) == [], "the benchmark removes its files"


def test_the_second_source_differs_byte_for_byte_however_encoded() -> None:
    src = torch.tensor([0.0, 1.5, -2.0, 448.0, 1e-9], dtype=torch.bfloat16)
    alt = l2._differing(src)
    assert alt.shape == src.shape and alt.dtype == src.dtype
    assert (alt.view(torch.int16) != src.view(torch.int16)).all()
    assert (alt != src).all()  # a zero becomes one, not -0.0: an encoder may well drop the sign of a zero


def test_a_steady_state_load_that_finds_its_keys_in_l1_stops_the_run(tmp_path: Path) -> None:
    src = torch.ones(2, 2, 16, 32, dtype=torch.bfloat16)
    c = l2._Chunks(src, 3, 2, tmp_path, "none")
    adapter = {"type": "fs", "base_path": str(tmp_path / "l2"), "durability": "none", "serde": {"type": "raw"}}
    # L1 large enough for both key sets: the sets stored stay in L1, so a "steady-state" round would read L1.
    with Store(l1_size_gb=4 * c.total / l2.GiB, l2_adapters=[adapter]) as store:
        c.store_fill(store, 0)
        c.store_fill(store, 1)
        turns = l2._Turns()
        turns.flip()
        with pytest.raises(SystemExit, match=r"3 of 3 chunk.* still in L1"):
            c.store_load(store, turns)()
