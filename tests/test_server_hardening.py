"""``kvtier server`` against hostile and unlucky clients: lying shared memory, deep nesting, floods of garbage, a
server that dies or stops under its clients. Real server subprocesses; faults injected by real processes."""

from __future__ import annotations

import mmap
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import torch
import zmq

from kvtier import ObjectKey
from kvtier.client import Client
from kvtier.server import protocol as p
from kvtier.server.process import ServerProcess
from kvtier.server.protocol import ServerUnavailableError
from kvtier.server.shm import MEMFD_NAME, TOKEN_BYTES

CHUNK = 16


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    args = ["--l1-size-gb", "0.0625", "--chunk-size", str(CHUNK), "--log-level", "info"]
    with ServerProcess(args) as s:
        yield s


class RawClient:
    """One DEALER connection speaking the protocol by hand (a client that may lie)."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, b"k" + secrets.token_bytes(15))
        self.sock.connect(address)
        self._ids = iter(range(1, 1 << 30))

    def call(self, body: Any, *frames: bytes, timeout_ms: int = 10000) -> Any:
        self.sock.send_multipart([p.encode(next(self._ids), body), *frames])
        assert self.sock.poll(timeout_ms), "no reply from the server"
        return p.decode_reply(p.decode_envelope(self.sock.recv_multipart()[0]))

    def send_raw(self, frames: list[bytes], timeout_ms: int = 10000) -> p.ErrorReply:
        self.sock.send_multipart(frames)
        assert self.sock.poll(timeout_ms), "no reply from the server"
        reply = p.decode_reply(p.decode_envelope(self.sock.recv_multipart()[0]))
        assert isinstance(reply, p.ErrorReply), reply
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)


def _unsealed_region(size: int) -> tuple[int, mmap.mmap, bytes]:
    """A memfd named like a kvtier client's, with a token, but without seals (what an old or hostile client makes)."""
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mem = mmap.mmap(fd, size)
    token = secrets.token_bytes(TOKEN_BYTES)
    mem[:TOKEN_BYTES] = token
    return fd, mem, token


# -- defect 4: a client shrinks its memfd under the server -----------------------------------------------------
def test_unsealed_memfd_is_refused_and_shrinking_cannot_crash_the_server(server: ServerProcess) -> None:
    size = 1 << 20
    fd, mem, token = _unsealed_region(size)
    raw = RawClient(server.address)
    try:
        reply = raw.call(p.Register(os.getpid(), fd, size, token))
        assert isinstance(reply, p.RegisterReply)
        if reply.region >= 0:
            # The old server mapped it: shrink it under the mapping and name an offset past the new end. A server
            # that maps unsealed memory dies of SIGBUS here; the assertions below then fail.
            mem.close()
            os.ftruncate(fd, 4096)
            key = p.WireKey("test/shrink", "ab")
            meta = p.Meta((4096,), "uint8")
            raw.sock.send_multipart([p.encode(99, p.Store([key], [meta], [p.Loc(reply.region, 1 << 19, 4096)]))])
            raw.sock.poll(5000)
        assert reply.region == -1 and "sealed" in reply.reason, reply
        for _ in range(20):  # again and again: refused each time, logged once a minute
            again = raw.call(p.Register(os.getpid(), fd, size, token))
            assert isinstance(again, p.RegisterReply) and again.region == -1
    finally:
        raw.close()
        if not mem.closed:
            mem.close()
        os.close(fd)
    assert server.proc is not None and server.proc.poll() is None, server.stderr()
    assert server.get("/health")["status"] == "ok"
    assert server.stderr().count('"shared memory refused"') == 1, server.stderr()


