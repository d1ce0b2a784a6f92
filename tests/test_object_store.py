"""The object-store L2 adapter against a real S3 endpoint on loopback: moto's standalone server (``moto[server]``),
started on a free port as s3fs tests itself, speaking the S3 HTTP protocol.

The conformance suite in both modes (a prefix one server owns, with capacity and eviction; a shared prefix), two
Stores sharing one bucket (a hit through the other, ``cache_salt`` isolation), the endpoint killed and restarted
mid-run (moto forgets everything: the fixture recreates the bucket), conditional put, multipart, fp8 through it,
the index rebuilt from a listing, and faults injected by a proxy in front of moto (503 SlowDown, a stalled
endpoint), credentials refused by moto's own IAM check and a missing bucket: each an ``L2Error``, logged once.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.bench.local_s3 import TEST_CREDENTIALS, LocalS3, moto_available
from kvtier.errors import CapacityError, ConfigError, L2Error
from kvtier.l2.adapters import create_backend, create_l2_adapter
from kvtier.l2.adapters.object_store import ObjectStoreAdapter, object_name
from kvtier.storage.store import Store
from kvtier.testing import L2AdapterTests
from kvtier.testing.adapters import chunk, keys
from kvtier.types import ObjectKey, salt_digest

pytest.importorskip("obstore", reason="the object_store extra is not installed (pip install 'kvtier[object_store]')")
if not moto_available():
    pytest.skip("moto[server] is not installed (the dev extra installs it)", allow_module_level=True)

BUCKET = "kvtier-test"
CREDS = {**TEST_CREDENTIALS, "region": "us-east-1"}


class MotoServer(LocalS3):
    """The shared launcher, plus a boto3 client to look at the bucket from outside kvtier."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__(bucket=BUCKET, env=env)

    def s3(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDS["access_key_id"],
            aws_secret_access_key=CREDS["secret_access_key"],
            region_name="us-east-1",
        )

    def names(self, prefix: str) -> list[str]:
        out = self.s3().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for o in out.get("Contents", []))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


def l2(endpoint: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object_store",
        "url": f"s3://{BUCKET}/{prefix}",
        "options": {**CREDS, "endpoint": endpoint},
        "timeout_s": 5,
        "connect_timeout_s": 1,
        "max_retries": 1,
        "retry_timeout_s": 2,
        **extra,
    }


class _WriteOnce:
    """The suite's overwrite test, for a write-once store: a key names its content, so a second store of a key
    keeps the first record (no second upload); delete still removes it and its bytes."""

    def test_overwrite_and_delete(self, tmp_path: Path) -> None:
        with self.make_adapter(tmp_path) as adapter:  # type: ignore[attr-defined]
            adapter.store_records(["k"], [[b"first-version"]])
            adapter.store_records(["k"], [[b"second"]])
            buf = bytearray(13)
            assert adapter.load_records(["k"], [[buf]]) == [13] and bytes(buf) == b"first-version"
            assert adapter.used_bytes == 13
            adapter.delete(["k"])
            assert adapter.contains(["k"]) == [False]
            assert adapter.used_bytes == 0
            adapter.store_records(["k"], [[b"second"]])  # after a delete the key is free again
            assert adapter.load_records(["k"], [[buf]]) == [6] and bytes(buf[:6]) == b"second"


class TestObjectStoreOwnedPrefix(_WriteOnce, L2AdapterTests):
    @pytest.fixture(autouse=True)
    def _endpoint(self, moto: MotoServer) -> None:
        self.endpoint = moto.endpoint

    def adapter_config(self, tmp_path: Path, capacity_gb: float | None = None) -> dict[str, Any]:
        prefix = f"owned/{abs(hash(str(tmp_path)))}"  # one prefix per test (and per serde in the round trips)
        return l2(self.endpoint, prefix, **({} if capacity_gb is None else {"max_capacity_gb": capacity_gb}))


