"""KV events through a real ``kvtier server`` subprocess and real ZeroMQ subscribers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq
from prometheus_client.parser import text_string_to_metric_families

from kvtier import ObjectKey
from kvtier.client import Client
from kvtier.errors import ConfigError
from kvtier.events import TOPIC, EventBatch, GapDetector, KVEvent, chunk_hashes, decode_batch
from kvtier.server.config import ServerConfig
from kvtier.server.process import ServerProcess, ServerProcessError, free_port
from kvtier.types import salt_digest

CHUNK = 16
KIB16 = 8192  # bf16 elements: 16 KiB per chunk


def chunk_tensor(seed: int) -> torch.Tensor:
    return torch.full((KIB16,), float(seed % 200), dtype=torch.bfloat16)


class Subscriber:
    """A SUB socket; ``recv`` decodes one message, checking that frame 1 is the first event's seq."""

    def __init__(self, port: int, *, rcvhwm: int = 0, rcvbuf: int = -1) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.RCVBUF, rcvbuf)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def recv(self, timeout_s: float = 20.0) -> EventBatch | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        topic, first, payload = self.sock.recv_multipart()
        batch = decode_batch(payload)
        assert topic == TOPIC and int.from_bytes(first, "big") == batch.events[0].seq
        return batch

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def join(sub: Subscriber, client: Client, model: str) -> list[EventBatch]:
    """Store probe keys until the subscriber hears one (a SUB socket misses what is sent before it joined)."""
    for i in range(200):
        client.store([ObjectKey(model, format(0xABC000 + i, "x"))], [chunk_tensor(0)])
        batch = sub.recv(timeout_s=0.2)
        if batch is not None:
            return [batch]
    raise AssertionError("the subscriber never received an event")


def until_quiet(sub: Subscriber, batches: list[EventBatch], timeout_s: float = 1.0) -> list[KVEvent]:
    while (batch := sub.recv(timeout_s)) is not None:
        batches.append(batch)
    return [e for b in batches for e in b.events]


def wait_for_l2_writes(server: ServerProcess) -> None:
    deadline = time.monotonic() + 20
    while server.get("/stats")["store"]["l2_pending_writes"] and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def ports() -> dict[str, int]:
    return {"port": free_port(), "http_port": free_port(), "events_port": free_port()}


def start(ports: dict[str, int], *args: str) -> ServerProcess:
    flags = ["--chunk-size", str(CHUNK), "--log-level", "warning", "--events-port", str(ports["events_port"])]
    return ServerProcess([*flags, *args], port=ports["port"], http_port=ports["http_port"]).start()


@pytest.fixture
def sub(ports: dict[str, int]) -> Iterator[Subscriber]:
    s = Subscriber(ports["events_port"])
    yield s
    s.close()


def test_events_in_order_nothing_lost_hashes_from_tokens_and_restart(
    ports: dict[str, int], sub: Subscriber, tmp_path: Path
) -> None:
    fs = f'{{"type": "fs", "base_path": "{tmp_path / "l2"}", "durability": "none"}}'
    server = start(ports, "--l1-size-gb", "0.001", "--l2-adapter", fs)  # 1 MiB of L1: 64 chunks, then evictions
    try:
        with Client(server.address, timeout_s=20) as client:
            batches = join(sub, client, "probe")
            tokens = list(range(5000, 5000 + 100 * CHUNK))
            keys = client.keys_for_tokens("org/m", tokens, cache_salt="tenant-a")
            for i in range(0, len(keys), 10):  # prompts stored ten chunks per call, in order
                client.store(keys[i : i + 10], [chunk_tensor(j) for j in range(i, i + 10)])
                wait_for_l2_writes(server)  # else the Store drops L2 writes while half of L1 waits for them
            assert client.retrieve(keys[:1])[0] is not None  # evicted from L1, loaded back from fs
            wait_for_l2_writes(server)
            server.post("/clear")
            events = until_quiet(sub, batches)
            stats = server.get("/stats")

        gaps = GapDetector()
        assert sum(gaps.feed(b) for b in batches) == 0 and gaps.restarts == 0, "seq contiguous: nothing lost"
        assert len({b.publisher for b in batches}) == 1
        mine = [e for e in events if e.model == "org/m"]
        hashes = chunk_hashes(tokens, CHUNK)  # what a router computes from token ids
        l1 = [e for e in mine if e.kind == "stored" and e.tier == "l1"]
        fs_stored = [e for e in mine if e.kind == "stored" and e.tier == "fs"]
        assert [e.hash for e in l1[:100]] == hashes
        # L2 writes run on several writers per tier: each chunk written once, in any order across batches
        assert sorted(e.hash for e in fs_stored) == sorted(hashes)
        # The client computed the keys, so the server knows a parent from the order within one store call only.
        assert [e.parent for e in l1[:100]] == [None if i % 10 == 0 else hashes[i - 1] for i in range(100)]
        assert l1[100].hash == hashes[0], "the load back from fs is stored in L1 again"
        evicted = [e.hash for e in mine if e.kind == "evicted"]
        assert evicted[:30] == hashes[:30] and evicted.count(hashes[0]) == 1, "LRU evicts the oldest first"
        assert all(e.salt == salt_digest("tenant-a") and e.size == 2 * KIB16 for e in l1)
        assert events[-1].kind == "cleared" and events[-1].tier == "l1"
        assert stats["events"]["published_events"] == events[-1].seq + 1  # every event reached the socket
        assert stats["events"]["dropped_events"] == 0 and stats["store"]["events"]["dropped"] == 0
        assert stats["events"]["subscribers"] >= 1
        assert "tenant-a" not in str(stats)
    finally:
        assert server.stop() == 0
        server.close()

    # A restart on the same port: the same subscriber (ZeroMQ reconnects) sees a new publisher, seq from 0.
    server = start(ports, "--l1-size-gb", "0.01")
    try:
        with Client(server.address, timeout_s=20) as client:
            more = join(sub, client, "probe2")
        gaps.feed(more[0])
        assert gaps.restarts == 1 and more[0].publisher != batches[0].publisher
        assert more[0].events[0].seq < 10
    finally:
        server.close()