def test_client_regions_are_sealed_and_cannot_shrink(server: ServerProcess) -> None:
    import fcntl

    with Client(server.address, timeout_s=20) as c:
        buf = c.empty((1024,), torch.uint8)
        region = c._regions[0]
        seals = fcntl.fcntl(region.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 4096)
        with pytest.raises(PermissionError):
            fcntl.fcntl(region.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # sealed for good
        buf.fill_(7)
        key = ObjectKey("test/sealed", "5e")
        c.store([key], [buf])
        assert c.retrieve([key])[0] is not None


# -- defect 8: deep nesting and floods of garbage ------------------------------------------------------------
def test_deeply_nested_msgpack_is_a_protocol_error_logged_once(server: ServerProcess) -> None:
    nested = b"\x91" * 100_000 + b"\xc0"
    frames = [
        msgspec.msgpack.encode([p.PROTOCOL_VERSION, 5, msgspec.Raw(b"\x92\xa6lookup" + nested)]),
        b"\x93\x01\x05" + nested,  # inside the envelope itself
        bytes([0x93, 0x01, 0x05, 0x92, 0xA6]) + b"lookup" + nested,
    ]
    before = server.stderr()
    raw = RawClient(server.address)
    try:
        for _ in range(20):
            for frame in frames:
                err = raw.send_raw([frame])
                assert err.kind == "protocol" and "nested too deeply" in err.message, err
        for _ in range(20):
            assert raw.send_raw([b"\xff garbage"]).kind == "protocol"
    finally:
        raw.close()
    assert server.get("/health")["status"] == "ok"
    log = server.stderr()[len(before) :]
    assert "Traceback" not in log and "RecursionError" not in log, log
    # 80 protocol errors within a minute: logged once (the kind's next report carries the count left out).
    assert log.count('"request rejected"') <= 1, log


def test_rate_limited_log_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from kvtier.server.logs import RateLimitedLog

    logger = logging.getLogger("test.ratelimit")
    rl = RateLimitedLog(logger, interval_s=0.2)
    with caplog.at_level(logging.INFO, logger="test.ratelimit"):
        assert rl(logging.INFO, "protocol", "rejected")
        assert not any(rl(logging.INFO, "protocol", "rejected") for _ in range(50))
        assert rl(logging.INFO, "version", "rejected")  # another kind has its own budget
        time.sleep(0.25)
        assert rl(logging.INFO, "protocol", "rejected")
    records = [r for r in caplog.records if r.name == "test.ratelimit"]
    assert len(records) == 3
    assert records[2].fields["suppressed_since_last"] == 50  # type: ignore[attr-defined]


# -- defect 8: heartbeats and "server gone" ------------------------------------------------------------------
@pytest.mark.timeout(15)
def test_call_fails_fast_when_the_server_is_killed() -> None:
    s = ServerProcess(["--l1-size-gb", "0.0625", "--log-level", "warning"]).start()
    try:
        c = Client(s.address, timeout_s=60, heartbeat_s=0.2)
        assert c.health()["status"] == "ok"
        key = ObjectKey("test/gone", "ab")
        assert s.proc is not None
        # In flight: the server is frozen when the request goes out, then killed.
        s.proc.send_signal(signal.SIGSTOP)
        errors: list[BaseException] = []

        def call() -> None:
            try:
                c.lookup([key])
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.3)
        s.kill()
        t.join(12)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ServerUnavailableError), errors
        assert "gone" in str(errors[0])
        # After: the next call learns it at once too (reconnection is refused), not after 60 s.
        with pytest.raises(ServerUnavailableError, match="gone"):
            c.lookup([key])
        c.close()
    finally:
        s.close()


@pytest.mark.timeout(15)
def test_heartbeat_notices_a_frozen_server() -> None:
    # A frozen process (or a host gone off the network) keeps its sockets open: only heartbeats notice it.
    s = ServerProcess(["--l1-size-gb", "0.0625", "--log-level", "warning"]).start()
    try:
        c = Client(s.address, timeout_s=60, heartbeat_s=0.2)
        assert c.health()["status"] == "ok"
        assert s.proc is not None
        s.proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="gone"):
            c.lookup([ObjectKey("test/frozen", "ab")])
        assert time.monotonic() - start < 10
        s.proc.send_signal(signal.SIGCONT)
        c.close()
    finally:
        s.close()