class TestObjectStoreSharedPrefix(_WriteOnce, L2AdapterTests):
    bounded = False  # capacity is the bucket's lifecycle rules

    @pytest.fixture(autouse=True)
    def _endpoint(self, moto: MotoServer) -> None:
        self.endpoint = moto.endpoint

    def adapter_config(self, tmp_path: Path, capacity_gb: float | None = None) -> dict[str, Any]:
        return l2(self.endpoint, f"shared/{abs(hash(str(tmp_path)))}", shared=True)


# -- naming -------------------------------------------------------------------------------------------------
def test_object_names_follow_model_salt_digest_hash() -> None:
    key = ObjectKey("org/Llama-3.1-8B", "ab12", kv_rank=0, cache_salt="tenant-a")
    assert object_name(key.to_str()) == f"org/Llama-3.1-8B/{salt_digest('tenant-a')}/ab12.kvtr"
    ranked = ObjectKey("m", "ab12", kv_rank=3, cache_salt="")
    assert object_name(ranked.to_str()) == "m/_/ab12.r3.kvtr"
    assert "tenant-a" not in object_name(key.to_str()), "no raw salt in a name"
    assert object_name("k0") == "_/k/k0.kvtr"
    assert object_name("a b/../c") == f"_/x/{b'a b/../c'.hex()}.kvtr"
    assert object_name("..") == f"_/x/{b'..'.hex()}.kvtr"
    assert object_name(ObjectKey("org/./m", "1").to_str()).startswith("_/x/"), "unclean model segments"


def _key_str(t: tuple[str, str, int, str]) -> str | None:
    try:
        return ObjectKey(*t).to_str()
    except ConfigError:  # a model name ObjectKey itself refuses ('a//b', '..')
        return None


_model = st.from_regex(r"[A-Za-z0-9._\-+:/]{1,20}", fullmatch=True)
_salt = st.from_regex(r"[A-Za-z0-9._\-+:=]{0,12}", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(_model, st.from_regex(r"[0-9a-f]{1,8}", fullmatch=True), st.integers(0, 3), _salt)
            .map(_key_str)
            .filter(lambda s: s is not None),
            st.text(min_size=1, max_size=30),
        ),
        min_size=2,
        max_size=8,
        unique=True,
    )
)
def test_object_names_are_distinct_and_clean(strs: list[Any]) -> None:
    names = [object_name(s) for s in strs]
    assert len(set(names)) == len(names), "two keys must never share an object"
    for name in names:
        assert name.endswith(".kvtr") and "//" not in name and not name.startswith("/")
        assert all(seg not in ("", ".", "..") for seg in name.split("/"))
        assert name.isascii() and all(c.isprintable() and not c.isspace() for c in name)


# -- config -------------------------------------------------------------------------------------------------
def test_bad_config_fails_at_start_naming_the_field() -> None:
    base = {"type": "object_store", "url": "s3://b/p", "options": dict(CREDS)}
    with pytest.raises(ConfigError, match=r"l2_adapter\.max_capacity_gb: not allowed with shared"):
        create_l2_adapter({**base, "shared": True, "max_capacity_gb": 1})
    with pytest.raises(ConfigError, match=r"l2_adapter\.url: expected s3://"):
        create_l2_adapter({**base, "url": "http://b/p"})
    with pytest.raises(ConfigError, match=r"l2_adapter\.url: expected a bucket"):
        create_l2_adapter({**base, "url": "s3:///p"})
    with pytest.raises(ConfigError, match=r"l2_adapter\.options: unknown key 'regoin'"):
        create_l2_adapter({**base, "options": {**CREDS, "regoin": "x"}})
    with pytest.raises(ConfigError, match=r"l2_adapter\.options: expected a JSON object"):
        create_l2_adapter({**base, "options": ["x"]})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['max_capacity'\]"):
        create_l2_adapter({**base, "max_capacity": 1})
    with pytest.raises(ConfigError, match=r"l2_adapter\.max_capacity_gb: expected a value > 0"):
        create_l2_adapter({**base, "max_capacity_gb": 0})
    with pytest.raises(ConfigError, match=r"multipart_part_mb"):
        create_l2_adapter({**base, "multipart_part_mb": 1})


