"""``kvtier bench soak``: a server under load for minutes, as an operator runs it, checked byte for byte.

A real ``kvtier server`` subprocess with an fs L2 adapter (and a Redis one when ``redis-server`` is on ``PATH``),
``--clients`` client processes that store and retrieve overlapping prefixes of popular prompts (the same chunk
keys again and again, from every client) through shared memory and through frames, with an L1 much smaller than
the working set so that chunks are evicted and come back from L2. Every retrieved chunk is compared byte for byte
with what its key must hold. When Redis is used it is killed (SIGKILL) a third of the way through and restarted
(empty) half way.

It reports mismatches, client errors, refused stores, the server's RSS over time, L1 used bytes and objects after
the L2 writes drained and ``clear_l1``, and p50 / p99 latency of store and retrieve. Pass: 0 mismatches, 0 client
errors, 0 refused stores, L1 at 0 bytes and 0 objects after drain and clear, and RSS growth over the second half
under 50 MB. The exit status is 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvtier.bench.common import machine_info, progress
from kvtier.types import ObjectKey

CHUNK_SHAPE = (2, 4, 64, 64)  # 64 KiB of bf16: many requests per second, the data path still copies real KV
PREFIXES = 32  # popular prompts
CHUNKS_PER_PREFIX = 8  # a request covers the first 1..8 chunks of one prompt: prefixes overlap
RSS_GROWTH_LIMIT_MB = 50.0
MB = 1e6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the clients run (default: 10)")
    parser.add_argument("--clients", type=int, default=8, help="client processes (default: 8)")
    parser.add_argument(
        "--l1-size-mb", type=float, default=8.0, help="server L1 size in MiB (default: 8, half the working set)"
    )
    parser.add_argument("--no-redis", action="store_true", help="fs L2 only, even when redis-server is installed")
    parser.add_argument(
        "--fs-durability",
        choices=("fsync", "none"),
        default="fsync",
        help="the fs L2 adapter's durability (default: fsync, as a server is run in production)",
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=None,
        metavar="CHUNKS_PER_S",
        help="pace the clients' stores at this total rate (chunks/s), doubling it every --ramp-step seconds, and "
        "report the store throughput at which the server begins to drop L2 writes (default: no pacing)",
    )
    parser.add_argument("--ramp-step", type=float, default=15.0, help="seconds per ramp step (default: 15)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def expected_chunk(prefix: int, index: int) -> torch.Tensor:
    """What chunk ``index`` of prompt ``prefix`` holds: the same for every client and every store."""
    gen = torch.Generator().manual_seed(prefix * 1000 + index + 1)
    return torch.randn(CHUNK_SHAPE, generator=gen).to(torch.bfloat16)


def chunk_key(prefix: int, index: int) -> ObjectKey:
    return ObjectKey("soak", f"{prefix:04x}{index:04x}")


def ramp_rate(start: float, step_s: float, t: float) -> float:
    """The ramp's total store rate (chunks/s) ``t`` seconds into the run: ``start``, doubled every ``step_s``."""
    return start * 2.0 ** int(t / step_s)


