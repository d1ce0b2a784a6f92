"""``kvtier bench server``: the server's data path and request rate, against in-run baselines.

* **retrieve through shared memory**: a client ``retrieve_into`` a tensor from ``Client.empty`` of an L1-resident
  chunk (default ``[2, 32, 256, 1024]`` bf16 = 32 MiB), in GB/s, beside a memcpy of the same bytes into a reused
  buffer in this process, interleaved round by round. Target: >= 0.6x memcpy.
* **lookup round trip**: p50 / p99 in microseconds of ``Client.lookup`` of one key, beside a bare ZeroMQ
  DEALER/ROUTER echo round trip in this process (the floor any request pays).
* **ops/s with 1, 4 and 8 clients**: each client is a process running store / lookup / retrieve_into of small
  chunks for a fixed time.

The server is a real ``kvtier server`` subprocess on free ports.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from typing import Any

import torch
import zmq

from kvtier.bench.common import Figure, Report, median_rate, parse_shape, progress, timed
from kvtier.bench.data import DEFAULT_CHUNK_SHAPE, synthetic_kv
from kvtier.types import ObjectKey

SMALL_SHAPE = (2, 4, 16, 64)  # 16 KiB bf16: the ops/s figure measures requests, not bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        default=",".join(map(str, DEFAULT_CHUNK_SHAPE)),
        help="retrieved chunk shape (default: 2,32,256,1024 = 32 MiB bf16)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="timed retrieve rounds (default: 10)")
    parser.add_argument("--lookups", type=int, default=2000, help="lookup round trips timed (default: 2000)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each ops/s run (default: 3)")
    parser.add_argument("--clients", default="1,4,8", help="client counts for ops/s (default: 1,4,8)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def _zmq_echo_rtts(n: int) -> list[float]:
    """Round trips of a bare DEALER -> ROUTER echo over loopback TCP, in seconds."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            if router.poll(50):
                router.send_multipart(router.recv_multipart())

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    payload = b"x" * 64
    out = []
    for _ in range(n + 50):
        start = time.perf_counter()
        dealer.send(payload)
        dealer.recv()
        out.append(time.perf_counter() - start)
    stop.set()
    thread.join()
    dealer.close(0)
    router.close(0)
    ctx.term()
    return out[50:]


def _ops_worker(address: str, index: int, queues: tuple[Any, Any], start_at: Any, seconds: float) -> None:
    """One benchmark client: a store / lookup / retrieve_into mix on its own keys until the time is up."""
    from kvtier.client import Client

    ready, results = queues
    with Client(address) as client:
        data = synthetic_kv(SMALL_SHAPE, seed=index)
        buf = client.empty(SMALL_SHAPE, torch.bfloat16)
        keys = [ObjectKey("bench/ops", format(index * 1_000_000 + i, "x")) for i in range(64)]
        client.store(keys[:1], [data])
        ready.put(index)
        start_at.wait()
        ops, i = 0, 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            key = keys[i % len(keys)]
            client.store([key], [data])
            client.lookup([key])
            client.retrieve_into([key], [buf])
            ops += 3
            i += 1
        results.put(ops)


def _ops_per_second(address: str, clients: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    start_at = ctx.Event()
    ready = ctx.Queue()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_ops_worker, args=(address, i, (ready, results), start_at, seconds)) for i in range(clients)
    ]
    for proc in procs:
        proc.start()
    # Start the clock only when every client has started (spawn imports torch) and stored its first chunk.
    for _ in procs:
        ready.get(timeout=120)
    start_at.set()
    total = sum(results.get(timeout=seconds + 120) for _ in procs)
    for proc in procs:
        proc.join(30)
    return float(total) / seconds


def run(args: argparse.Namespace) -> Report:
    from kvtier.client import Client
    from kvtier.server.process import ServerProcess

    shape = parse_shape(args.shape)
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.rounds < 1 or args.lookups < 1 or args.seconds <= 0 or any(c < 1 for c in counts):
        raise SystemExit("--rounds, --lookups, --seconds and --clients must be positive")
    chunk = synthetic_kv(shape)
    nbytes = chunk.numel() * chunk.element_size()
    l1_gb = max(1.0, 4 * nbytes / 1e9)
    report = Report(
        "server",
        {
            "shape": list(shape),
            "dtype": "bfloat16",
            "rounds": args.rounds,
            "lookups": args.lookups,
            "seconds": args.seconds,
            "clients": counts,
            "ops_chunk_shape": list(SMALL_SHAPE),
        },
    )
    with ServerProcess(["--l1-size-gb", str(l1_gb), "--log-level", "warning"]) as server, Client(server.address) as c:
        if not c.shm_enabled:
            raise SystemExit(f"shared memory is not available to this client: {c.shm_reason}")
        key = ObjectKey("bench/server", "c0ffee")
        c.store([key], [chunk])
        out = c.empty(shape, torch.bfloat16)
        copy_dst = torch.empty_like(chunk)
        if c.retrieve_into([key], [out]) != 1 or not torch.equal(out.view(torch.uint8), chunk.view(torch.uint8)):
            raise SystemExit("retrieve through shared memory returned wrong data")
        copy_dst.copy_(chunk)
        samples: dict[str, list[float]] = {"memcpy": [], "retrieve": []}
        with progress(args.rounds, "bench server: retrieve", enabled=not args.json) as advance:
            for _ in range(args.rounds):
                samples["memcpy"].append(timed(lambda: copy_dst.copy_(chunk)))
                samples["retrieve"].append(timed(lambda: c.retrieve_into([key], [out])))
                advance()
        memcpy = median_rate(samples["memcpy"], nbytes)
        report.add(Figure("memcpy (reused buffer)", memcpy))
        report.add(
            Figure(
                "retrieve_into via shared memory (L1 hit)",
                median_rate(samples["retrieve"], nbytes),
                baseline="memcpy",
                baseline_value=memcpy,
                target=0.6,
                note=f"{nbytes / 2**20:.0f} MiB chunk, client buffer from Client.empty",
            )
        )

        for _ in range(100):
            c.lookup([key])
        rtts = []
        for _ in range(args.lookups):
            start = time.perf_counter()
            c.lookup([key])
            rtts.append(time.perf_counter() - start)
        echo = _zmq_echo_rtts(args.lookups)
        for q, name in ((50, "p50"), (99, "p99")):
            value = _percentile(rtts, q) * 1e6
            base = _percentile(echo, q) * 1e6
            report.add(Figure(f"lookup round trip {name}", value, unit="us", baseline="zmq echo", baseline_value=base))

        with progress(len(counts), "bench server: ops/s", enabled=not args.json) as advance:
            for n in counts:
                rate = _ops_per_second(server.address, n, args.seconds)
                report.add(
                    Figure(f"ops/s, {n} client(s)", rate, unit="ops/s", note="store + lookup + retrieve_into, 16 KiB")
                )
                advance()
    return report


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")
