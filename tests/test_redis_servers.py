"""Two ``kvtier server`` processes pointed at one Redis: a chunk stored through server A is a hit through server B,
another ``cache_salt`` is not, killing Redis leaves both servers serving their L1, and they write through again
once Redis is back, without a restart."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import torch

from kvtier import client as client_module
from kvtier.bench.redis_server import LocalRedis, find_redis_server
from kvtier.server import process

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed")

CHUNK = 16


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as srv:
        yield srv


def chunk_for(i: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + i)
    return torch.randn((2, 2, CHUNK, 64), generator=gen).to(torch.bfloat16)


def wait_for(fn: object, want: int, timeout_s: float = 30.0) -> int:
    assert callable(fn)
    deadline = time.monotonic() + timeout_s
    got = fn()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = fn()
    return int(got)


def test_two_servers_share_one_redis(redis_server: LocalRedis) -> None:
    l2 = json.dumps({"type": "redis", "url": redis_server.url, "key_prefix": uuid.uuid4().hex, "timeout_s": 2})
    args = ["--l1-size-gb", "0.0625", "--chunk-size", str(CHUNK), "--l2-adapter", l2, "--log-level", "warning"]
    with (
        process.ServerProcess(args) as a,
        process.ServerProcess(args) as b,
        client_module.Client(a.address, timeout_s=20) as ca,
        client_module.Client(b.address, timeout_s=20) as cb,
    ):
        keys = ca.keys_for_tokens("org/shared", list(range(2 * CHUNK)), cache_salt="tenant-a")
        data = [chunk_for(i) for i in range(len(keys))]
        ca.store(keys, data)
        # A writes through to Redis in the background: B sees the chunks once they landed
        assert wait_for(lambda: cb.lookup(keys), 2) == 2
        got = cb.retrieve(keys)
        assert all(g is not None and torch.equal(g, d) for g, d in zip(got, data, strict=True))
        other = cb.keys_for_tokens("org/shared", list(range(2 * CHUNK)), cache_salt="tenant-b")
        assert cb.lookup(other) == 0, "cache_salt isolation holds across servers"

        redis_server.stop(kill=True)
        got = cb.retrieve(keys)  # now in B's L1: served without Redis
        assert all(g is not None and torch.equal(g, d) for g, d in zip(got, data, strict=True))
        more = ca.keys_for_tokens("org/shared", list(range(4 * CHUNK)), cache_salt="tenant-a")[2:]
        more_data = [chunk_for(10 + i) for i in range(len(more))]
        ca.store(more, more_data)  # L2 down: the store still succeeds, into A's L1
        got = ca.retrieve(more)
        assert all(g is not None and torch.equal(g, d) for g, d in zip(got, more_data, strict=True))

        redis_server.start()  # empty again; both servers reconnect by themselves
        later = ca.keys_for_tokens("org/shared", list(range(6 * CHUNK)), cache_salt="tenant-a")[4:]
        ca.store(later, [chunk_for(20 + i) for i in range(len(later))])
        assert wait_for(lambda: cb.lookup(later), 2) == 2, "written through after Redis came back"
