"""The redis L2 adapter against a real ``redis-server`` (started on a free loopback port per module, no disk):
the conformance suite, config checks, key layout and tenant isolation, sharing between adapters, capacity and
OOM, a server killed and restarted mid-run, timeouts and passwords."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from kvtier import CapacityError, ConfigError
from kvtier.bench.redis_server import LocalRedis, find_redis_server, free_port
from kvtier.l2.adapters import MISS, RedisAdapter, create_backend, create_l2_adapter
from kvtier.testing import L2AdapterTests
from kvtier.testing.adapters import chunk, keys
from kvtier.types import ObjectKey

pytestmark = pytest.mark.skipif(
    find_redis_server() is None, reason="redis-server is not installed (make system-deps installs it with apt-get)"
)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRedis]:
    with LocalRedis() as srv:
        yield srv


def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def adapter_for(url: str, **extra: Any) -> RedisAdapter:
    adapter = create_backend({"type": "redis", "url": url, "key_prefix": prefix(), **extra})
    assert isinstance(adapter, RedisAdapter)
    return adapter


class TestRedisAdapter(L2AdapterTests):
    @pytest.fixture(autouse=True)
    def _server(self, server: LocalRedis) -> None:
        self.url = server.url

    def adapter_config(self, tmp_path: Path, capacity_gb: float | None = None) -> dict[str, Any]:
        config: dict[str, Any] = {"type": "redis", "url": self.url, "key_prefix": prefix()}
        if capacity_gb is not None:
            config["max_capacity_gb"] = capacity_gb
        return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, r"l2_adapter\.url: required"),
        ({"url": "http://localhost:6379"}, r"l2_adapter\.url: expected a redis://.*scheme 'http'"),
        ({"url": "localhost:6379"}, r"l2_adapter\.url: expected a redis://"),
        ({"url": "redis://localhost:notaport/0"}, r"l2_adapter\.url: .*[Pp]ort"),
        ({"url": "redis://localhost:6379/zero"}, r"l2_adapter\.url: the path must be a database number"),
        ({"url": "redis:///0"}, r"l2_adapter\.url: expected a host name"),
        ({"url": "redis://h/0?socket_timeout=abc"}, r"l2_adapter\.url: Invalid value for 'socket_timeout'"),
        ({"url": "unix://"}, r"l2_adapter\.url: a unix:// URL needs a socket path"),
        ({"url": "redis://h/1", "cluster": True}, r"l2_adapter\.url: a Redis Cluster has only database 0"),
        ({"url": "redis://h", "cluster": "yes"}, r"l2_adapter\.cluster: expected true or false"),
        ({"url": "redis://h", "cluster": True, "max_capacity_gb": 1}, r"l2_adapter\.max_capacity_gb: not supported"),
        ({"url": "redis://h", "max_capacity_gb": 0}, r"l2_adapter\.max_capacity_gb: expected a value > 0"),
        ({"url": "redis://h", "key_prefix": "a b"}, r"l2_adapter\.key_prefix: expected 1-200 printable"),
        ({"url": "redis://h", "key_prefix": "{tag}"}, r"l2_adapter\.key_prefix"),
        ({"url": "redis://h", "key_prefix": ""}, r"l2_adapter\.key_prefix"),
        ({"url": "redis://h", "timeout_s": 0}, r"l2_adapter\.timeout_s: expected a value >= 0.001"),
        ({"url": "redis://h", "max_connection": 3}, r"unknown field\(s\) \['max_connection'\]"),
    ],
)
def test_bad_config_fails_at_start_naming_the_field(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_l2_adapter({"type": "redis", **config})


def test_good_urls_are_accepted_without_connecting() -> None:
    for url in [
        "redis://localhost",
        "redis://:pw@10.0.0.1:7000/3",
        "rediss://u:p@cache.example:6380/0",
        "unix:///run/r.sock?db=2",
    ]:
        tier = create_l2_adapter({"type": "redis", "url": url, "serde": {"type": "raw"}})
        assert not tier.adapter.started
        tier.close()
    adapter = create_backend({"type": "redis", "url": "redis://user:s3cret@localhost:1/0"})
    assert "s3cret" not in repr(adapter.stats()) and "***" in adapter.stats()["url"]


def test_records_live_under_prefix_and_object_key(server: LocalRedis) -> None:
    pre = prefix()
    tier = create_l2_adapter({"type": "redis", "url": server.url, "key_prefix": pre})
    key = ObjectKey("org/model-A", "ab12", kv_rank=3, cache_salt="tenant1")
    tier.store([key], [chunk(0)])
    raw = redis.Redis.from_url(server.url)
    value = raw.get(f"{pre}:{key.to_str()}")
    assert value is not None and value[:4] == b"KVTR"
    assert int(raw.get(f"{{{pre}:@}}used") or 0) == len(value) == tier.adapter.used_bytes
    # cache_salt, kv rank and model are part of the key: another tenant, rank or model misses
    for other in (
        ObjectKey("org/model-A", "ab12", kv_rank=3, cache_salt="tenant2"),
        ObjectKey("org/model-A", "ab12", kv_rank=0, cache_salt="tenant1"),
        ObjectKey("org/model-B", "ab12", kv_rank=3, cache_salt="tenant1"),
    ):
        assert tier.load_into([other], [torch.empty_like(chunk(0))]) == [False]
    out = torch.empty_like(chunk(0))
    assert tier.load_into([key], [out]) == [True] and torch.equal(out, chunk(0))
    tier.close()
    raw.close()


def test_two_adapters_share_records_and_capacity(server: LocalRedis) -> None:
    pre = prefix()
    config = {"type": "redis", "url": server.url, "key_prefix": pre, "max_capacity_gb": 64 * 1024 / (1 << 30)}
    a, b = create_l2_adapter(config), create_l2_adapter(config)
    ks = keys(2)
    a.store(ks, [chunk(0), chunk(1)])
    outs = [torch.empty_like(chunk(0)) for _ in ks]
    assert b.load_into(ks, outs) == [True, True] and torch.equal(outs[1], chunk(1))
    assert a.adapter.used_bytes == b.adapter.used_bytes > 0
    for i in range(20):  # written through both: the shared bound holds for the prefix as a whole
        (a if i % 2 else b).store(keys(1, start=100 + i), [chunk(i)])
        cap = a.adapter.capacity_bytes
        assert cap is not None and a.adapter.used_bytes <= cap
    assert b.contains(keys(1, start=119)) == [True]
    assert a.contains(ks) == [False, False], "the oldest records were evicted for the newer ones"
    a.close()
    b.close()


def test_another_prefix_or_db_is_invisible(server: LocalRedis) -> None:
    a = adapter_for(server.url)
    b = adapter_for(server.url)
    c = create_backend({"type": "redis", "url": server.url.replace("/0", "/3"), "key_prefix": a.key_prefix})
    a.store_records(["k"], [[b"v"]])
    assert b.contains(["k"]) == [False] and c.contains(["k"]) == [False] and a.contains(["k"]) == [True]
    for x in (a, b, c):
        x.close()


def test_large_values_round_trip_from_scattered_buffers(server: LocalRedis) -> None:
    with adapter_for(server.url) as adapter:
        header = bytes(range(64))
        payload = torch.randint(0, 255, (6 << 20,), dtype=torch.uint8).numpy()
        adapter.store_records(["big"], [[header, payload]])
        h, p = bytearray(64), bytearray(6 << 20)
        assert adapter.load_records(["big"], [[h, p]]) == [64 + (6 << 20)]
        assert bytes(h) == header and bytes(p) == payload.tobytes()
        assert adapter.used_bytes == 64 + (6 << 20)


def test_record_deleted_behind_our_back_drops_its_accounting(server: LocalRedis) -> None:
    with adapter_for(server.url) as adapter:
        adapter.store_records(["a", "b"], [[bytes(100)], [bytes(50)]])
        raw = redis.Redis.from_url(server.url)
        raw.delete(f"{adapter.key_prefix}:a")  # as the server's own allkeys-lru eviction would
        assert adapter.load_records(["a", "b"], [[bytearray(100)], [bytearray(50)]]) == [MISS, 50]
        assert adapter.used_bytes == 50
        raw.close()


def test_server_killed_mid_run_fails_batches_cleanly_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    srv = LocalRedis().start()
    try:
        tier = create_l2_adapter({"type": "redis", "url": srv.url, "timeout_s": 2, "connect_timeout_s": 1})
        adapter = tier.adapter
        assert isinstance(adapter, RedisAdapter)
        tier.store(keys(2), [chunk(0), chunk(1)])
        srv.stop(kill=True)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvtier.l2.adapters.redis.adapter"):
            for _ in range(3):
                with pytest.raises(ConnectionError):
                    tier.store(keys(2, start=10), [chunk(2), chunk(3)])
                with pytest.raises(OSError):
                    tier.load_into(keys(1), [torch.empty_like(chunk(0))])
                with pytest.raises(OSError):
                    tier.contains(keys(1))
            stats = tier.stats()
            # 3 x (store, the serde layer's cleanup delete of the failed store, load, contains)
            assert stats["connection_errors"] == 12 and stats["outages"] == 1 and not stats["reachable"]
            assert stats["store_failures"] == 6
            assert stats["used_bytes"] > 0, "stats keep answering (last value seen) while the server is down"
            unreachable = [r for r in caplog.records if r.name.endswith("redis.adapter")]
            assert len(unreachable) == 1, "an outage is logged once, not per batch"
            srv.start()  # the same port, empty (no persistence): kvtier reconnects by itself
            assert tier.contains(keys(2)) == [False, False]
            tier.store(keys(2, start=10), [chunk(2), chunk(3)])
            out = torch.empty_like(chunk(3))
            assert tier.load_into(keys(1, start=11), [out]) == [True] and torch.equal(out, chunk(3))
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        assert tier.stats()["reachable"] and tier.stats()["outages"] == 1
        tier.close()
    finally:
        srv.close()


def test_restart_between_batches_is_invisible(server: LocalRedis) -> None:
    srv = LocalRedis().start()
    try:
        with adapter_for(srv.url) as adapter:
            adapter.store_records(["a"], [[b"1"]])
            srv.stop()
            srv.start()
            # pooled sockets are dead now; the one retry on a fresh connection hides the restart
            adapter.store_records(["a"], [[b"2"]])
            assert adapter.stats()["failed_batches"] == 0
    finally:
        srv.close()


def test_out_of_memory_fails_the_batch_and_kvtier_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    with LocalRedis(["maxmemory", "8mb", "maxmemory-policy", "noeviction"]) as srv:
        tier = create_l2_adapter({"type": "redis", "url": srv.url})
        small = torch.zeros(64 << 10, dtype=torch.uint8)
        big = [torch.full((1 << 20,), i, dtype=torch.uint8) for i in range(20)]
        tier.store(keys(1), [small])
        stored = 0
        with pytest.raises(CapacityError, match="out of memory"):
            for i in range(0, len(big), 2):
                tier.store(keys(2, start=10 + i), big[i : i + 2])
                stored += 2
        failed = keys(2, start=10 + stored)
        assert tier.contains(failed) == [False, False], "the batch refused with OOM left nothing"
        with caplog.at_level(logging.WARNING, logger="kvtier.l2.adapters.redis.adapter"):
            for _ in range(3):
                with pytest.raises(CapacityError):
                    tier.store(failed, big[:2])
        oom_lines = [r for r in caplog.records if r.name.endswith("redis.adapter") and "batch failed" in r.getMessage()]
        assert len(oom_lines) == 1, "a full server is logged once, not per batch"
        assert tier.stats()["oom_errors"] == 4
        out = torch.empty_like(small)
        assert tier.load_into(keys(1), [out]) == [True], "loads keep working on a full server"
        tier.delete(keys(stored, start=10))
        tier.store(failed, big[:2])  # room again: stores work without restarting anything
        assert tier.contains(failed) == [True, True]
        tier.close()


def test_a_server_that_does_not_answer_times_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # and never answer
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        adapter = adapter_for(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        with pytest.raises(TimeoutError):
            adapter.contains(["k"])
        assert adapter.stats()["timeouts"] == 1
        adapter.close()
    finally:
        stop.set()
        thread.join()
        for s in accepted:
            s.close()
        listener.close()


def test_password_url_is_passed_through() -> None:
    with LocalRedis(["requirepass", "s3cret"]) as srv:
        good = adapter_for(f"redis://:s3cret@127.0.0.1:{srv.port}/0")
        good.store_records(["k"], [[b"v"]])
        assert good.contains(["k"]) == [True]
        assert "s3cret" not in str(good.stats())
        bad = adapter_for(f"redis://:wrong@127.0.0.1:{srv.port}/0")
        with pytest.raises(ConnectionError) as info:
            bad.contains(["k"])
        assert "wrong" not in str(info.value)
        good.close()
        bad.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_loads_read_both_resp_protocols(server: LocalRedis, protocol: int) -> None:
    with adapter_for(f"{server.url}?protocol={protocol}") as adapter:
        big = bytes(range(256)) * 4096  # 1 MiB: many socket reads straight into the buffers
        adapter.store_records(["a", "b"], [[big[:10], big[10:]], [b"xy"]])
        a1, a2, b1, c1 = bytearray(100), bytearray(len(big) - 100), bytearray(1), bytearray(4)
        assert adapter.load_records(["a", "b", "c"], [[a1, a2], [b1], [c1]]) == [len(big), 2, MISS]
        assert bytes(a1 + a2) == big and bytes(b1) == b"x", "a record larger than its buffers fills a prefix"
        assert adapter.load_records(["b"], [[bytearray(2)]]) == [2], "the stream stays in step after a too-long one"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedis]:
    """A one-node Redis Cluster holding every slot: real cluster routing (MOVED-aware client, slot checks in
    scripts) without the cost of six servers."""
    # cluster-port: the default (port + 10000) overflows for the high ports the OS hands out
    bus = ["cluster-port", str(free_port())]
    with LocalRedis(["cluster-enabled", "yes", "cluster-config-file", "nodes.conf", *bus]) as srv:
        admin = redis.Redis.from_url(srv.url)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                pytest.fail("the one-node cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        admin.close()
        yield srv


class TestRedisClusterAdapter(L2AdapterTests):
    bounded = False  # max_capacity_gb is refused with a cluster (nodes bound themselves with maxmemory)

    @pytest.fixture(autouse=True)
    def _cluster(self, cluster: LocalRedis) -> None:
        self.url = cluster.url

    def adapter_config(self, tmp_path: Path, capacity_gb: float | None = None) -> dict[str, Any]:
        return {"type": "redis", "url": self.url, "cluster": True, "key_prefix": prefix()}


def test_cluster_failed_batch_leaves_nothing(cluster: LocalRedis) -> None:
    with adapter_for(cluster.url, cluster=True) as adapter:
        admin = redis.Redis.from_url(cluster.url)
        admin.config_set("maxmemory", "6mb")
        admin.config_set("maxmemory-policy", "noeviction")
        try:
            big = bytes(1 << 20)
            with pytest.raises(CapacityError):
                adapter.store_records([f"k{i}" for i in range(12)], [[big]] * 12)
            assert adapter.contains([f"k{i}" for i in range(12)]) == [False] * 12
            assert adapter.used_bytes == 0
        finally:
            admin.config_set("maxmemory", "0")
            admin.close()


@pytest.mark.parametrize("cluster_mode", [False, True])
def test_foreign_value_types_under_the_prefix_are_misses(
    server: LocalRedis, cluster: LocalRedis, cluster_mode: bool
) -> None:
    url = cluster.url if cluster_mode else server.url
    tier = create_l2_adapter({"type": "redis", "url": url, "key_prefix": prefix(), "cluster": cluster_mode})
    adapter = tier.adapter
    assert isinstance(adapter, RedisAdapter)
    key = keys(1)[0]
    raw = redis.Redis.from_url(url)
    raw.hset(f"{adapter.key_prefix}:{key.to_str()}", "field", "value")  # not a string value
    tier.store(keys(1, start=5), [chunk(5)])  # the batch around it keeps working
    both = [key, keys(1, start=5)[0]]
    assert tier.layouts(both) == [None, tier.layouts(both[1:])[0]]
    assert tier.lookup(both) == [False, True]
    out = [torch.empty_like(chunk(0)), torch.empty_like(chunk(5))]
    assert tier.load_into(both, out) == [False, True] and torch.equal(out[1], chunk(5))
    assert tier.stats()["integrity_misses"] == 1, "unreadable as a record: removed by the load"
    assert not raw.exists(f"{adapter.key_prefix}:{key.to_str()}")
    raw.close()
    tier.close()


def test_missing_redis_package_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # redis-py is an extra: without it, a redis adapter config fails at start naming the package and the extra.
    import importlib.util

    from kvtier.errors import MissingDependencyError
    from kvtier.l2.adapters.redis import redis_factory

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"kvtier\[redis\]"):
        redis_factory({"url": "redis://127.0.0.1:6379/0"}, "l2_adapters[0]")
