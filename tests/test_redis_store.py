"""kvtier.Store with a redis L2 against a real ``redis-server``: L1 keeps serving while Redis is down, recovery
after a restart without restarting kvtier, and two embedding processes sharing one Redis (a chunk stored by one is
a hit in the other; another ``cache_salt`` is not)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest
import torch

from kvtier.bench.redis_server import LocalRedis, find_redis_server
from kvtier.storage.store import Store
from kvtier.testing.adapters import chunk

pytestmark = pytest.mark.skipif(
    find_redis_server() is None, reason="redis-server is not installed (make system-deps installs it with apt-get)"
)


@pytest.fixture
def server() -> Iterator[LocalRedis]:
    with LocalRedis() as srv:
        yield srv


def redis_l2(url: str, prefix: str, **extra: object) -> dict[str, object]:
    return {"type": "redis", "url": url, "key_prefix": prefix, "timeout_s": 2, "connect_timeout_s": 1, **extra}


def test_l1_keeps_serving_while_redis_is_down_and_l2_recovers(server: LocalRedis) -> None:
    store = Store(l1_size_gb=0.01, l2_adapters=[redis_l2(server.url, uuid.uuid4().hex, serde={"type": "raw"})])
    try:
        first = store.keys_for_tokens("org/m", list(range(512)))[:2]
        store.store(first, [chunk(0), chunk(1)])
        store.flush()
        assert store.stats()["l2_written"] == 2  # counted in chunks
        server.stop(kill=True)

        later = store.keys_for_tokens("org/m", list(range(1000, 1512)))[:2]
        store.store(later, [chunk(2), chunk(3)])  # a dead L2 never fails the engine's store
        store.flush()
        got = store.retrieve(first)  # L1 hits need no L2
        assert got[0] is not None and torch.equal(got[0], chunk(0))
        assert got[1] is not None and torch.equal(got[1], chunk(1))
        store.clear_l1()
        assert store.retrieve(first) == [None, None], "an unreachable L2 is a miss, not an error"
        assert store.lookup(first) == 0
        stats = store.stats()
        assert stats["l2_write_failures"] >= 1 and stats["l2_errors"] >= 1

        server.start()  # empty again (no persistence); the same Store reconnects by itself
        again = store.keys_for_tokens("org/m", list(range(2000, 2512)))[:2]
        store.store(again, [chunk(4), chunk(5)])
        store.flush()
        store.clear_l1()
        got = store.retrieve(again)
        assert got[1] is not None and torch.equal(got[1], chunk(5)), "served from Redis after the restart"
    finally:
        store.close()


_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    from kvtier.storage.store import Store
    from kvtier.testing.adapters import chunk
    mode, l2, salts = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(",")
    out = {}
    with Store(l1_size_gb=0.01, l2_adapters=[l2]) as store:
        for salt in salts:
            keys = store.keys_for_tokens("org/shared-model", list(range(512)), cache_salt=salt)
            if mode == "store":
                store.store(keys, [chunk(7), chunk(8)])
                store.flush()
                out[salt] = store.stats()["l2_written"]
            else:
                got = store.retrieve(keys)
                hits = [g is not None and torch.equal(g, chunk(7 + i)) for i, g in enumerate(got)]
                out[salt] = {"hits": hits, "lookup": store.lookup(keys)}
    print(json.dumps(out))
    """
)


def _process(mode: str, l2: dict[str, object], salts: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROCESS, mode, json.dumps(l2), salts],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_two_kvtier_processes_share_one_redis(server: LocalRedis) -> None:
    # Two processes that embed a Store each (tests/test_redis_servers.py does the same with two kvtier servers).
    l2 = redis_l2(server.url, uuid.uuid4().hex, serde={"type": "raw"})
    assert _process("store", l2, "tenant-a") == {"tenant-a": 2}
    assert _process("load", l2, "tenant-a,tenant-b") == {
        "tenant-a": {"hits": [True, True], "lookup": 2},
        "tenant-b": {"hits": [False, False], "lookup": 0},  # cache_salt isolation holds across processes
    }
