"""``kvtier bench server`` runs end to end on a tiny chunk: retrieve and lookups each beside an interleaved
baseline, the percentiles beside the echo's, the load recorded, no target in the output."""

import json

import pytest

from kvtier.cli import main


def test_bench_server_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "server", "--shape", "2,2,16,32", "--rounds", "2", "--lookups", "20", "--seconds", "0.3"]
    assert main([*argv, "--clients", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    figures = {f["name"]: f for f in doc["figures"]}
    retrieve = figures["retrieve_into via shared memory (L1 hit)"]
    assert retrieve["value"] > 0 and retrieve["baseline"] == "memcpy" and retrieve["rounds"] == 2
    assert len(retrieve["spread"]) == 2 and "target" not in retrieve
    lookups = figures["lookup round trips"]
    assert lookups["unit"] == "k/s" and lookups["baseline"] == "zmq echo" and lookups["rounds"] == 2
    for q in ("p50", "p99"):
        lookup = figures[f"lookup round trip {q}"]
        assert lookup["unit"] == "us" and lookup["value"] > 0 and lookup["baseline_value"] > 0
        assert "over 40 interleaved lookups" in lookup["note"]
    assert figures["ops/s, 1 client(s)"]["value"] > 0
    assert doc["params"]["clients"] == [1]
    assert doc["load"]["cpus"] >= 1
