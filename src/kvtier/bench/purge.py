"""``kvtier bench purge``: purge a model of N records from an L2 tier while another model keeps being served.

An embedded Store with one L2 tier (``fs`` under a temp dir, durability ``none`` unless ``--fsync``; or ``redis``
with ``--redis-url``, or a ``redis-server`` started for the run with ``--redis``) holds ``--records`` small records
of the model to purge and ``--keep`` records of another model. A reader thread retrieves the other model's chunks
(L1 hits: the serving path) before and during the purge. Reported: the purge's wall time and records per second,
how many progress reports it made, and the reader's per-call latency p50 / p99 / max before and during the purge
(the promise: a purge walks L2 in bounded batches and does not stall serving), plus how many of the purged model's
records are left (must be 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from kvtier.storage.store import Store
from kvtier.types import ObjectKey


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int, default=100_000, help="records of the purged model (default 100000)")
    parser.add_argument("--keep", type=int, default=256, help="records of the model kept serving (default 256)")
    parser.add_argument("--batch", type=int, default=500, help="keys per purge batch (default 500)")
    parser.add_argument("--fsync", action="store_true", help="fs durability fsync (default: none)")
    parser.add_argument("--redis-url", default=None, help="purge from this Redis instead of fs")
    parser.add_argument("--redis", action="store_true", help="start a redis-server for the run and purge from it")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=0.0005,
        metavar="S",
        help="the GIL switch interval (default 0.0005 s, what `kvtier server` runs with; CPython's own is 0.005)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _quantiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50_us": 0.0, "p99_us": 0.0, "max_us": 0.0, "calls": 0}
    s = sorted(samples)
    return {
        "p50_us": round(statistics.median(s) * 1e6, 1),
        "p99_us": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6, 1),
        "max_us": round(s[-1] * 1e6, 1),
        "calls": len(s),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    # A thread that releases the GIL for each syscall (an unlink) waits up to the switch interval to get it back
    # while another thread computes: the server shortens the interval for the same reason.
    sys.setswitchinterval(args.switch_interval)
    tmp = tempfile.mkdtemp(prefix="kvtier-bench-purge-")
    redis_server = None
    try:
        if args.redis:
            from kvtier.bench.redis_server import LocalRedis

            redis_server = LocalRedis().start()
            args.redis_url = redis_server.url
        if args.redis_url:
            l2: dict[str, Any] = {"type": "redis", "url": args.redis_url, "key_prefix": f"bench-purge-{time.time_ns()}"}
        else:
            l2 = {"type": "fs", "base_path": tmp, "durability": "fsync" if args.fsync else "none"}
        with Store(0.25, l2_adapters=[l2], max_pending_l2_writes=1024) as store:
            tensor = torch.zeros(2, 1, 4, 16, dtype=torch.bfloat16)  # 256 bytes: the walk, not the bytes, is measured
            purged = [ObjectKey("bench/purged", format(0x100000 + i, "x")) for i in range(args.records)]
            keep = [ObjectKey("bench/kept", format(0x100 + i, "x")) for i in range(args.keep)]
            t0 = time.perf_counter()
            for i in range(0, len(purged), 256):
                part = purged[i : i + 256]
                store.store(part, [tensor] * len(part))
                if i % 8192 == 0:
                    store.flush()  # keep the write queue from dropping
            store.store(keep, [tensor] * len(keep))
            store.flush()
            fill_s = time.perf_counter() - t0
            store.clear_l1()
            store.retrieve(keep)  # the kept model in L1: the reader measures the serving path

            phase = ["before"]
            lat: dict[str, list[float]] = {"before": [], "during": []}
            stop = threading.Event()

            def reader() -> None:
                i = 0
                while not stop.is_set():
                    key = keep[i % len(keep)]
                    start = time.perf_counter()
                    store.retrieve([key])
                    lat.setdefault(phase[0], []).append(time.perf_counter() - start)
                    i += 1

            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            time.sleep(1.0)
            reports = [0]
            phase[0] = "during"
            t0 = time.perf_counter()
            result = store.purge(
                model_name="bench/purged",
                batch_size=args.batch,
                progress=lambda d: reports.__setitem__(0, reports[0] + 1),
            )
            purge_s = time.perf_counter() - t0
            phase[0] = "after"
            stop.set()
            thread.join()
            left = sum(store._tiers[0].contains(purged[i : i + 1000]).count(True) for i in range(0, len(purged), 1000))
        doc = {
            "l2": l2["type"] + (" (fsync)" if l2.get("durability") == "fsync" else ""),
            "switch_interval_s": args.switch_interval,
            "records": args.records,
            "batch": args.batch,
            "fill_s": round(fill_s, 2),
            "purge_s": round(purge_s, 3),
            "records_per_s": round(result["l2_deleted"] / purge_s) if purge_s else None,
            "l2_deleted": result["l2_deleted"],
            "progress_reports": reports[0],
            "left_after": left,
            "reader_before": _quantiles(lat["before"]),
            "reader_during": _quantiles(lat["during"]),
            "errors": result["errors"],
        }
    finally:
        if redis_server is not None:
            redis_server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return doc


class _Printable(dict[str, Any]):
    def print(self, as_json: bool) -> None:
        if as_json:
            print(json.dumps(self, indent=2))
            return
        b, d = self["reader_before"], self["reader_during"]
        print(
            f"purge of {self['l2_deleted']} records from {self['l2']} in {self['purge_s']} s "
            f"({self['records_per_s']} records/s, batches of {self['batch']}, {self['progress_reports']} progress "
            f"reports); left after: {self['left_after']}\n"
            f"reader (L1 retrieve of another model) before: p50 {b['p50_us']} us, p99 {b['p99_us']} us, "
            f"max {b['max_us']} us ({b['calls']} calls)\n"
            f"reader during the purge:                    p50 {d['p50_us']} us, p99 {d['p99_us']} us, "
            f"max {d['max_us']} us ({d['calls']} calls)"
        )


def run(args: argparse.Namespace) -> _Printable:
    return _Printable(measure(args))
