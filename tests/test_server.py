"""``kvtier server`` and ``kvtier.Client``: a real server subprocess on free ports, real client processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import zmq
from prometheus_client.parser import text_string_to_metric_families

from kvtier import ObjectKey
from kvtier.cli import main as cli_main
from kvtier.client import Client
from kvtier.errors import ConfigError
from kvtier.server import protocol as p
from kvtier.server.process import ServerProcess, free_port
from kvtier.server.protocol import ProtocolError, ServerUnavailableError

sys.path.insert(0, str(Path(__file__).parent))
from server_worker import content, same_bytes

WORKER = str(Path(__file__).parent / "server_worker.py")
CHUNK = 16  # tokens per chunk in these tests: small prompts, small data


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    args = ["--l1-size-gb", "0.125", "--chunk-size", str(CHUNK), "--max-message-mb", "1", "--log-level", "warning"]
    with ServerProcess(args) as s:
        yield s


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.address, timeout_s=20) as c:
        yield c


def run_worker(*args: str, timeout: float = 120) -> dict[str, Any]:
    out = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- data path ----------------------------------------------------------------------------------------------
def test_store_in_one_process_retrieve_in_another(server: ServerProcess, client: Client) -> None:
    result = run_worker("store", server.address, "test/xproc", "3")
    assert result == {"stored": 3, "shm": True}
    keys = client.keys_for_tokens("test/xproc", list(range(3 * CHUNK)))
    got = client.retrieve(keys)
    assert all(t is not None and same_bytes(t, content(k)) for k, t in zip(keys, got, strict=True))
    outs = [client.empty(content(k).shape, torch.bfloat16) for k in keys]
    assert client.retrieve_into(keys, outs) == 3
    assert all(same_bytes(o, content(k)) for k, o in zip(keys, outs, strict=True))


def test_frames_path_without_shared_memory(server: ServerProcess, client: Client) -> None:
    keys = [ObjectKey("test/frames", format(0xF00 + i, "x")) for i in range(3)]
    with Client(server.address, shm=False, timeout_s=20) as remote:
        assert not remote.shm_enabled
        remote.store(keys, [content(k) for k in keys])
        got = remote.retrieve(keys)
        assert all(t is not None and same_bytes(t, content(k)) for k, t in zip(keys, got, strict=True))
        outs = [torch.empty_like(content(k)) for k in keys]
        assert remote.retrieve_into(keys, outs) == 3
        assert all(same_bytes(o, content(k)) for k, o in zip(keys, outs, strict=True))
    got = client.retrieve(keys)  # stored as frames, read back through shared memory
    assert all(t is not None and same_bytes(t, content(k)) for k, t in zip(keys, got, strict=True))


def test_staging_grows_for_large_and_non_contiguous_tensors(server: ServerProcess) -> None:
    with Client(server.address, staging_bytes=16 << 10, timeout_s=20) as c:
        key = ObjectKey("test/big", "b16")
        big = torch.randn(2, 4, 64, 256).to(torch.bfloat16)  # 256 KiB > the 16 KiB staging region
        c.store([key], [big.transpose(2, 3).contiguous().transpose(2, 3)])  # non-contiguous view of the same data
        (got,) = c.retrieve([key])
        assert got is not None and same_bytes(got, big)
        out = torch.empty_like(big)
        assert c.retrieve_into([key], [out]) == 1 and same_bytes(out, big)


def test_lookup_prefix_lengths(client: Client) -> None:
    tokens = list(range(1000, 1000 + 5 * CHUNK + 7))  # 5 full chunks and a partial tail
    keys = client.keys_for_tokens("test/prefix", tokens)
    assert len(keys) == 5
    assert client.lookup(keys) == 0 and client.lookup_tokens("test/prefix", tokens) == 0
    client.store(keys[:3], [content(k) for k in keys[:3]])
    assert client.lookup(keys) == 3
    assert client.lookup_tokens("test/prefix", tokens) == 3 * CHUNK
    assert client.lookup_tokens("test/prefix", tokens[: 2 * CHUNK + 3]) == 2 * CHUNK
    client.store(keys[4:], [content(keys[4])])  # a gap at chunk 3: the prefix still ends there
    assert client.lookup(keys) == 3
    assert client.lookup_tokens("test/prefix", tokens) == 3 * CHUNK
    other = [*tokens[:CHUNK], -1, *tokens[CHUNK + 1 :]]  # differs in chunk 1: every later key differs too
    assert client.lookup_tokens("test/prefix", other) == CHUNK
    got = client.retrieve(keys)
    assert [t is not None for t in got] == [True, True, True, False, False]


def test_salt_isolation(client: Client) -> None:
    tokens = list(range(2 * CHUNK))
    a = client.keys_for_tokens("test/salt", tokens, cache_salt="tenant-a")
    b = client.keys_for_tokens("test/salt", tokens, cache_salt="tenant-b")
    client.store(a, [content(k) for k in a])
    assert client.lookup_tokens("test/salt", tokens, cache_salt="tenant-a") == 2 * CHUNK
    assert client.lookup_tokens("test/salt", tokens, cache_salt="tenant-b") == 0
    assert client.lookup_tokens("test/salt", tokens) == 0
    assert client.lookup(b) == 0 and client.retrieve(b) == [None, None]
    outs = [torch.full_like(content(k), 7.0) for k in a]
    assert client.retrieve_into(b, outs) == 0
    assert all(torch.all(o == 7.0) for o in outs)
    # Same chunk hash, another salt, in a hand-made key: still isolated.
    foreign = ObjectKey(a[0].model_name, a[0].chunk_hash, a[0].kv_rank, "tenant-b")
    assert client.lookup([foreign]) == 0


def test_eight_concurrent_clients_check_every_chunk(server: ServerProcess) -> None:
    # Two processes with four clients (threads, each its own Client and connection) each: eight at once.
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "mix", server.address, str(first), "4", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for first in (0, 4)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.extend(json.loads(line) for line in out.strip().splitlines())
    assert len(results) == 8
    assert sum(r["mismatch"] for r in results) == 0
    assert all(r["store"] and r["retrieve"] and r["retrieve_into"] and r["lookup"] for r in results)
    assert sum(r["checked"] for r in results) > 100  # the check ran on real hits, not on misses only
    assert sum(r["shm"] for r in results) == 6  # two clients went through frames


def test_shared_memory_buffer_store_and_retrieve_is_in_place(client: Client) -> None:
    key = ObjectKey("test/inplace", "1f")
    data = content(ObjectKey("x", "2f"))
    regions_before = client.stats()["server"]["shm_regions"]
    buf = client.empty(data.shape, torch.bfloat16)
    buf.copy_(data)
    client.store([key], [buf])
    out = client.empty(data.shape, torch.bfloat16)
    ptr = out.data_ptr()
    assert client.retrieve_into([key], [out]) == 1
    assert out.data_ptr() == ptr and same_bytes(out, buf)
    assert client.stats()["server"]["shm_regions"] == regions_before + 2
    del buf, out  # regions released with the tensors, unregistered with the next request
    assert client.lookup([key]) == 1
    assert client.stats()["server"]["shm_regions"] == regions_before


# -- robustness ---------------------------------------------------------------------------------------------
def _raw_request(address: str, frames: list[bytes], timeout_ms: int = 10000) -> list[bytes]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply from the server"
        return sock.recv_multipart()
    finally:
        sock.close()


def _error_of(reply: list[bytes]) -> p.ErrorReply:
    body = p.decode_reply(p.decode_envelope(reply[0]))
    assert isinstance(body, p.ErrorReply), body
    return body


def test_garbage_and_malformed_messages_get_error_replies(server: ServerProcess, client: Client) -> None:
    enc = msgspec.msgpack.encode
    key = p.WireKey("test/garbage", "ab")
    meta = p.Meta((2, 2), "bfloat16")
    cases: list[tuple[list[bytes], str]] = [
        ([b"\xff\x00garbage"], "protocol"),
        ([b""], "protocol"),
        ([p.encode(1, p.Health())[:-1]], "protocol"),  # truncated
        ([enc([p.PROTOCOL_VERSION + 1, 5, b"\x90"])], "version"),
        ([enc([p.PROTOCOL_VERSION, 6, enc(["no_such_op"])])], "protocol"),
        ([enc([p.PROTOCOL_VERSION, 7, enc(["lookup", "not a list"])])], "protocol"),
        ([p.encode(8, p.Store([key], [meta], None))], "protocol"),  # data frame missing
        ([p.encode(9, p.Store([key], [meta], None)), b"123"], "protocol"),  # wrong size
        ([p.encode(10, p.Store([key], [p.Meta((2,), "nonsense")], None)), b"1234"], "invalid"),
        ([p.encode(11, p.Store([key], [meta], [p.Loc(999_999, 4096, 8)]))], "region"),  # unknown region
        ([p.encode(12, p.Lookup([p.WireKey("bad name with spaces", "ab")]))], "invalid"),
        ([p.encode(13, p.Health()), b"unexpected"], "protocol"),
        ([p.encode(14, p.Retrieve([key], [meta], None))], "protocol"),
        ([p.encode(15, p.Retrieve([key])), b"data"], "protocol"),  # a retrieve carries no data
        ([p.encode(16, p.Store([key], [p.Meta((1,) * 70, "uint8")], None)), b"x"], "protocol"),  # too many dims
        ([p.encode(17, p.Store([key], [p.Meta((-1, 2), "uint8")], None)), b"x"], "protocol"),  # negative dim
    ]
    for frames, kind in cases:
        err = _error_of(_raw_request(server.address, frames))
        assert err.kind == kind, (frames[0][:40], err)
    # A location outside the client's own registered region is refused, not followed.
    staging = client._staging
    assert staging is not None
    for offset in (staging.size - 4, 0, 4097):  # past the end, over the token page, misaligned
        with pytest.raises(ProtocolError, match="outside region"):
            client._call(p.Store([key], [meta], [p.Loc(staging.region_id, offset, 8)]))
    # Another connection cannot name this client's region, to read or to write.
    inside = p.Loc(staging.region_id, 4096, 8)
    assert _error_of(_raw_request(server.address, [p.encode(15, p.Store([key], [meta], [inside]))])).kind == "region"
    steal = p.Retrieve([key], [meta], [inside])
    assert _error_of(_raw_request(server.address, [p.encode(16, steal)])).kind == "region"
    # Registering memory that is not a kvtier client's memfd (here: this process's stdin) is refused.
    fake = p.Register(os.getpid(), 0, 1 << 20, bytes(16))
    reply = p.decode_reply(p.decode_envelope(_raw_request(server.address, [p.encode(17, fake)])[0]))
    assert isinstance(reply, p.RegisterReply) and reply.region == -1
    # Not ZeroMQ at all: the connection is dropped, the server carries on.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 64)
    assert client.health()["status"] == "ok"
    assert client.lookup([ObjectKey("test/garbage", "ab")]) == 0


def test_oversized_messages_are_refused_and_the_server_carries_on(server: ServerProcess) -> None:
    s = server  # started with --max-message-mb 1
    if True:
        key = p.WireKey("test/big", "ab")
        meta = p.Meta((1_500_000,), "uint8")
        reply = _raw_request(s.address, [p.encode(3, p.Store([key], [meta], None)), bytes(1_500_000)])
        err = _error_of(reply)
        assert err.kind == "too_large" and "max_message_bytes" in err.message
        assert p.decode_envelope(reply[0]).id == 3
        with Client(s.address, shm=False, timeout_s=10) as c:
            with pytest.raises(ProtocolError, match=r"too_large|exceeds"):
                c.store([ObjectKey("test/big", "ab")], [torch.zeros(1_500_000, dtype=torch.uint8)])
            # Beyond the hard limit libzmq drops the connection without reading the message.
            ctx = zmq.Context.instance()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(s.address)
            sock.send_multipart([p.encode(4, p.Health()), bytes(24 << 20)])
            time.sleep(0.5)
            sock.close()
            assert c.health()["status"] == "ok"
            c.store([ObjectKey("test/big", "cd")], [torch.ones(1000, dtype=torch.uint8)])
            assert c.lookup([ObjectKey("test/big", "cd")]) == 1


def test_client_errors_when_no_server_listens() -> None:
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="is it running"):
        Client(f"tcp://127.0.0.1:{free_port()}", connect_timeout_s=0.5)
    assert time.monotonic() - start < 5
    with pytest.raises(ConfigError, match="address"):
        Client("localhost:5555")


def test_protocol_version_mismatch_is_refused_by_the_client() -> None:
    env = msgspec.msgpack.encode([p.PROTOCOL_VERSION + 1, 1, msgspec.msgpack.encode(["ok"])])
    with pytest.raises(ProtocolError, match="version"):
        p.decode_envelope(env)


# -- admin HTTP ---------------------------------------------------------------------------------------------
def test_admin_endpoints_and_metrics_parse(server: ServerProcess, client: Client) -> None:
    key = ObjectKey("test/admin", "ad")
    client.store([key], [content(key)])
    client.retrieve([key, ObjectKey("test/admin", "ae")])
    health = server.get("/health")
    assert health["status"] == "ok" and health["protocol"] == p.PROTOCOL_VERSION
    stats = server.get("/stats")
    assert stats["store"]["l1"]["objects"] >= 1 and stats["server"]["shm_regions"] >= 1
    assert client.stats()["store"]["chunk_size"] == CHUNK
    families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics"))}
    for name in ("kvtier_requests", "kvtier_request_seconds", "kvtier_data_bytes", "kvtier_store_l1_used_bytes"):
        assert name in families, sorted(families)
    stores = [s for s in families["kvtier_requests"].samples if s.labels.get("op") == "store"]
    assert sum(s.value for s in stores if s.name == "kvtier_requests_total") >= 1
    assert families["kvtier_store_l1_hits"].type == "counter"
    assert server.post("/clear") == {"cleared": "l1"}
    assert client.lookup([key]) == 0  # no L2 tier: gone
    with pytest.raises(urllib.error.HTTPError) as info:
        server.get("/nope")
    assert info.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.http_url + "/clear", timeout=5)
    assert info.value.code == 405


# -- lifecycle ------------------------------------------------------------------------------------------------
def test_sigterm_drains_acknowledged_l2_writes(tmp_path: Path) -> None:
    l2 = json.dumps({"type": "fs", "base_path": str(tmp_path / "l2"), "durability": "fsync"})
    args = ["--l1-size-gb", "0.0625", "--chunk-size", str(CHUNK), "--l2-adapter", l2, "--log-level", "info"]
    keys = [ObjectKey("test/drain", format(0xD000 + i, "x")) for i in range(24)]
    data = [torch.randn(2, 4, CHUNK, 256).to(torch.bfloat16) for _ in keys]  # 64 KiB each
    s = ServerProcess(args).start()
    c = Client(s.address, timeout_s=20)
    try:
        for k, t in zip(keys, data, strict=True):
            c.store([k], [t])  # acknowledged: in L1 and queued for the fs tier
        store_stats = c.stats()["store"]
        assert store_stats["l2_writes_dropped"] == 0  # every acknowledged write was queued, none shed
        assert s.stop(signal.SIGTERM) == 0
        log = s.stderr()
        assert '"flushing pending L2 writes"' in log and '"stopped"' in log, log
        # The server is gone: a call fails within the client's timeout with a clear error, no hang.
        c.timeout_s = 1.0
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="is it running"):
            c.lookup(keys[:1])
        assert time.monotonic() - start < 5
    finally:
        s.close()
    # A new server on the same ports and base_path: the same client carries on (it registers its shared memory
    # again when the new server does not know it) and every acknowledged chunk comes back from fs.
    c.timeout_s = 20
    with ServerProcess(args, port=s.port, http_port=s.http_port) as s2:
        assert c.stats()["store"]["l1"]["objects"] == 0  # a fresh L1: everything below comes from fs
        got = c.retrieve(keys)
        pending = store_stats["l2_pending_writes"]
        assert all(g is not None and same_bytes(g, t) for g, t in zip(got, data, strict=True)), pending
        outs = [torch.empty_like(t) for t in data]
        assert c.retrieve_into(keys, outs) == len(keys)
        assert all(same_bytes(o, t) for o, t in zip(outs, data, strict=True))
        assert c.shm_enabled
        c.close()
        assert s2.stop(signal.SIGINT) == 0


# -- configuration errors ------------------------------------------------------------------------------------
def _config_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli_main(["server", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("kvtier: error: "), err
    return err


def test_config_errors_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port, http = free_port(), free_port()
    base = ["--l1-size-gb", "0.0625", "--port", str(port), "--http-port", str(http)]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "bad.yaml").write_text("l1_size_gb: 1\nchunk_size: big\n")
    (tmp_path / "unknown.json").write_text('{"l1_size_gb": 1, "chunk_sise": 256}')
    (tmp_path / "broken.json").write_text('{"l1_size_gb": ')
    (tmp_path / "adapters.yaml").write_text("l1_size_gb: 1\nl2_adapters: {type: fs}\n")
    cases = [
        (["--l2-adapter", "{type: fs}"], ["--l2-adapter #1", "invalid JSON", "expected"]),
        (["--l2-adapter", '["fs"]'], ["--l2-adapter #1", "expected a JSON object"]),
        (["--l2-adapter", '{"type": "nosuch"}'], ["l2_adapters[0].type", "unknown L2 adapter", "nosuch"]),
        (
            ["--l2-adapter", json.dumps({"type": "memory", "serde": {"type": "nosuch"}})],
            ["l2_adapters[0]", "serde", "nosuch"],
        ),
        (["--l2-adapter", '{"type": "fs"}'], ["l2_adapters[0].base_path", "required"]),
        (["--l2-adapter", '{"base_path": "/tmp/x"}'], ["l2_adapters[0].type", "expected"]),
        (
            ["--l2-adapter", json.dumps({"type": "fs", "base_path": str(a_file / "l2")})],
            ["l2_adapters[0].base_path", "cannot write", "expected a writable directory"],
        ),
        (["--eviction-policy", "MRU"], ["eviction_policy", "expected one of"]),
        (["--chunk-size", "0"], ["chunk_size", "expected a value >= 1"]),
        (["--config", str(tmp_path / "bad.yaml")], ["chunk_size", "expected an integer", "big"]),
        (["--config", str(tmp_path / "unknown.json")], ["chunk_sise", "unknown field"]),
        (["--config", str(tmp_path / "broken.json")], ["--config", "not valid JSON"]),
        (["--config", str(tmp_path / "missing.yaml")], ["--config", "cannot read"]),
        (["--config", str(tmp_path / "adapters.yaml")], ["l2_adapters", "expected a list"]),
        (["--http-port", str(port)], ["http_port", "expected a port other than port"]),
    ]
    for extra, needles in cases:
        err = _config_error([*base, *extra], capsys)
        for needle in needles:
            assert needle in err, (extra, err)
    # Missing l1_size_gb (no flag, no file).
    assert "l1_size_gb: required field is missing" in _config_error(["--port", str(port)], capsys)
    # Ports in use.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        err = _config_error(["--l1-size-gb", "0.0625", "--port", taken, "--http-port", str(http)], capsys)
        assert "host/port:" in err and "Address already in use" in err and "a free TCP port" in err
        err = _config_error(["--l1-size-gb", "0.0625", "--port", str(port), "--http-port", taken], capsys)
        assert "http_port:" in err and "expected a free TCP port" in err
    err = _config_error([*base, "--host", "203.0.113.7"], capsys)  # not an address of this host
    assert "host/port:" in err and "expected an address of this host" in err


def test_config_error_exits_nonzero_before_serving(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "server", "--l1-size-gb", "1", "--l2-adapter", '{"type": "fs"'],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("kvtier: error: --l2-adapter #1: invalid JSON")
    assert "serving" not in out.stderr


def test_config_file_with_flag_overrides(tmp_path: Path) -> None:
    from kvtier.server.config import ServerConfig, add_arguments, config_from_args

    cfg = tmp_path / "kvtier.yaml"
    cfg.write_text(
        "l1-size-gb: 2\neviction_policy: LFU\nchunk_size: 128\n"
        f"l2_adapters:\n  - type: fs\n    base_path: {tmp_path / 'l2'}\n"
    )
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--config", str(cfg), "--chunk-size", "64", "--port", "7000"]))
    assert config == ServerConfig(
        l1_size_gb=2.0,
        eviction_policy="LFU",
        l2_adapters=[{"type": "fs", "base_path": str(tmp_path / "l2")}],
        chunk_size=64,
        port=7000,
    )
    memory = json.dumps({"type": "memory"})
    config = config_from_args(parser.parse_args(["--config", str(cfg), "--l2-adapter", memory]))
    assert config.l2_adapters == [{"type": "memory"}]


# -- the request handler under fuzzing (in process, real Store) ----------------------------------------------------
def test_handler_never_raises_on_arbitrary_input() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from kvtier import Store
    from kvtier.server.config import ServerConfig
    from kvtier.server.metrics import ServerMetrics
    from kvtier.server.server import RequestHandler
    from kvtier.server.shm import RegionTable

    store = Store(l1_size_gb=0.001, chunk_size=4)
    regions = RegionTable()
    metrics = ServerMetrics(store.stats, lambda: 0)
    handler = RequestHandler(store, ServerConfig(l1_size_gb=0.001), metrics, regions, serialize_store=False)
    ops = ["hello", "register", "unregister", "store", "lookup", "lookup_tokens", "keys_for_tokens", "retrieve", "x"]
    leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8)
    value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
    bodies = st.tuples(st.sampled_from(ops), st.lists(value, max_size=4)).map(lambda t: [t[0], *t[1]])
    headers = st.binary(max_size=64) | bodies.map(
        lambda b: msgspec.msgpack.encode([p.PROTOCOL_VERSION, 1, msgspec.msgpack.encode(b)])
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(headers, st.lists(st.binary(max_size=32), max_size=3))
    def check(header: bytes, data: list[bytes]) -> None:
        reply = handler.handle([zmq.Frame(header), *(zmq.Frame(d) for d in data)], b"fuzz")
        body = p.decode_reply(p.decode_envelope(reply[0]))
        assert isinstance(body, p.Reply.__args__)  # type: ignore[attr-defined]
        if isinstance(body, p.ErrorReply):
            assert body.kind in p.ERROR_KINDS and body.kind != "internal", body

    try:
        check()
        # Still serving after all of it.
        key = ObjectKey("test/fuzz", "ab")
        store.store([key], [torch.ones(4)])
        reply = handler.handle([zmq.Frame(p.encode(2, p.Lookup([p.WireKey.of(key)])))], b"fuzz")
        assert p.decode_reply(p.decode_envelope(reply[0])) == p.CountReply(1)
    finally:
        regions.close()
        store.close()
