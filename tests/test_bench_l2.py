"""``kvtier bench l2`` runs each mode end to end on tiny chunks: every figure beside its interleaved baseline,
the durability stated, the machine's load recorded, no target or verdict in the output, nothing left behind."""

import json
from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.serde import registered_serdes

TINY = ["--chunks", "3", "--batch", "2", "--shape", "2,2,16,32", "--rounds", "2"]


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


def test_tier_mode_with_fsync(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = _run(tmp_path, capsys, "--mode", "tier", "--serde", "raw", "--durability", "fsync")
    assert figures["tier: raw store (fsync)"]["baseline"] == "plain write (fsync)"
    assert figures["tier: raw hot load"]["baseline"] == "plain read (page cache)"
    assert figures["tier: raw cold load"]["baseline"] == "plain cold read"


def test_store_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = _run(tmp_path, capsys, "--mode", "store", "--serde", "raw", "--order", "random")
    assert figures["Store: raw store (no fsync)"]["baseline"] == "plain write (no fsync)"
    assert figures["Store: raw hot load"]["baseline"] == "tier raw hot load"


@pytest.mark.skipif("fp8" not in registered_serdes(), reason="fp8 serde not registered")
def test_fp8_baselines_are_the_serde_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = _run(tmp_path, capsys, "--serde", "raw", "--serde", "fp8", "--chunks", "2")
    assert figures["tier: fp8 store (no fsync)"]["baseline"] == "fp8 encode alone"
    assert figures["tier: fp8 hot load"]["baseline"] == "fp8 decode alone"
    assert figures["tier: fp8 cold load"]["baseline"] == "tier raw cold load"
    assert figures["Store: fp8 store (no fsync)"]["baseline"] == "fp8 encode alone"
    assert figures["Store: fp8 hot load"]["baseline"] == "tier fp8 hot load"
    assert figures["encode: fp8 deserialize"]["baseline"] == "memcpy"


def test_table_output_has_ratios_and_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "l2", *TINY, "--dir", str(tmp_path), "--mode", "encode", "--serde", "raw"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "encode: raw serialize" in out and "machine load:" in out
    assert "MISSED" not in out and " met" not in out
