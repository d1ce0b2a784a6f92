"""Invalidation through a real ``kvtier server`` subprocess: purge by model / salt / both on fs and on a real Redis,
a purge while other clients keep storing and retrieving, a purge racing writes and loads held in flight by a slow
(faulty) adapter, the admin HTTP endpoints, and the ``kvtier`` client commands end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier import ObjectKey
from kvtier.bench.redis_server import LocalRedis, find_redis_server
from kvtier.cli import main as cli_main
from kvtier.client import Client
from kvtier.errors import ConfigError
from kvtier.server.process import ServerProcess, free_port
from kvtier.types import salt_digest

sys.path.insert(0, str(Path(__file__).parent))
from server_worker import content, same_bytes

WORKER = str(Path(__file__).parent / "server_worker.py")
CHUNK = 16
TOKEN = "purge-test-token"
SECRET_SALT = "s3cr3t-tenant-salt"


def server_args(l2: dict[str, Any], *extra: str) -> list[str]:
    return [
        "--l1-size-gb", "0.0625", "--chunk-size", str(CHUNK), "--log-level", "warning",
        "--l2-adapter", json.dumps(l2), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    l2 = {"type": "fs", "base_path": str(tmp_path_factory.mktemp("l2")), "durability": "none"}
    with ServerProcess(server_args(l2, "--admin-token", TOKEN)) as s:
        yield s


def grid(tag: str) -> list[ObjectKey]:
    return [
        ObjectKey(f"test/{tag}-{m}", format(0x5000 + 16 * i + j, "x"), 0, salt)
        for m in ("a", "b")
        for i, salt in enumerate(("", "t1", SECRET_SALT))
        for j in range(2)
    ]


def fill(client: Client, keys: list[ObjectKey]) -> None:
    client.store(keys, [content(k) for k in keys])


def served(client: Client, keys: list[ObjectKey]) -> dict[ObjectKey, bool]:
    out: dict[ObjectKey, bool] = {}
    for k in keys:  # one by one: retrieve answers leading hits only
        got = client.retrieve([k])[0]
        assert got is None or same_bytes(got, content(k)), f"{k} served wrong bytes"
        out[k] = got is not None
    return out


def wait_l2(client: Client, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.stats()["store"]
        if st["l2_pending_writes"] == 0 and sum(t["stored"] for t in st["l2"]) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("L2 writes did not land")


def check_purges(client: Client, tag: str) -> None:
    keys = grid(tag)
    fill(client, keys)
    wait_l2(client, 0)
    r1 = client.purge(model_name=f"test/{tag}-a", cache_salt="t1")
    r2 = client.purge(cache_salt=SECRET_SALT)
    r3 = client.purge(model_name=f"test/{tag}-b")
    assert not (r1["errors"] or r2["errors"] or r3["errors"])
    assert r1["l1"] == 2 and r1["l2_deleted"] == 2 and r1["salt_digest"] == salt_digest("t1")
    assert SECRET_SALT not in json.dumps([r1, r2, r3]), "a salt never comes back in a result"
    gone = {
        k
        for k in keys
        if k.cache_salt == SECRET_SALT
        or k.model_name.endswith("-b")
        or (k.model_name.endswith("-a") and k.cache_salt == "t1")
    }
    assert served(client, keys) == {k: k not in gone for k in keys}
    client.clear_l1()
    assert served(client, keys) == {k: k not in gone for k in keys}, "the same from L2 alone"


def test_purge_by_model_salt_and_both_on_fs(fs_server: ServerProcess) -> None:
    with Client(fs_server.address, timeout_s=20) as client:
        check_purges(client, "fs")
        assert client.delete(grid("fs")[:2]) == 2
        assert not any(served(client, grid("fs")[:2]).values())


@pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed")
def test_purge_by_model_salt_and_both_on_redis() -> None:
    with LocalRedis() as redis:
        l2 = {"type": "redis", "url": redis.url, "key_prefix": "kv*[t]?" + uuid.uuid4().hex[:6]}  # glob metachars
        with ServerProcess(server_args(l2)) as srv, Client(srv.address, timeout_s=20) as client:
            check_purges(client, "redis")
            r = client.clear(l1=True, l2=True)
            assert not r["errors"]
            assert client.describe()["tiers"][1]["used_bytes"] == 0


def test_purge_while_other_clients_store_and_retrieve(fs_server: ServerProcess) -> None:
    """Client processes keep storing and retrieving (every chunk checked byte for byte) while a large model is
    purged in batches: they see no mismatch and no error, and nothing of the purged model is served after."""
    with Client(fs_server.address, timeout_s=20) as client:
        big = [ObjectKey("test/big", format(0x70000 + i, "x")) for i in range(600)]
        for i in range(0, len(big), 100):
            fill(client, big[i : i + 100])
        wait_l2(client, 0)
        mix = subprocess.Popen(
            [sys.executable, WORKER, "mix", fs_server.address, "0", "3", "4"], stdout=subprocess.PIPE, text=True
        )
        time.sleep(1.0)
        seen: list[dict[str, Any]] = []
        result = client.purge(model_name="test/big", progress=seen.append)
        out, _ = mix.communicate(timeout=120)
        assert mix.returncode == 0
        report = json.loads(out.strip().splitlines()[-1])
        assert report["mismatch"] == 0 and report["checked"] > 0, report
        assert result["l1"] + result["l2_deleted"] >= len(big) and not result["errors"]
        assert client.lookup(big[:50]) == 0 and not any(served(client, big[:20]).values())


def test_purge_racing_queued_writes_and_loads_in_flight() -> None:
    """A slow L2 (every write and load batch sleeps): a purge issued while a write is still queued / in flight and
    while a load is in flight. Once purge returns nothing of the model is served, from L1 or L2, now or later."""
    l2 = {"type": "faulty", "inner": {"type": "memory"}, "store_delay_s": 0.4, "load_delay_s": 0.6}
    with ServerProcess(server_args(l2)) as srv, Client(srv.address, timeout_s=30) as a, Client(srv.address) as b:
        model = "test/race"
        first = [ObjectKey(model, format(0x100 + i, "x")) for i in range(3)]
        second = [ObjectKey(model, format(0x200 + i, "x")) for i in range(3)]
        other = [ObjectKey("test/keep", format(0x300 + i, "x")) for i in range(3)]
        fill(a, first)  # its write sleeps in the adapter ...
        fill(a, second)  # ... and this one waits in the queue
        fill(a, other)
        b.purge(model_name=model)
        assert a.lookup(first) == 0 and a.lookup(second) == 0
        wait_l2(a, 0)  # every queued write done (the purged ones skipped)
        a.clear_l1()
        assert a.lookup(first) == 0 and a.lookup(second) == 0, "no purged write reached L2"
        assert all(served(a, other).values()), "nothing else lost"
        skipped = a.stats()["store"]["purge_skipped_writes"]
        assert skipped >= 3

        # A load in flight: the record is on L2 only and its load sleeps; the purge comes in meanwhile.
        fill(a, first)
        wait_l2(a, 0)
        a.clear_l1()
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(a.retrieve(first[:1])))
        reader.start()
        time.sleep(0.2)
        b.purge(model_name=model)
        after = b.retrieve(first[:1])  # purge returned: never served again
        reader.join(30)
        assert after == [None]
        assert b.lookup(first) == 0 and not any(served(b, first).values())


def _http(srv: ServerProcess, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(srv.http_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_admin_http_purge_delete_clear_describe(fs_server: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Client(fs_server.address, timeout_s=20) as client:
        keys = grid("http")
        fill(client, keys)
        assert _http(fs_server, "POST", "/purge", {"model_name": "test/http-a"})[0] == 401
        status, doc = _http(
            fs_server, "POST", "/purge", {"model_name": "test/http-a"}, Origin="http://evil.example", **auth
        )
        assert status == 403
        status, doc = _http(
            fs_server, "POST", "/purge", {"model_name": "test/http-a", "cache_salt": SECRET_SALT}, **auth
        )
        assert status == 200 and doc["done"] and doc["result"]["l1"] == 2, doc
        assert SECRET_SALT not in json.dumps(doc)
        status, job = _http(fs_server, "GET", f"/jobs/{doc['job']}")
        assert status == 200 and job["result"] == doc["result"]
        assert _http(fs_server, "GET", "/jobs/999999")[0] == 404
        status, doc = _http(fs_server, "POST", "/purge", {"model_name": "test/http-a", "cache_salt": 5}, **auth)
        assert status == 400 and "cache_salt" in doc["error"]
        assert _http(fs_server, "POST", "/purge", {"nope": 1}, **auth)[0] == 400
        k = keys[0]
        status, doc = _http(
            fs_server, "POST", "/delete",
            {"keys": [{"model_name": k.model_name, "chunk_hash": k.chunk_hash, "cache_salt": k.cache_salt}]}, **auth,
        )  # fmt: skip
        assert status == 200 and doc["result"]["deleted"] == 1
        status, doc = _http(fs_server, "POST", "/clear", {"l1": True, "l2": True}, **auth)
        assert status == 200 and doc["result"]["errors"] == []
        status, desc = _http(fs_server, "GET", "/describe")
        assert status == 200 and desc["tiers"][0]["tier"] == "L1" and desc["tiers"][1]["used_bytes"] == 0
        assert not any(served(client, keys).values())


def test_cli_commands_end_to_end(fs_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    addr = ["--address", fs_server.address]
    with Client(fs_server.address, timeout_s=20) as client:
        tokens = list(range(3 * CHUNK + 5))
        keys = client.keys_for_tokens("test/cli", tokens, cache_salt=SECRET_SALT)
        fill(client, keys)
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    (tmp_path / "tokens.txt").write_text(" ".join(map(str, tokens)) + "\n")
    (tmp_path / "salt").write_text(SECRET_SALT + "\n")

    def run(*args: str) -> tuple[int, str]:
        code = cli_main([*args, *addr])
        out = capsys.readouterr()
        assert SECRET_SALT not in out.out + out.err, "a salt is never echoed"
        return code, out.out

    code, out = run("ping")
    assert code == 0 and "ok" in out and fs_server.address in out
    code, out = run("describe")
    assert code == 0 and "TIER" in out and "L2[0]" in out and "HIT RATE" in out
    code, out = run(
        "lookup",
        "--model",
        "test/cli",
        "--tokens-file",
        str(tmp_path / "tokens.json"),
        "--salt-file",
        str(tmp_path / "salt"),
        "--json",
    )
    assert code == 0 and json.loads(out)["cached_tokens"] == 3 * CHUNK
    code, out = run("lookup", "--model", "test/cli", "--tokens-file", str(tmp_path / "tokens.txt"))
    assert code == 0 and "0 of 3" in out, "another tenant (no salt) holds nothing"
    code, out = run("purge", "--model", "test/cli", "--salt", SECRET_SALT, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["l1"] == 3 and doc["salt_digest"] == salt_digest(SECRET_SALT)
    code, out = run(
        "lookup", "--model", "test/cli", "--tokens-file", str(tmp_path / "tokens.json"), "--salt", SECRET_SALT
    )
    assert code == 0 and "0 of 3" in out
    code, out = run("clear", "--l1", "--l2")
    assert code == 0 and "L2[0]" in out
    code, _ = run("purge")
    assert code == 2
    (tmp_path / "bad").write_text("1 2 x")
    code, _ = run("lookup", "--model", "test/cli", "--tokens-file", str(tmp_path / "bad"))
    assert code == 2


def test_cli_without_a_server_names_the_address_and_what_to_check() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    args = ["purge", "--model", "m", "--salt", SECRET_SALT, "--address", address, "--timeout", "1"]
    out = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 3
    assert address in out.stderr and "kvtier server" in out.stderr and "--address" in out.stderr
    assert SECRET_SALT not in out.stdout + out.stderr


def test_client_checks_before_sending(fs_server: ServerProcess) -> None:
    with Client(fs_server.address, timeout_s=20) as client:
        with pytest.raises(ValueError, match="model_name, cache_salt or both"):
            client.purge()
        with pytest.raises(ConfigError, match="model_name"):
            client.purge(model_name="bad name")
        assert client.delete([]) == 0
        assert "invalidations" in client.stats()["server"]
        assert torch.__version__  # torch is loaded by the client anyway


def test_a_slow_purge_reports_progress_and_blocks_no_other_client() -> None:
    """An L2 whose deletes are slow: while the purge runs, /stats shows its progress, the purging client gets
    progress documents, and another client's requests are answered at once."""
    l2 = {"type": "faulty", "inner": {"type": "memory"}, "delete_delay_s": 4.0}
    with ServerProcess(server_args(l2)) as srv, Client(srv.address, timeout_s=30) as a, Client(srv.address) as b:
        slow = [ObjectKey("test/slow", format(0x100 + i, "x")) for i in range(3)]
        keep = [ObjectKey("test/keep", format(0x200 + i, "x")) for i in range(3)]
        fill(a, slow + keep)
        wait_l2(a, 0)
        seen: list[dict[str, Any]] = []
        purger = threading.Thread(target=lambda: seen.append(a.purge(model_name="test/slow", progress=seen.append)))
        purger.start()
        time.sleep(1.0)
        running = srv.get("/stats")["server"]["invalidations"]
        assert running and running[0]["op"] == "purge" and running[0]["model_name"] == "test/slow", running
        assert all(served(b, keep).values())
        assert b.lookup(keep) == 3
        assert purger.is_alive(), "another client was served while the purge was still running"
        purger.join(30)
        assert seen and seen[-1]["l2_deleted"] == 3 and any("state" in d for d in seen[:-1]), seen
        assert srv.get("/stats")["server"]["invalidations"] == []
        assert not any(served(b, slow).values())


