"""Store latency through a server with KV events off, on with a subscriber that keeps up, and on with one that
stopped reading: ``python -m kvtier.bench.events [--rounds 5] [--calls 200] [--json]``.

Three servers run side by side (same flags but the events port); each round stores ``calls`` batches of
``keys`` 16 KiB chunks into each of them in turn (interleaved, so that the machine's load hits every mode
alike), and reports the median and p99 of a store call per mode, with the events the stopped subscriber made the
server drop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import torch
import zmq

from kvtier.client import Client
from kvtier.events import TOPIC
from kvtier.server.process import ServerProcess, free_port
from kvtier.types import ObjectKey


def _subscribe(ctx: zmq.Context[Any], port: int, *, stopped: bool) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(zmq.SUB)
    if stopped:  # it never reads: small buffers, so the server's queue for it fills soon
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def run(rounds: int, calls: int, keys_per_call: int, hwm: int) -> dict[str, Any]:
    modes = ("off", "subscriber keeps up", "subscriber stopped")
    ports = {m: free_port() for m in modes[1:]}
    base = ["--l1-size-gb", "0.25", "--log-level", "warning", "--workers", "2", "--events-hwm", str(hwm)]
    servers = {
        m: ServerProcess([*base, *(["--events-port", str(ports[m])] if m in ports else [])]).start() for m in modes
    }
    ctx: zmq.Context[Any] = zmq.Context()
    fast = _subscribe(ctx, ports["subscriber keeps up"], stopped=False)
    fast_stuck = _subscribe(ctx, ports["subscriber stopped"], stopped=False)
    stopped = _subscribe(ctx, ports["subscriber stopped"], stopped=True)
    done = threading.Event()

    def drain() -> None:  # both fast subscribers read everything
        poller = zmq.Poller()
        poller.register(fast, zmq.POLLIN)
        poller.register(fast_stuck, zmq.POLLIN)
        while not done.is_set():
            for sock, _ in poller.poll(100):
                while sock.poll(0):
                    sock.recv_multipart()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    clients = {m: Client(s.address, timeout_s=60) for m, s in servers.items()}
    data = [torch.full((8192,), 1.0, dtype=torch.bfloat16) for _ in range(keys_per_call)]
    times: dict[str, list[float]] = {m: [] for m in modes}
    n = 0
    try:
        time.sleep(0.5)  # subscribers join
        for _ in range(rounds):
            for mode in modes:
                client = clients[mode]
                for _ in range(calls):
                    keys = [ObjectKey("bench/events", format(n + i + 1, "x")) for i in range(keys_per_call)]
                    n += keys_per_call
                    t0 = time.perf_counter()
                    client.store(keys, data)
                    times[mode].append(time.perf_counter() - t0)
        stats = {m: servers[m].get("/stats") for m in modes}
    finally:
        done.set()
        reader.join(5)
        for c in clients.values():
            c.close()
        for sock in (fast, fast_stuck, stopped):
            sock.close(0)
        ctx.term()
        for s in servers.values():
            s.close()

    def pct(xs: list[float], q: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3

    return {
        "rounds": rounds,
        "calls_per_round": calls,
        "keys_per_call": keys_per_call,
        "events_hwm": hwm,
        "chunk_bytes": 16384,
        "modes": {
            m: {
                "store_ms_p50": round(statistics.median(times[m]) * 1e3, 3),
                "store_ms_p99": round(pct(times[m], 0.99), 3),
                "events_published": stats[m].get("events", {}).get("published_events", 0),
                "events_dropped_for_a_subscriber": stats[m].get("events", {}).get("dropped_events", 0),
            }
            for m in modes
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier.bench.events", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--events-hwm", type=int, default=16, help="the servers' --events-hwm (small: drops soon)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run(args.rounds, args.calls, args.keys, args.events_hwm)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for mode, r in report["modes"].items():
            print(
                f"{mode:22s} store p50 {r['store_ms_p50']:7.3f} ms  p99 {r['store_ms_p99']:7.3f} ms  "
                f"events {r['events_published']:7d}  dropped for a subscriber {r['events_dropped_for_a_subscriber']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