def test_a_stopped_subscriber_loses_events_counted_others_lose_nothing(ports: dict[str, int], sub: Subscriber) -> None:
    server = start(ports, "--l1-size-gb", "0.01", "--events-hwm", "64")
    stuck = Subscriber(ports["events_port"], rcvhwm=1, rcvbuf=4096)  # joins, then never reads
    received: list[list[bytes]] = []
    done = threading.Event()

    def read() -> None:  # the fast subscriber: keeps up (no decoding while it reads)
        while not done.is_set() or sub.sock.poll(500):
            if sub.sock.poll(100):
                received.append(sub.sock.recv_multipart())

    try:
        with Client(server.address, timeout_s=20) as client:
            batches = join(sub, client, "probe")
            reader = threading.Thread(target=read)
            reader.start()
            deadline = time.monotonic() + 10
            while server.get("/stats")["events"]["subscribers"] < 2 and time.monotonic() < deadline:
                client.store([ObjectKey("probe", "f00d")], [chunk_tensor(1)])
            t0 = time.perf_counter()
            n = 0
            while server.get("/stats")["events"]["dropped_events"] == 0 and n < 40_000:
                keys = [ObjectKey("flood", format(n + i + 1, "x")) for i in range(100)]
                client.store(keys, [chunk_tensor(i) for i in range(100)])  # stores never wait on a subscriber
                n += 100
            flood_s = time.perf_counter() - t0
            client.store([ObjectKey("flood", "ffff")], [chunk_tensor(3)])
            time.sleep(0.5)
            done.set()
            reader.join(30)
            stats = server.get("/stats")
            metrics = {
                (s.name, s.labels.get("reason", "")): s.value
                for f in text_string_to_metric_families(server.get("/metrics"))
                for s in f.samples
            }
            stuck_batches: list[EventBatch] = []
            until_quiet(stuck, stuck_batches)  # what its queues held from before it overflowed
            client.store([ObjectKey("flood", "fffe")], [chunk_tensor(4)])  # then a new event: after the gap
            until_quiet(stuck, stuck_batches)
        assert stats["events"]["dropped_events"] > 0, f"{n} keys stored in {flood_s:.1f} s without a drop"
        assert metrics[("kvtier_events_dropped_total", "subscriber")] == stats["events"]["dropped_events"]
        assert metrics[("kvtier_events_published_total", "")] == stats["events"]["published_events"]

        # The subscriber that kept reading lost nothing while the stopped one overflowed.
        batches += [decode_batch(frames[2]) for frames in received]
        gaps = GapDetector()
        assert sum(gaps.feed(b) for b in batches) == 0
        assert batches[-1].events[-1].seq + 1 == stats["events"]["published_events"]

        # The stopped subscriber, reading again, sees the gap (and the batches' running count of drops).
        stuck_gaps = GapDetector()
        assert sum(stuck_gaps.feed(b) for b in stuck_batches) > 0
        assert stuck_batches[-1].dropped > 0
    finally:
        done.set()
        stuck.close()
        server.close()


def test_events_config_errors(ports: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="events_port"):
        ServerConfig.from_dict({"l1_size_gb": 1, "port": 7000, "events_port": 7000})
    with pytest.raises(ConfigError, match="events_port"):
        ServerConfig.from_dict({"l1_size_gb": 1, "events_port": 0})
    assert ServerConfig.from_dict({"l1_size_gb": 1}).events_port is None  # off by default
    taken = zmq.Context.instance().socket(zmq.PUB)
    taken.bind(f"tcp://127.0.0.1:{ports['events_port']}")
    try:
        with pytest.raises(ServerProcessError, match="events_port"):
            start(ports, "--l1-size-gb", "0.01")
    finally:
        taken.close(0)


def readme_blocks() -> list[str]:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("\n## KV events\n") :]
    section = section[: section.index("\n## ", 1)]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


@pytest.mark.parametrize("index", range(3))
def test_readme_examples_run(index: int, tmp_path: Path) -> None:
    blocks = readme_blocks()
    assert len(blocks) == 3
    script = tmp_path / "example.py"
    script.write_text(blocks[index])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    if index == 1:  # the subscriber prints stored events of the prompt's four chunks, parents chained
        lines = [line.split() for line in out.stdout.splitlines() if " stored l1 my-org/my-model " in line]
        assert len(lines) >= 4 and lines[1][5] == lines[0][4] and lines[0][5] == "None"
