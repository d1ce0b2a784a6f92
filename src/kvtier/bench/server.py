"""``kvtier bench server``: the server's data path and request rate, against in-run baselines.

* **retrieve through shared memory**: a client ``retrieve_into`` a tensor from ``Client.empty`` of an L1-resident
  chunk (default ``[2, 32, 256, 1024]`` bf16 = 32 MiB), in GB/s, beside a memcpy of the same bytes into a reused
  buffer in this process, the two sampled in alternation round by round (:class:`kvtier.bench.common.Harness`).
* **lookup round trips**: ``--lookups`` one-key ``Client.lookup`` calls per round (thousands per second) beside
  as many round trips of a bare ZeroMQ DEALER/ROUTER echo in this process (the floor any request pays), sampled
  in alternation; then p50 / p99 in microseconds over all of them.
* **ops/s with 1, 4 and 8 clients**: each client is a process running store / lookup / retrieve_into of small
  chunks for a fixed time.

The server is a real ``kvtier server`` subprocess on free ports.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from kvtier.bench.common import (
    Figure,
    Harness,
    Op,
    Report,
    add_harness_arguments,
    parse_shape,
    progress,
    recording_load,
)
from kvtier.bench.data import DEFAULT_CHUNK_SHAPE, synthetic_kv
from kvtier.types import ObjectKey

SMALL_SHAPE = (2, 4, 16, 64)  # 16 KiB bf16: the ops/s figure measures requests, not bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        default=",".join(map(str, DEFAULT_CHUNK_SHAPE)),
        help="retrieved chunk shape (default: 2,32,256,1024 = 32 MiB bf16)",
    )
    parser.add_argument("--lookups", type=int, default=200, help="lookup round trips per round (default: 200)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each ops/s run (default: 3)")
    parser.add_argument("--clients", default="1,4,8", help="client counts for ops/s (default: 1,4,8)")
    add_harness_arguments(parser, rounds=10)


class _Echo:
    """A bare DEALER -> ROUTER echo over loopback TCP in this process: the floor any request pays."""

    def __init__(self) -> None:
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        port = self._router.bind_to_random_port("tcp://127.0.0.1")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.connect(f"tcp://127.0.0.1:{port}")

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._router.poll(50):
                self._router.send_multipart(self._router.recv_multipart())

    def round_trip(self) -> None:
        self._dealer.send(b"x" * 64)
        self._dealer.recv()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._dealer.close(0)
        self._router.close(0)
        self._ctx.term()


def _round_trips(fn: Callable[[], object], n: int, rtts: list[float]) -> Callable[[], None]:
    """``n`` calls of ``fn``, each one's duration appended to ``rtts`` (for the percentiles)."""

    def go() -> None:
        for _ in range(n):
            start = time.perf_counter()
            fn()
            rtts.append(time.perf_counter() - start)

    return go


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
            "order": args.order,
            "lookups_per_round": args.lookups,
            "seconds": args.seconds,
            "clients": counts,
            "ops_chunk_shape": list(SMALL_SHAPE),
        },
    )
    server_flags = ["--l1-size-gb", str(l1_gb), "--log-level", "warning"]
    with recording_load(report), ServerProcess(server_flags) as server, Client(server.address) as c:
        if not c.shm_enabled:
            raise SystemExit(f"shared memory is not available to this client: {c.shm_reason}")
        key = ObjectKey("bench/server", "c0ffee")
        c.store([key], [chunk])
        out = c.empty(shape, torch.bfloat16)
        copy_dst = torch.empty_like(chunk)
        if c.retrieve_into([key], [out]) != 1 or not torch.equal(out.view(torch.uint8), chunk.view(torch.uint8)):
            raise SystemExit("retrieve through shared memory returned wrong data")

        def retrieve() -> None:
            if c.retrieve_into([key], [out]) != 1:
                raise SystemExit("bench server: the L1-resident chunk missed")

        echo = _Echo()
        try:
            lookup_rtts: list[float] = []
            echo_rtts: list[float] = []
            h = Harness(args.rounds, order=args.order)
            h.compare(
                "retrieve_into via shared memory (L1 hit)",
                Op("retrieve_into", retrieve, nbytes),
                Op("memcpy", lambda: copy_dst.copy_(chunk), nbytes),
                f"{nbytes / 2**20:.0f} MiB chunk, client buffer from Client.empty",
            )
            per_round = args.lookups
            h.compare(
                "lookup round trips",
                Op("lookup", _round_trips(lambda: c.lookup([key]), per_round, lookup_rtts), per_round, unit="k/s",
                   scale=1e3),
                Op("zmq echo", _round_trips(echo.round_trip, per_round, echo_rtts), per_round, unit="k/s",
                   scale=1e3),
                f"{per_round} one-key lookups per round, beside a bare DEALER/ROUTER echo",
            )  # fmt: skip
            report.add_results(h.run("bench server: retrieve, lookup", show_progress=not args.json))
        finally:
            echo.close()
        # the round trips of the warm-up (and of the baseline's reference samples) are left out of the percentiles
        lookup_rtts = lookup_rtts[per_round:]
        echo_rtts = echo_rtts[(1 + h.reference_samples) * per_round :]
        for q, name in ((50, "p50"), (99, "p99")):
            value = _percentile(lookup_rtts, q) * 1e6
            base = _percentile(echo_rtts, q) * 1e6
            report.add(
                Figure(
                    f"lookup round trip {name}",
                    value,
                    unit="us",
                    baseline=f"zmq echo {name}",
                    baseline_value=base,
                    note=f"over {len(lookup_rtts)} interleaved lookups; lower is better",
                )
            )

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