def _client(
    address: str,
    index: int,
    seconds: float,
    queues: tuple[Any, Any],
    start_at: Any,
    *,
    pace: tuple[float, float, int] | None = None,
) -> None:
    """One engine process: store / retrieve of popular prefixes until the time is up; every hit is checked.
    ``pace`` ``(start, step_s, clients)``: stores paced to this client's share of the ramp's rate."""
    from kvtier.client import Client

    ready, results = queues
    rng = random.Random(index)
    weights = [1.0 / (p + 1) for p in range(PREFIXES)]  # Zipf-like popularity
    expected = {(p, i): expected_chunk(p, i) for p in range(PREFIXES) for i in range(CHUNKS_PER_PREFIX)}
    out: dict[str, Any] = {"stores": 0, "retrieves": 0, "checked": 0, "mismatches": 0, "errors": 0, "messages": []}
    lat: dict[str, list[float]] = {"store": [], "retrieve": []}
    with Client(address, timeout_s=60.0) as client:
        bufs = [client.empty(CHUNK_SHAPE, torch.bfloat16) for _ in range(CHUNKS_PER_PREFIX)]
        ready.put(index)
        start_at.wait()
        began = time.monotonic()
        deadline = began + seconds
        next_store = began
        n = 0
        while time.monotonic() < deadline:
            p = rng.choices(range(PREFIXES), weights)[0]
            length = rng.randint(1, CHUNKS_PER_PREFIX)
            keys = [chunk_key(p, i) for i in range(length)]
            n += 1
            t0 = time.perf_counter()
            try:
                if n % 2:
                    if pace is not None:  # this client's share of the ramp's rate, in chunks
                        now = time.monotonic()
                        if next_store > now:
                            time.sleep(next_store - now)
                        rate = ramp_rate(pace[0], pace[1], time.monotonic() - began) / pace[2]
                        next_store = max(next_store, time.monotonic() - 1.0) + length / rate
                        t0 = time.perf_counter()
                    client.store(keys, [expected[p, i] for i in range(length)])
                    lat["store"].append(time.perf_counter() - t0)
                    out["stores"] += 1
                    continue
                if n % 4 == 0:  # into shared-memory buffers: the server writes them in place
                    hits = client.retrieve_into(keys, bufs[:length])
                    got: list[torch.Tensor | None] = [bufs[i] for i in range(hits)]
                else:  # frames / staging: tensors owned by this process
                    got = client.retrieve(keys)
                lat["retrieve"].append(time.perf_counter() - t0)
                out["retrieves"] += 1
                for i, t in enumerate(got):
                    if t is None:
                        break
                    out["checked"] += 1
                    if not torch.equal(t.view(torch.int16), expected[p, i].view(torch.int16)):
                        out["mismatches"] += 1
                        if len(out["messages"]) < 5:
                            out["messages"].append(f"client {index}: chunk {p}.{i} differs")
            except Exception as exc:  # every failure counts; the run goes on
                out["errors"] += 1
                if len(out["messages"]) < 5:
                    out["messages"].append(f"client {index}: {exc!r}")
    results.put({**out, "latency": lat})


