"""``kvtier bench l2 --adapter redis`` runs end to end on small chunks, reports each figure beside its raw
redis-py baseline, and leaves nothing behind on the server."""

import json

import pytest
import redis

from kvtier.bench.redis_server import LocalRedis, find_redis_server
from kvtier.cli import main
from kvtier.serde import registered_serdes

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed")


def test_bench_l2_redis_json(capsys: pytest.CaptureFixture[str]) -> None:
    with LocalRedis() as srv:
        argv = ["bench", "l2", "--adapter", "redis", "--url", srv.url, "--sizes", "1,2", "--mib-per-round", "4"]
        assert main([*argv, "--batch", "2", "--rounds", "1", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        figures = {f["name"]: f for f in doc["figures"]}
        for size in ("1 MiB", "2 MiB"):
            for op, base in (("store", "raw SET"), ("load", "raw GET")):
                fig = figures[f"kvtier {op} {size}"]
                assert fig["value"] > 0 and fig["baseline"] == f"{base} {size}" and "target" not in fig
                assert fig["rounds"] == 1 and len(fig["spread"]) == 2
            assert "bit-exact: True" in figures[f"kvtier load {size}"]["note"]
            if "fp8" in registered_serdes():
                fp8 = figures[f"kvtier+fp8 load {size}"]
                assert fp8["baseline"] == f"kvtier load {size}"
        client = redis.Redis.from_url(srv.url)
        assert client.dbsize() == 0, "the benchmark removes its records and their accounting"
        client.close()


def test_bench_l2_redis_starts_its_own_server(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "l2", "--adapter", "redis", "--sizes", "1", "--mib-per-round", "2", "--serde", "raw"]
    assert main([*argv, "--rounds", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["params"]["url"] == "private redis-server" and doc["params"]["serdes"] == []
    assert {f["name"]: f["baseline"] for f in doc["figures"]} == {
        "kvtier store 1 MiB": "raw SET 1 MiB",
        "kvtier load 1 MiB": "raw GET 1 MiB",
    }
    assert doc["load"]["cpus"] >= 1