def test_describe_ranks_models_and_salts_by_bytes_when_reported() -> None:
    """Per-tenant and per-model usage (``stats()["l1"]["tenants"/"models"]``, when the Store reports it) become
    the top lists of describe, largest first, and the table names the unsalted tenant."""
    from kvtier.client_cli import describe_text
    from kvtier.server.server import _top

    tenants = {"": {"bytes": 10, "objects": 1, "quota_bytes": None}, "ab" * 16: {"bytes": 30, "objects": 3}}
    models = {f"m{i}": {"bytes": i, "objects": 1} for i in range(15)}
    top_salts, top_models = _top(tenants, "salt_digest"), _top(models, "model_name")
    assert [r["salt_digest"] for r in top_salts] == ["ab" * 16, ""]
    assert [r["model_name"] for r in top_models] == [f"m{i}" for i in range(14, 4, -1)]
    assert _top(None, "model_name") == [] and _top("garbage", "x") == []
    doc = {
        "server": {"version": "x", "pid": 1, "uptime_s": 5, "chunk_size": 16},
        "tiers": [{"tier": "L1", "kind": "memory", "capacity_bytes": 1 << 30, "used_bytes": 1 << 29, "objects": 3}],
        "hit_rate": 0.5,
        "top_models": top_models,
        "top_salts": top_salts,
    }
    text = describe_text(doc, "tcp://h:1")
    assert "50.0%" in text and "512.0 MiB" in text and "(unsalted)" in text and "m14" in text and "tcp://h:1" in text