def _rss(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return float("nan")


def _percentile_ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e3


@dataclass
class SoakResult:
    """The figures of one soak run and its verdict."""

    params: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    rss_over_time: list[tuple[float, float, float]] = field(default_factory=list)  # (s, RSS MB, L1 used MB)
    messages: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        f = self.figures
        out = []
        if f.get("mismatches", 1):
            out.append(f"{f.get('mismatches')} mismatching chunk(s)")
        if f.get("client_errors", 1):
            out.append(f"{f.get('client_errors')} client error(s)")
        if f.get("refused_stores", 1):
            out.append(f"{f.get('refused_stores')} refused store(s)")
        if f.get("l1_used_bytes_after_clear", 1) or f.get("l1_objects_after_clear", 1):
            out.append(
                f"L1 holds {f.get('l1_used_bytes_after_clear')} bytes in {f.get('l1_objects_after_clear')} "
                "object(s) after drain and clear"
            )
        growth = f.get("rss_growth_second_half_mb", float("nan"))
        if not growth < RSS_GROWTH_LIMIT_MB:
            out.append(f"RSS grew {growth:.1f} MB over the second half (limit {RSS_GROWTH_LIMIT_MB:g})")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "soak",
            "machine": machine_info(),
            "params": self.params,
            "figures": self.figures,
            "rss_over_time": [{"s": t, "rss_mb": r, "l1_used_mb": u} for t, r, u in self.rss_over_time],
            "messages": self.messages,
            "passed": self.passed,
            "failures": self.failures,
        }

    def print(self, as_json: bool) -> None:
        if as_json:
            print(json.dumps(self.to_json(), indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(Console().width, 120))
        table = Table(title=f"soak  {json.dumps(self.params)}")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for name, value in self.figures.items():
            table.add_row(name, f"{value:.3f}" if isinstance(value, float) else str(value))
        console.print(table)
        series = Table(title="server RSS over time")
        for col in ("s", "RSS MB", "L1 used MB"):
            series.add_column(col, justify="right")
        step = max(1, len(self.rss_over_time) // 20)
        for t, r, u in self.rss_over_time[::step]:
            series.add_row(f"{t:.0f}", f"{r:.1f}", f"{u:.2f}")
        console.print(series)
        for m in self.messages:
            console.print(f"  {m}")
        verdict = "[green]PASS[/]" if self.passed else "[red]FAIL[/]: " + "; ".join(self.failures)
        console.print(f"soak: {verdict}")


def run(args: argparse.Namespace) -> SoakResult:
    from kvtier.bench.redis_server import LocalRedis, find_redis_server
    from kvtier.client import Client
    from kvtier.server.process import ServerProcess

    if args.minutes <= 0 or args.clients < 1 or args.l1_size_mb <= 0:
        raise SystemExit("--minutes, --clients and --l1-size-mb must be positive")
    seconds = args.minutes * 60
    use_redis = not args.no_redis and find_redis_server() is not None
    result = SoakResult(
        {
            "minutes": args.minutes,
            "clients": args.clients,
            "l1_size_mb": args.l1_size_mb,
            "chunk_shape": list(CHUNK_SHAPE),
            "working_set_mib": PREFIXES * CHUNKS_PER_PREFIX * math.prod(CHUNK_SHAPE) * 2 / 2**20,
            "l2": ["fs", "redis"] if use_redis else ["fs"],
            "fs_durability": args.fs_durability,
        }
    )
    redis = LocalRedis().start() if use_redis else None
    with tempfile.TemporaryDirectory(prefix="kvtier-soak-") as tmp:
        adapters: list[dict[str, Any]] = [
            {"type": "fs", "base_path": str(Path(tmp) / "l2"), "durability": args.fs_durability}
        ]
        if redis is not None:
            adapters.append({"type": "redis", "url": redis.url, "timeout_s": 2.0, "connect_timeout_s": 1.0})
        flags = ["--l1-size-gb", repr(args.l1_size_mb / 1024), "--log-level", "error"]
        for a in adapters:
            flags += ["--l2-adapter", json.dumps(a)]
        try:
            with ServerProcess(flags) as server, Client(server.address, shm=False, timeout_s=120.0) as admin:
                pid = server.proc.pid if server.proc is not None else 0
                _drive(args, seconds, pid=pid, admin=admin, address=server.address, redis=redis, result=result)
        finally:
            if redis is not None:
                redis.close()
    return result


def _drive(
    args: argparse.Namespace,
    seconds: float,
    *,
    pid: int,
    admin: Any,
    address: str,
    redis: Any,
    result: SoakResult,
) -> None:
    pace = None if args.ramp is None else (args.ramp, args.ramp_step, args.clients)
    ctx = mp.get_context("spawn")
    start_at = ctx.Event()
    ready = ctx.Queue()
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client,
            args=(address, i, seconds, (ready, results), start_at),
            kwargs={"pace": pace},
            daemon=True,
        )
        for i in range(args.clients)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:  # spawn imports torch: the clock starts when every client is ready
        ready.get(timeout=300)
    start_at.set()
    t0 = time.monotonic()
    sample_every = 1.0 if seconds <= 120 else 5.0
    kill_at, restart_at = seconds / 3, seconds / 2
    redis_events: list[str] = []
    samples: list[tuple[float, int, int]] = []  # (s, chunks stored, L2 writes dropped) as the server counts them
    with progress(int(seconds), "bench soak", enabled=not args.json) as advance:
        done = 0
        while True:
            now = time.monotonic() - t0
            if redis is not None and now >= kill_at and not redis_events:
                redis.stop(kill=True)
                redis_events.append(f"redis SIGKILLed at {now:.0f} s")
            if redis is not None and now >= restart_at and len(redis_events) == 1:
                redis.start()
                redis_events.append(f"redis restarted (empty) at {now:.0f} s")
            store_stats = admin.stats()["store"]
            l1 = store_stats["l1"]
            result.rss_over_time.append((round(now, 1), _rss(pid), l1["used_bytes"] / MB))
            samples.append((now, store_stats["stored"], store_stats["l2_writes_dropped"]))
            while done < min(int(now), int(seconds)):
                advance()
                done += 1
            if now >= seconds:
                break
            time.sleep(min(sample_every, max(0.0, seconds - now)))
    outs = [results.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(60)
    run_end = time.monotonic() - t0

    # drain the L2 writes, then clear L1: nothing may stay behind
    deadline = time.monotonic() + 300
    stats = admin.stats()["store"]
    # a write being done is out of the queue but still pins its objects: wait for the pinned bytes too
    while (stats["l2_pending_writes"] or stats["l2_pending_bytes"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = admin.stats()["store"]
    admin.clear_l1()
    after = admin.stats()["store"]
    final_rss = _rss(pid)

    def rss_near(t: float) -> float:
        near = sorted(result.rss_over_time, key=lambda s: abs(s[0] - t))[:3]
        return statistics.median(r for _, r, _ in near)

    lat_store = [x for o in outs for x in o["latency"]["store"]]
    lat_retrieve = [x for o in outs for x in o["latency"]["retrieve"]]
    result.figures = {
        "run_seconds": round(run_end, 1),
        "stores": sum(o["stores"] for o in outs),
        "retrieves": sum(o["retrieves"] for o in outs),
        "chunks_checked": sum(o["checked"] for o in outs),
        "mismatches": sum(o["mismatches"] for o in outs),
        "client_errors": sum(o["errors"] for o in outs),
        "refused_stores": int(after["l1_store_refused"]),
        "l1_evictions": int(after["l1"]["evictions"]),
        "l2_prefetched": int(after["l2_prefetched"]),
        "l2_errors": int(after["l2_errors"]),
        "chunks_stored": int(after["stored"]),
        "l2_written": int(after["l2_written"]),
        "l2_writes_superseded": int(after.get("l2_writes_superseded", 0)),
        "l2_writes_dropped": int(after["l2_writes_dropped"]),
        "l2_writes_refused_by": after.get("l2_writes_refused_by", {}),
        "l2_write_failures": int(after["l2_write_failures"]),
        "l1_used_bytes_before_clear": int(stats["l1"]["used_bytes"]),
        "l1_used_bytes_after_clear": int(after["l1"]["used_bytes"]),
        "l1_objects_after_clear": int(after["l1"]["objects"]),
        "rss_start_mb": result.rss_over_time[0][1],
        "rss_half_mb": rss_near(seconds / 2),
        "rss_end_mb": rss_near(seconds),
        "rss_after_clear_mb": final_rss,
        "rss_growth_second_half_mb": rss_near(seconds) - rss_near(seconds / 2),
        "store_p50_ms": _percentile_ms(lat_store, 50),
        "store_p99_ms": _percentile_ms(lat_store, 99),
        "retrieve_p50_ms": _percentile_ms(lat_retrieve, 50),
        "retrieve_p99_ms": _percentile_ms(lat_retrieve, 99),
    }
    if args.ramp is not None:
        result.figures.update(_ramp_figures(samples, args.ramp, args.ramp_step))
    result.messages = redis_events + [m for o in outs for m in o["messages"]]


def _ramp_figures(samples: list[tuple[float, int, int]], start: float, step_s: float) -> dict[str, Any]:
    """Per ramp step: the store rate the server saw (chunks/s, MB/s) and the L2 writes it dropped; the first
    rate with drops, and the highest without."""
    chunk_mb = math.prod(CHUNK_SHAPE) * 2 / MB
    steps: list[dict[str, Any]] = []
    k = 0
    while True:
        lo, hi = k * step_s, (k + 1) * step_s
        inside = [s for s in samples if lo <= s[0] <= hi]
        if len(inside) < 2:
            break
        (t0, stored0, dropped0), (t1, stored1, dropped1) = inside[0], inside[-1]
        rate = (stored1 - stored0) / max(t1 - t0, 1e-9)
        steps.append(
            {
                "target_chunks_per_s": ramp_rate(start, step_s, lo),
                "chunks_per_s": round(rate, 1),
                "mb_per_s": round(rate * chunk_mb, 2),
                "dropped": dropped1 - dropped0,
            }
        )
        k += 1
    first_drop = next((s for s in steps if s["dropped"]), None)
    clean = [s["chunks_per_s"] for s in steps if not s["dropped"]]
    return {
        "ramp_steps": steps,
        "drops_begin_chunks_per_s": None if first_drop is None else first_drop["chunks_per_s"],
        "max_clean_chunks_per_s": max(clean) if clean else None,
        "max_clean_mb_per_s": round(max(clean) * chunk_mb, 2) if clean else None,
    }


def run_with_verdict(args: argparse.Namespace) -> None:
    """``kvtier bench soak``: run, print, exit 1 when a pass criterion fails."""
    result = run(args)
    result.print(args.json)
    if not result.passed:
        sys.exit(1)
