"""``kvtier bench l2`` runs end to end on a tiny chunk and reports every figure with its baseline."""

import json
from pathlib import Path

import pytest

from kvtier.cli import main


def test_bench_l2_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "l2", "--chunks", "3", "--batch", "2", "--shape", "2,2,16,32", "--rounds", "1"]
    assert main([*argv, "--dir", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    figures = {f["name"]: f for f in doc["figures"]}
    for name in ("raw store (GB/s of KV)", "raw cold load (GB/s of KV)", "raw hot load (GB/s of KV)"):
        assert figures[name]["value"] > 0 and figures[name]["baseline_value"] > 0
    assert figures["raw cold load (GB/s of KV)"]["baseline"] == "plain cold read"
    assert figures["raw hot load (GB/s of KV)"]["note"] == "bit-exact"
    assert list(tmp_path.iterdir()) == [], "the benchmark removes its files"


def test_bench_l2_measures_fp8_when_registered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.serde import registered_serdes

    if "fp8" not in registered_serdes():
        pytest.skip("serde 'fp8' is not registered in this build (it comes with the codecs issue)")
    argv = ["bench", "l2", "--chunks", "2", "--shape", "2,2,16,32", "--rounds", "1", "--dir", str(tmp_path)]
    assert main([*argv, "--json"]) == 0
    figures = {f["name"]: f for f in json.loads(capsys.readouterr().out)["figures"]}
    assert figures["fp8 cold load (GB/s of KV)"]["baseline"] == "raw cold load"
    assert figures["fp8 cold load (GB/s of KV)"]["target"] == 1.2
    assert figures["fp8 hot load (GB/s of KV)"]["note"] == "lossy"
    assert figures["raw hot load (GB/s of KV)"]["note"] == "bit-exact"