def test_lying_or_confused_clients_get_errors_and_salts_stay_out_of_the_log(fs_server: ServerProcess) -> None:
    from kvtier.errors import NotFoundError
    from kvtier.server import protocol as p

    with Client(fs_server.address, timeout_s=20) as client:
        with pytest.raises(ConfigError, match="op must be purge, delete or clear"):
            client._call(p.Invalidate("drop-everything"))
        with pytest.raises(ConfigError, match="give model_name, cache_salt or both"):
            client._call(p.Invalidate("purge"))
        with pytest.raises(ConfigError, match="model_name") as info:
            client._call(p.Invalidate("purge", model_name="bad name!", cache_salt=SECRET_SALT))
        assert SECRET_SALT not in str(info.value)
        with pytest.raises(ConfigError, match="chunk_hash"):
            client._call(p.Invalidate("delete", keys=[p.WireKey("m", "not-hex", 0, SECRET_SALT)]))
        with pytest.raises(ConfigError, match="nothing to clear"):
            client._call(p.Invalidate("clear", l1=False, l2=False))
        with pytest.raises(NotFoundError):
            client._call(p.JobStatus(10**9))
        reply = client._call(p.Invalidate("purge", cache_salt=SECRET_SALT, wait_s=1e9))  # the wait is capped
        assert isinstance(reply, p.JobReply)
        again = client._call(p.JobStatus(reply.job, -5.0))
        assert again.job == reply.job
        assert client.health()["status"] == "ok"
    assert SECRET_SALT not in fs_server.stderr()