def test_options_never_in_repr_stats_or_errors(moto: MotoServer, caplog: pytest.LogCaptureFixture) -> None:
    secret = CREDS["secret_access_key"]
    tier = create_l2_adapter(l2(moto.endpoint, "secrets", url=f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/p"))
    with caplog.at_level(logging.DEBUG), pytest.raises(L2Error) as info:
        tier.contains(keys(1))
    for text in (repr(tier), repr(tier.adapter), json.dumps(tier.stats()), str(info.value), caplog.text):
        assert secret not in text and CREDS["access_key_id"] not in text
    with pytest.raises(ConfigError) as bad:
        create_l2_adapter({**l2(moto.endpoint, "p"), "options": {"regoin": secret}})
    assert secret not in str(bad.value)
    tier.close()


# -- the shared bucket --------------------------------------------------------------------------------------
def test_two_stores_share_one_bucket_hit_through_the_other_and_salts_isolated(moto: MotoServer) -> None:
    prefix = f"two/{uuid.uuid4().hex[:8]}"
    config = l2(moto.endpoint, prefix, shared=True, serde={"type": "raw"})
    a = Store(l1_size_gb=0.01, l2_adapters=[config])
    b = Store(l1_size_gb=0.01, l2_adapters=[config])
    try:
        mine = a.keys_for_tokens("org/shared-model", list(range(512)), cache_salt="tenant-a")
        a.store(mine, [chunk(7), chunk(8)])
        a.flush()
        got = b.retrieve(b.keys_for_tokens("org/shared-model", list(range(512)), cache_salt="tenant-a"))
        assert got[0] is not None and torch.equal(got[0], chunk(7)), "stored through one, a hit through the other"
        assert got[1] is not None and torch.equal(got[1], chunk(8))
        other = b.keys_for_tokens("org/shared-model", list(range(512)), cache_salt="tenant-b")
        assert b.retrieve(other) == [None, None], "another cache_salt sees nothing"
        names = moto.names(prefix)
        assert len(names) == 2
        assert all(n.startswith(f"{prefix}/org/shared-model/{salt_digest('tenant-a')}/") for n in names)
        assert not any("tenant-a" in n for n in names)
    finally:
        a.close()
        b.close()


def test_conditional_put_keeps_the_first_record_and_uploads_once(moto: MotoServer) -> None:
    prefix = f"cond/{uuid.uuid4().hex[:8]}"
    first = create_backend(l2(moto.endpoint, prefix, shared=True))
    second = create_backend(l2(moto.endpoint, prefix, shared=True))
    owned = create_backend(l2(moto.endpoint, prefix))
    with first, second, owned:
        first.store_records(["k"], [[b"one"]])
        second.store_records(["k"], [[b"two"]])  # If-None-Match: the object stays
        assert second.stats()["uploads"] == 0 and second.stats()["uploads_skipped"] == 1
        buf = bytearray(3)
        assert second.load_records(["k"], [[buf]]) == [3] and bytes(buf) == b"one"
        assert owned.contains(["k"]) == [True], "owned mode: found by the listing on start"
        owned.store_records(["k"], [[b"three"]])  # known to the index: not even a request
        assert owned.stats()["uploads"] == 0 and owned.stats()["batches"] == 1  # only the listing
        assert isinstance(owned, ObjectStoreAdapter)


def test_the_same_key_from_many_threads_at_once(moto: MotoServer) -> None:
    prefix = f"race/{uuid.uuid4().hex[:8]}"
    adapters = [create_backend(l2(moto.endpoint, prefix, shared=True)) for _ in range(3)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(10):
                adapters[i % 3].store_records(["same"], [[b"x" * 1000]])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert moto.names(prefix) == [f"{prefix}/_/k/same.kvtr"]
    for a in adapters:
        a.close()


def test_multipart_upload_for_large_records(moto: MotoServer) -> None:
    prefix = f"mp/{uuid.uuid4().hex[:8]}"
    tier = create_l2_adapter(l2(moto.endpoint, prefix, multipart_threshold_mb=5))
    other = create_l2_adapter(l2(moto.endpoint, prefix, multipart_threshold_mb=5, shared=True))
    with tier, other:
        big = torch.randint(0, 255, (6 << 20,), dtype=torch.uint8)  # 6 MiB: two parts of the 5 MiB minimum
        (key,) = keys(1)
        tier.store([key], [big])
        assert tier.adapter.stats()["multipart_uploads"] == 1
        out = torch.empty_like(big)
        assert tier.load_into([key], [out]) == [True] and torch.equal(out, big)
        tier.store([key], [big])  # already there: not uploaded again
        assert tier.adapter.stats()["multipart_uploads"] == 1
        other.store([key], [big])  # another server: a multipart upload is not conditional, so it looks first
        assert other.adapter.stats()["multipart_uploads"] == 0 and other.adapter.stats()["uploads_skipped"] == 1


def test_fp8_serde_through_the_object_store(moto: MotoServer) -> None:
    tier = create_l2_adapter(l2(moto.endpoint, f"fp8/{uuid.uuid4().hex[:8]}", serde={"type": "fp8"}))
    with tier:
        src = [chunk(i, tokens=64) for i in range(3)]
        ks = keys(3)
        tier.store(ks, src)
        raw_bytes = sum(t.numel() * t.element_size() for t in src)
        assert tier.adapter.used_bytes < 0.6 * raw_bytes, "fp8 halves the bytes stored"
        outs = [torch.empty_like(s) for s in src]
        assert tier.load_into(ks, outs) == [True] * 3
        for s, o in zip(src, outs, strict=True):
            assert torch.allclose(s.float(), o.float(), rtol=0.07, atol=0.02)


def test_index_is_rebuilt_from_a_listing_and_evicts_oldest_first(moto: MotoServer) -> None:
    prefix = f"idx/{uuid.uuid4().hex[:8]}"
    cap_gb = 10_000 / (1 << 30)
    with create_backend(l2(moto.endpoint, prefix, max_capacity_gb=cap_gb)) as first:
        first.store_records(["r0"], [[bytes(2000)]])
        time.sleep(1.05)  # S3 modification times have one-second resolution: r0 is older than the rest
        first.store_records(["r1", "r2", "r3"], [[bytes(2000)]] * 3)
        assert first.used_bytes == 8000
    with create_backend(l2(moto.endpoint, prefix, max_capacity_gb=cap_gb)) as again:
        assert again.contains([f"r{i}" for i in range(4)]) == [True] * 4
        assert again.used_bytes == 8000, "bytes rebuilt from the listing"
        again.store_records(["new"], [[bytes(4000)]])
        assert again.contains(["r0", "r1", "r2", "r3", "new"]) == [False, True, True, True, True]
        assert again.used_bytes == 10_000
        assert again.stats()["evictions"] == 1
    assert len(moto.names(prefix)) == 4, "the evicted object is gone from the bucket"


def test_a_head_read_then_the_record_replaced_is_never_wrong_kv(moto: MotoServer) -> None:
    """Damage between two steps of one lookup: contains (which keeps the head) and the load, another server
    replaces the record in between."""
    prefix = f"swap/{uuid.uuid4().hex[:8]}"
    tier = create_l2_adapter(l2(moto.endpoint, prefix, shared=True))
    other = create_l2_adapter(l2(moto.endpoint, prefix, shared=True))
    with tier, other:
        (key,) = keys(1)
        tier.store([key], [chunk(1)])
        assert tier.contains([key]) == [True]  # the head is kept for the layouts() that follows
        other.delete([key])
        other.store([key], [chunk(2, tokens=32)])  # another layout under the same key
        layout = tier.layouts([key])[0]
        assert layout is not None and tuple(layout.shape) == tuple(chunk(1).shape), "the kept head"
        out = torch.empty_like(chunk(1))
        assert tier.load_into([key], [out]) == [False], "the record read is not the one the head described"
        assert tier.adapter.stats()["head_cache_hits"] == 1


# -- faults -------------------------------------------------------------------------------------------------
def test_endpoint_killed_and_restarted_mid_run(caplog: pytest.LogCaptureFixture) -> None:
    server = MotoServer().start()
    store = Store(l1_size_gb=0.01, l2_adapters=[l2(server.endpoint, "restart")])
    try:
        first = store.keys_for_tokens("org/m", list(range(512)))[:2]
        store.store(first, [chunk(0), chunk(1)])
        store.flush()
        server.stop()
        with caplog.at_level(logging.WARNING, logger="kvtier.l2.adapters.object_store"):
            for i in range(3):
                later = store.keys_for_tokens("org/m", list(range(1000 * (i + 1), 1000 * (i + 1) + 512)))[:2]
                store.store(later, [chunk(2), chunk(3)])  # a dead L2 never fails the engine's store
                store.flush()
            got = store.retrieve(first)  # L1 hits need no L2
            assert got[0] is not None and torch.equal(got[0], chunk(0))
            store.clear_l1()
            assert store.retrieve(first) == [None, None], "an unreachable L2 is a miss, not an error"
        down = [r for r in caplog.records if "batches fail until it is back" in r.getMessage()]
        assert len(down) == 1, "an outage is logged once, not per batch"
        stats = store.stats()
        assert stats["l2_write_failures"] >= 1 and stats["l2_errors"] >= 1

        server.start()  # empty again: moto forgets everything; the fixture recreates the bucket
        again = store.keys_for_tokens("org/m", list(range(9000, 9512)))[:2]
        store.store(again, [chunk(4), chunk(5)])
        store.flush()
        store.clear_l1()
        got = store.retrieve(again)
        assert got[1] is not None and torch.equal(got[1], chunk(5)), "served from S3 after the restart"
        assert store.retrieve(first) == [None, None], "the records moto forgot are misses"
    finally:
        store.close()
        server.stop()


def test_missing_bucket_is_an_outage_and_never_created(moto: MotoServer) -> None:
    name = f"absent-{uuid.uuid4().hex[:8]}"
    for shared in (False, True):
        adapter = create_backend({**l2(moto.endpoint, "p", shared=shared), "url": f"s3://{name}/p"})
        with pytest.raises(L2Error, match="missing_bucket"):
            adapter.store_records(["k"], [[b"v"]])
        with pytest.raises(L2Error, match="missing_bucket"):
            adapter.contains(["k"])
        assert adapter.stats()["missing_bucket"] == 2 and adapter.stats()["outages"] == 1
        adapter.close()
    assert name not in [b["Name"] for b in moto.s3().list_buckets()["Buckets"]]


def test_credentials_refused_is_an_l2_error_without_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    # moto checks signatures against its IAM users when INITIAL_NO_AUTH_ACTION_COUNT runs out: ours is unknown.
    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "1"}).start()  # the one free action: the bucket
    try:
        adapter = create_backend(l2(server.endpoint, "creds", shared=True))
        with caplog.at_level(logging.WARNING), pytest.raises(L2Error, match="credential_errors") as info:
            adapter.contains(["k"])
        assert CREDS["secret_access_key"] not in str(info.value) + caplog.text + json.dumps(adapter.stats())
        assert adapter.stats()["credential_errors"] == 1
        adapter.close()
    finally:
        server.stop()


class FaultProxy:
    """An HTTP proxy in front of the S3 endpoint that answers the first ``fail`` requests with ``503 SlowDown``
    (or, with ``stall``, holds them past the client's timeout), then forwards."""

    def __init__(self, target_port: int) -> None:
        self.fail = 0
        self.stall = 0.0
        self.stall_methods = {"GET", "PUT", "POST", "DELETE", "HEAD"}
        self.truncate = False  # GET bodies: send half of it under the full Content-Length, then hang up
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests += 1
                if proxy.stall and self.command in proxy.stall_methods:
                    time.sleep(proxy.stall)
                if proxy.fail > 0:
                    proxy.fail -= 1
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = self.headers["Host"]
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if proxy.truncate and self.command == "GET" and len(data) > 1000:
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                elif self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # type: ignore[method-assign] # a client gone
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_throttling_is_retried_with_backoff_then_fails_the_batch(
    moto: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = FaultProxy(moto.port)
    try:
        adapter = create_backend(l2(proxy.endpoint, f"slow/{uuid.uuid4().hex[:8]}", shared=True, max_retries=2))
        adapter.contains(["warm"])  # the start-up bucket check and one probe
        proxy.fail, proxy.requests = 2, 0
        adapter.store_records(["k"], [[b"value"]])  # two 503s, then through
        assert proxy.requests == 3 and adapter.stats()["failed_batches"] == 0
        proxy.fail, proxy.requests = 1000, 0
        with caplog.at_level(logging.WARNING), pytest.raises(L2Error, match="throttled"):
            adapter.store_records(["j"], [[b"value"]])
        assert proxy.requests == 3, "bounded: the first try and max_retries more"
        with pytest.raises(L2Error):
            adapter.contains(["k"])
        assert caplog.text.count("batches fail until it is back") == 1
        proxy.fail = 0
        assert adapter.contains(["k", "j"]) == [True, False], "the batch that failed left nothing"
        assert "reachable again" in caplog.text
        adapter.close()
    finally:
        proxy.close()


def test_a_stalled_endpoint_times_out_as_an_l2_error(moto: MotoServer) -> None:
    proxy = FaultProxy(moto.port)
    try:
        adapter = create_backend(
            {**l2(proxy.endpoint, f"stall/{uuid.uuid4().hex[:8]}", shared=True), "timeout_s": 0.3, "max_retries": 0}
        )
        adapter.contains(["warm"])
        proxy.stall = 1.0
        start = time.monotonic()
        with pytest.raises(L2Error, match="timeouts"):
            adapter.contains(["k"])
        assert time.monotonic() - start < 5
        adapter.close()
    finally:
        proxy.stall = 0
        proxy.close()


def test_oversized_batch_leaves_the_index_unchanged(moto: MotoServer) -> None:
    with create_backend(l2(moto.endpoint, f"cap/{uuid.uuid4().hex[:8]}", max_capacity_gb=5000 / (1 << 30))) as a:
        a.store_records(["a", "b"], [[bytes(2000)], [bytes(2000)]])
        with pytest.raises(CapacityError):
            a.store_records(["c"], [[bytes(6000)]])
        assert a.contains(["a", "b", "c"]) == [True, True, False] and a.used_bytes == 4000


def test_bench_l2_object_store_runs_beside_the_plain_client(moto: MotoServer) -> None:
    import argparse

    from kvtier.bench import l2

    parser = argparse.ArgumentParser()
    l2.add_arguments(parser)
    argv = ["--adapter", "object_store", "--endpoint", moto.endpoint, "--bucket", BUCKET, "--sizes", "1"]
    args = parser.parse_args([*argv, "--mib-per-round", "2", "--rounds", "1", "--batch", "2", "--serde", "fp8"])
    with pytest.MonkeyPatch.context() as mp:
        for k, v in TEST_CREDENTIALS.items():
            mp.setenv(f"AWS_{k.upper()}", v)  # --endpoint takes credentials from the environment, as a user's would
        mp.setenv("AWS_REGION", "us-east-1")
        report = l2.run(args)
    figures = {f.name: f for f in report.figures}
    assert figures["kvtier load 1 MiB"].note.endswith("bit-exact: True")
    assert figures["kvtier store 1 MiB: KV per client CPU-second"].baseline == "plain put 1 MiB"
    assert "kvtier+fp8 load 1 MiB" in figures
    assert moto.names("kvtier-bench-") == [], "the bench removes what it stored"


def test_a_record_being_read_is_never_evicted(moto: MotoServer) -> None:
    """Eviction between two steps of a load: the GET of the least recently used record is held by the proxy
    while a store needs room; the pinned record survives and another is evicted."""
    proxy = FaultProxy(moto.port)
    try:
        adapter = create_backend(
            l2(proxy.endpoint, f"pin/{uuid.uuid4().hex[:8]}", max_capacity_gb=5000 / (1 << 30), timeout_s=10)
        )
        with adapter:
            adapter.store_records(["old"], [[b"o" * 2000]])
            adapter.store_records(["mid"], [[b"m" * 2000]])
            proxy.stall, proxy.stall_methods = 1.0, {"GET"}
            got: list[int] = []
            buf = bytearray(2000)
            reader = threading.Thread(target=lambda: got.extend(adapter.load_records(["old"], [[buf]])))
            reader.start()
            time.sleep(0.3)  # the GET of "old" is in flight (held by the proxy)
            adapter.store_records(["new"], [[b"n" * 2000]])  # needs room: "old" is the oldest but pinned
            reader.join()
            assert got == [2000] and bytes(buf) == b"o" * 2000
            proxy.stall = 0
            assert adapter.contains(["old", "mid", "new"]) == [True, False, True]
    finally:
        proxy.close()


def test_two_kvtier_servers_share_one_bucket_through_an_endpoint_restart() -> None:
    from kvtier import client as client_module
    from kvtier.server import process

    s3 = MotoServer().start()
    chunk_tokens = 16

    def data(i: int) -> torch.Tensor:
        return torch.randn((2, 2, chunk_tokens, 64), generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)

    def wait_for(fn: Any, want: int, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        got = fn()
        while got != want and time.monotonic() < deadline:
            time.sleep(0.05)
            got = fn()
        return int(got)

    config = json.dumps(l2(s3.endpoint, f"servers/{uuid.uuid4().hex[:8]}", shared=True, serde={"type": "fp8"}))
    args = ["--l1-size-gb", "0.0625", "--chunk-size", str(chunk_tokens), "--l2-adapter", config]
    try:
        with (
            process.ServerProcess([*args, "--log-level", "info"]) as a,
            process.ServerProcess([*args, "--log-level", "warning"]) as b,
            client_module.Client(a.address, timeout_s=20) as ca,
            client_module.Client(b.address, timeout_s=20) as cb,
        ):
            keys = ca.keys_for_tokens("org/shared", list(range(2 * chunk_tokens)), cache_salt="tenant-a")
            ca.store(keys, [data(0), data(1)])
            assert wait_for(lambda: cb.lookup(keys), 2) == 2, "stored through A, a hit through B"
            got = cb.retrieve(keys)
            assert got[1] is not None and torch.allclose(got[1].float(), data(1).float(), rtol=0.07, atol=0.02)
            other = cb.keys_for_tokens("org/shared", list(range(2 * chunk_tokens)), cache_salt="tenant-b")
            assert cb.lookup(other) == 0, "cache_salt isolation holds across servers"

            s3.stop()
            more = ca.keys_for_tokens("org/shared", list(range(4 * chunk_tokens)), cache_salt="tenant-a")[2:]
            ca.store(more, [data(2), data(3)])  # S3 down: the store still lands in A's L1
            assert ca.lookup(more) == 2

            s3.start()  # moto forgot everything: the bucket is created again, both servers carry on
            later = ca.keys_for_tokens("org/shared", list(range(6 * chunk_tokens)), cache_salt="tenant-a")[4:]
            ca.store(later, [data(4), data(5)])
            assert wait_for(lambda: cb.lookup(later), 2) == 2, "written through again after the restart"
            logged, stats = a.stderr(), json.dumps(a.get("/stats"))
            assert "serving" in logged and "object_store" in logged and "object store" in logged  # the outage
            for secret in (CREDS["secret_access_key"], CREDS["access_key_id"]):
                assert secret not in logged and secret not in stats, "options never in logs or stats"
    finally:
        s3.stop()


def test_the_same_key_stored_again_and_again_costs_one_upload(moto: MotoServer) -> None:
    with create_backend(l2(moto.endpoint, f"again/{uuid.uuid4().hex[:8]}", max_capacity_gb=1)) as adapter:
        buf = bytearray(3000)
        for i in range(300):
            adapter.store_records(["k"], [[bytes([i % 7]) * 3000]])
            assert adapter.load_records(["k"], [[buf]]) == [3000]
        assert adapter.used_bytes == 3000 and adapter.stats()["records"] == 1
        assert adapter.stats()["uploads"] == 1 and adapter.stats()["uploads_skipped"] == 299
        assert bytes(buf) == bytes(3000), "the first record, written once"


def test_an_endpoint_down_at_start_then_up(caplog: pytest.LogCaptureFixture) -> None:
    server = MotoServer()  # not started: connection refused
    adapter = create_backend(l2(server.endpoint, "late", max_retries=0))
    try:
        with pytest.raises(L2Error, match="connection_errors"):
            adapter.contains(["k"])  # the start (listing the prefix) fails: the next operation tries again
        assert not adapter.started
        server.start()
        adapter.store_records(["k"], [[b"v"]])
        assert adapter.contains(["k"]) == [True] and adapter.started
    finally:
        adapter.close()
        server.stop()


def test_the_server_start_up_log_masks_credentials() -> None:
    from kvtier.config import redact_config, secret_values

    config = {
        "l1_size_gb": 1,
        "l2_adapters": [
            {"type": "object_store", "url": "s3://b/p", "options": {"secret_access_key": "s3cr3t", "region": "x"}},
            {"type": "redis", "url": "redis://:hunter2@cache:6379/0"},
            {"type": "faulty", "inner": {"type": "object_store", "url": "s3://b/q", "options": {"sas_key": "zz"}}},
        ],
    }
    text = json.dumps(redact_config(config))
    assert "s3cr3t" not in text and "hunter2" not in text and '"zz"' not in text
    assert "redis://:***@cache:6379/0" in text and "s3://b/p" in text
    # every option value counts as a secret for the scrubbing of free text (an error quoting a value)
    assert {"s3cr3t", "zz", "x", "hunter2"} <= set(secret_values(config))


def test_a_body_cut_short_is_an_l2_error_and_a_miss_never_wrong_kv(moto: MotoServer) -> None:
    proxy = FaultProxy(moto.port)
    try:
        config = l2(proxy.endpoint, f"cut/{uuid.uuid4().hex[:8]}", max_retries=1)
        store = Store(l1_size_gb=0.01, l2_adapters=[config])
        with store:
            keys_ = store.keys_for_tokens("org/m", list(range(512)))[:2]
            store.store(keys_, [chunk(0), chunk(1)])
            store.flush()
            store.clear_l1()
            proxy.truncate = True
            assert store.retrieve(keys_) == [None, None], "a torn transfer is a miss"
            (tier,) = store._tiers
            with pytest.raises(L2Error):
                tier.adapter.load_records([keys_[0].to_str()], [[bytearray(chunk(0).nbytes + 4096)]])
            proxy.truncate = False
            got = store.retrieve(keys_)
            assert got[0] is not None and torch.equal(got[0], chunk(0)), "the record itself was never damaged"
    finally:
        proxy.close()


def test_reading_back_a_record_this_server_stored_is_one_request(moto: MotoServer) -> None:
    proxy = FaultProxy(moto.port)
    try:
        with create_l2_adapter(l2(proxy.endpoint, f"one/{uuid.uuid4().hex[:8]}")) as tier:
            ks = keys(2)
            tier.store(ks, [chunk(0), chunk(1)])
            proxy.requests = 0
            assert tier.contains(ks) == [True, True]
            layouts = tier.layouts(ks)
            assert proxy.requests == 0, "lookup and header parse from what the server knows"
            outs = [torch.empty(lay.shape, dtype=lay.dtype) for lay in layouts if lay is not None]
            assert tier.load_into(ks, outs) == [True, True] and torch.equal(outs[1], chunk(1))
            assert proxy.requests == 2, "one GET per record"
    finally:
        proxy.close()


def test_an_option_the_client_panics_on_is_a_config_error() -> None:
    # obstore's Rust core panics on some keys (a PanicException, a BaseException): a clear ConfigError at start.
    config = {"type": "object_store", "url": "s3://b/p", "options": {**CREDS, "allow_http": "true"}}
    with pytest.raises(ConfigError, match=r"l2_adapter\.options"):
        create_l2_adapter(config).adapter.new_client()