# -- defect 8: requests that arrive during shutdown ----------------------------------------------------------
class _SlowCloseStore:
    """A StoreLike whose close() waits until released: the server is then draining for as long as we like."""

    def __init__(self) -> None:
        self.closing = threading.Event()
        self.release = threading.Event()

    def keys_for_tokens(self, model_name: str, token_ids: Any, cache_salt: str = "") -> list[ObjectKey]:
        return []

    def store(self, keys: Any, tensors: Any) -> None:
        pass

    def lookup(self, keys: Any) -> int:
        return 0

    def retrieve(self, keys: Any) -> list[Any]:
        return [None for _ in keys]

    def retrieve_into(self, keys: Any, outs: Any) -> int:
        return 0

    def clear_l1(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.closing.set()
        self.release.wait(20)


@pytest.mark.timeout(30)
def test_requests_during_shutdown_get_a_shutting_down_reply() -> None:
    from kvtier.server.config import ServerConfig
    from kvtier.server.process import free_port
    from kvtier.server.server import Server

    store = _SlowCloseStore()
    config = ServerConfig(l1_size_gb=0.01, port=free_port(), http_port=free_port())
    server = Server(config, store, close_store=True)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        with Client(config.address, timeout_s=20, shm=False) as c:
            assert c.lookup([ObjectKey("test/shutdown", "ab")]) == 0
            server.stop()
            assert store.closing.wait(10)
            start = time.monotonic()
            with pytest.raises(ServerUnavailableError, match="shutting down"):
                c.lookup([ObjectKey("test/shutdown", "ab")])
            assert time.monotonic() - start < 5
    finally:
        store.release.set()
        server.stop()
        thread.join(20)
    assert not thread.is_alive()


def test_salts_reach_the_log_only_as_digests(server: ServerProcess) -> None:
    # Any salt string is a valid salt; one used in served and rejected requests never reaches the server's log.
    from kvtier.server.server import hide_salts
    from kvtier.types import salt_digest

    salt = "tenant secret!"
    before = server.stderr()
    with Client(server.address) as c:
        key = ObjectKey("test/salt", "ab", cache_salt=salt)
        c.store([key], [torch.ones(2, 1, CHUNK, 8)])
        assert c.lookup([key]) == 1
    raw = RawClient(server.address)
    try:
        err = raw.send_raw([p.encode(3, p.Lookup([p.WireKey("test/salt", "zz", 0, salt)]))])
    finally:
        raw.close()
    assert err.kind == "invalid"
    time.sleep(0.2)
    log = server.stderr()[len(before) :]
    assert '"request rejected"' in log and salt not in log, log
    # An error text that quotes a salt is logged with the salt's keyed digest in its place.
    hidden = hide_salts(f"bad request for {salt!r}", {salt})
    assert salt not in hidden and f"salt#{salt_digest(salt)}" in hidden


@pytest.mark.timeout(60)
def test_concurrent_callers_through_sigterm_never_hang(tmp_path: Any) -> None:
    # Four clients keep calling while the server drains and exits: every call ends (a reply, "shutting down" or
    # "server gone") well before its 60 s timeout, and none gets anything else.
    import json as _json

    l2 = _json.dumps({"type": "fs", "base_path": str(tmp_path / "l2")})
    s = ServerProcess(["--l1-size-gb", "0.0625", "--chunk-size", str(CHUNK), "--l2-adapter", l2]).start()
    outcomes: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def caller(i: int) -> None:
        with Client(s.address, timeout_s=60, heartbeat_s=0.2) as c:
            key = ObjectKey("test/drain", format(0xA0 + i, "x"))
            data = torch.full((2, 4, CHUNK, 64), float(i))
            while not stop.is_set():
                start = time.monotonic()
                try:
                    c.store([key], [data])
                    got = c.retrieve([key])[0]
                    assert got is not None and torch.equal(got, data)
                    outcome = "ok"
                except ServerUnavailableError as exc:
                    outcome = "shutting down" if "shutting down" in str(exc) else "gone"
                assert time.monotonic() - start < 10, outcome
                with lock:
                    outcomes.append(outcome)
                if outcome != "ok":
                    return

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        assert s.stop(signal.SIGTERM) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        s.close()
    assert not any(t.is_alive() for t in threads)
    assert outcomes.count("ok") > 0 and set(outcomes) <= {"ok", "shutting down", "gone"}, outcomes
    assert len([o for o in outcomes if o != "ok"]) == 4  # every caller learnt it, none hung