def test_concurrent_purges_and_stores_leave_a_consistent_cache() -> None:
    """Several purges of overlapping selectors at once, with stores of the same keys again and again: each purge
    returns, and what is served afterwards is only what was stored after the last purge of its key began."""
    from kvtier.storage.store import Store

    with Store(0.02, l2_adapters=[{"type": "memory"}]) as store:
        keys = [ObjectKey(f"m{i % 3}", format(0x100 + i, "x"), 0, ("", "t")[i % 2]) for i in range(24)]
        errors: list[BaseException] = []

        def storer() -> None:
            try:
                for _ in range(20):
                    store.store(keys, [content(k) for k in keys])
            except BaseException as exc:
                errors.append(exc)

        def purger(model: str | None, salt: str | None) -> None:
            try:
                for _ in range(5):
                    store.purge(model_name=model, cache_salt=salt)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=storer) for _ in range(2)]
        threads += [threading.Thread(target=purger, args=a) for a in (("m0", None), (None, "t"), ("m1", ""))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        store.flush()
        for k, got in zip(keys, store.retrieve(keys), strict=True):
            assert got is None or same_bytes(got, content(k))
        store.purge(model_name="m0")
        store.purge(model_name="m1")
        store.purge(model_name="m2")
        store.clear_l1()
        assert store.lookup(keys) == 0 and store.retrieve(keys) == [None] * len(keys)
