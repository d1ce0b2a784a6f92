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
