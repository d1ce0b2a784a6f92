"""``kvtier bench l2 --adapter object_store``: store and load of KV chunks through the object-store L2 adapter,
beside the client library's (obstore's) plain put / get of the same bytes on the same endpoint, in the same run.

For each chunk size (``--sizes``, MiB of bf16 KV), each round runs, interleaved so that noise hits all alike:

* plain: ``obstore.put`` of each chunk (a ready ``bytes``, as a plain client would hold it; one PUT per object
  like the adapter's, where obstore's default would split a 32 MiB body into 5 MiB parts), the batch's puts
  concurrent on a thread pool as large as the batch, then ``obstore.get(...).bytes()`` of each (the client's
  buffer is the result, no further copy); the same client settings as the adapter's;
* kvtier raw path (no serde): ``L2Tier.store`` (record header + the tensor's own memory, a conditional PUT per
  record) and ``L2Tier.load_into`` a reused destination tensor (record checked, body streamed into it);
* kvtier with fp8 (when registered): the same, serialized to half the bytes.

Each kvtier operation and its baseline are sampled in alternation, the same number of rounds
(:class:`kvtier.bench.common.Harness`), for wall time (GB/s of KV); each call also records the client's
CPU-seconds (this process, all threads: user + system) per GB of KV, and peak RSS above the op's start (sampled
every 2 ms). Without ``--endpoint`` a private moto S3 server is started on loopback; it is single-process Python
and limits both sides alike, which is why the CPU figures matter. Every store goes to fresh keys (the adapter
never uploads a key twice): each store call (and plain put) writes a new generation of keys, and each load
reads the generation its store wrote last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from kvtier.bench.common import GB, Figure, Harness, Op, Report, recording_load
from kvtier.bench.local_s3 import LocalS3
from kvtier.bench.redis_l2 import _chunks
from kvtier.l2.adapters import ObjectStoreAdapter, create_l2_adapter
from kvtier.l2.tier import L2Tier, byte_view
from kvtier.serde import registered_serdes
from kvtier.types import ObjectKey

MiB = 1 << 20


def add_object_store_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``kvtier bench l2`` gains for ``--adapter object_store`` (it shares ``--sizes``,
    ``--mib-per-round``, ``--batch``, ``--rounds``, ``--serde``, ``--workers``, ``--data`` and ``--json``)."""
    parser.add_argument(
        "--endpoint", default=None, help="object_store: an S3 endpoint URL to use (default: a private moto server)"
    )
    parser.add_argument("--bucket", default=None, help="object_store: the bucket on --endpoint (it must exist)")


class _RssPeak:
    """Peak resident set size above the start, sampled from /proc/self/statm on a thread."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    @contextmanager
    def measure(self) -> Iterator[None]:
        start = self._rss()
        peak = start
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.002):
                peak = max(peak, self._rss())

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join()
            self.peak = max(peak, self._rss()) - start


def _tracked(fn: Callable[[], object], into: list[tuple[float, int]]) -> Callable[[], None]:
    """``fn``, appending each call's process CPU seconds and peak RSS growth (bytes) to ``into``."""

    def go() -> None:
        rss = _RssPeak()
        with rss.measure():
            cpu = time.process_time()
            fn()
            cpu = time.process_time() - cpu
        into.append((cpu, rss.peak))

    return go


def run(args: argparse.Namespace) -> Report:
    if args.rounds < 1 or args.batch < 1 or args.mib_per_round < 1 or getattr(args, "workers", 1) < 1:
        raise SystemExit("--rounds, --batch, --workers and --mib-per-round must be >= 1")
    if (args.endpoint is None) != (args.bucket is None):
        raise SystemExit("--endpoint and --bucket go together (without them a private moto server is used)")
    asked = args.serde if args.serde is not None else (["fp8"] if "fp8" in registered_serdes() else [])
    serdes = [name for name in asked if name != "raw"]
    for name in serdes:
        if name not in registered_serdes():
            raise SystemExit(f"--serde: {name!r} is not registered; known: {registered_serdes()}")
    chunks = _chunks(args)
    server = None
    if args.endpoint is None:
        try:
            server = LocalS3(bucket="kvtier-bench").start()
        except RuntimeError as exc:
            raise SystemExit(f"bench l2 --adapter object_store: {exc}") from exc
        endpoint, bucket, options = server.endpoint, "kvtier-bench", server.options()
    else:
        endpoint, bucket, options = args.endpoint, args.bucket, {"endpoint": args.endpoint}
    report = Report(
        "bench l2 --adapter object_store",
        {
            "endpoint": "private moto server (loopback)" if server else endpoint,
            "sizes": [label for label, _ in chunks],
            "batch": args.batch,
            "mib_per_round": args.mib_per_round,
            "rounds": args.rounds,
            "order": args.order,
            "serdes": serdes,
            "serde_workers": getattr(args, "workers", 1),
        },
    )
    try:
        with recording_load(report):
            for label, src in chunks:
                _bench_size(report, bucket, options, label, src, serdes=serdes, args=args)
    finally:
        if server is not None:
            server.stop()
    return report


def _bench_size(
    report: Report,
    bucket: str,
    options: dict[str, str],
    label: str,
    src: torch.Tensor,
    *,
    serdes: list[str],
    args: argparse.Namespace,
) -> None:
    import obstore

    nbytes = src.numel() * src.element_size()
    n = max(1, args.mib_per_round * MiB // nbytes)
    batch = min(args.batch, n)
    run_id = uuid.uuid4().hex[:8]
    cfg = {"type": "object_store", "url": f"s3://{bucket}/kvtier-bench-{run_id}", "options": options}
    tiers: dict[str, L2Tier] = {"kvtier": create_l2_adapter({**cfg, "url": f"{cfg['url']}/raw"})}
    for name in serdes:
        tiers[f"kvtier+{name}"] = create_l2_adapter(
            {**cfg, "url": f"{cfg['url']}/{name}", "serde": {"type": name, "max_workers": args.workers}}
        )
    # The plain client: the same settings the adapter gives obstore (unsigned payload, http allowed, retries).
    adapter = tiers["kvtier"].adapter
    assert isinstance(adapter, ObjectStoreAdapter)
    plain = adapter.new_client()
    value = bytes(byte_view(src))  # what a plain client would hold: one bytes object of the chunk
    outs = [torch.empty_like(src) for _ in range(batch)]
    pool = ThreadPoolExecutor(batch)
    # generation[name]: the last generation of keys ``name``'s store (or plain put) wrote; its load reads it
    generation: dict[str, int] = {}
    top = [0]

    def fresh(name: str) -> Callable[[], None]:
        def go() -> None:
            top[0] += 1
            generation[name] = top[0]

        return go

    def names(r: int) -> list[list[str]]:
        keys = [f"kvtier-bench-{run_id}/plain/{r}/{i}" for i in range(n)]
        return [keys[i : i + batch] for i in range(0, n, batch)]

    def object_keys(r: int) -> list[list[ObjectKey]]:
        keys = [ObjectKey("bench/model", format((r << 20) + i + 1, "x")) for i in range(n)]
        return [keys[i : i + batch] for i in range(0, n, batch)]

    def plain_put() -> None:
        for ks in names(generation["plain"]):
            list(pool.map(lambda k: obstore.put(plain, k, value, use_multipart=False), ks))

    def plain_get() -> None:
        for ks in names(generation["plain"]):
            for got in pool.map(lambda k: obstore.get(plain, k).bytes(), ks):
                if len(got) != nbytes:
                    raise SystemExit("bench object_store: a plain GET came back short")

    def store(name: str, tier: L2Tier) -> Callable[[], None]:
        def go() -> None:
            for ks in object_keys(generation[name]):
                tier.store(ks, [src] * len(ks))

        return go

    def load(name: str, tier: L2Tier) -> Callable[[], None]:
        def go() -> None:
            for ks in object_keys(generation[name]):
                if not all(tier.load_into(ks, outs[: len(ks)])):
                    raise SystemExit(f"bench object_store: {tier.name} load missed")

        return go

    total = n * nbytes
    extra: dict[str, list[tuple[float, int]]] = {}

    def op(name: str, fn: Callable[[], None], setup: Callable[[], None] | None = None) -> Op:
        extra[name] = []
        return Op(f"{name} {label}", _tracked(fn, extra[name]), total, setup=setup)

    ops = {"plain put": op("plain put", plain_put, fresh("plain")), "plain get": op("plain get", plain_get)}
    for name, tier in tiers.items():
        ops[f"{name} store"] = op(f"{name} store", store(name, tier), fresh(name))
        ops[f"{name} load"] = op(f"{name} load", load(name, tier))
    h = Harness(args.rounds, order=args.order)
    h.compare(f"kvtier store {label}", ops["kvtier store"], ops["plain put"])
    h.compare(f"kvtier load {label}", ops["kvtier load"], ops["plain get"])
    for name in serdes:
        for what in ("store", "load"):
            h.compare(f"kvtier+{name} {what} {label}", ops[f"kvtier+{name} {what}"], ops[f"kvtier {what}"])
    try:
        results = h.run(f"bench object_store {label}", show_progress=not args.json)
        load("kvtier", tiers["kvtier"])()  # the raw path must give the chunk back bit for bit
        exact = all(torch.equal(o.view(torch.uint8), src.view(torch.uint8)) for o in outs)
        stored = {k: t.adapter.used_bytes / max(1, t.adapter.stats()["records"]) for k, t in tiers.items()}
    finally:
        pool.shutdown()
        for tier in tiers.values():
            for r in range(top[0] + 1):
                for ks in object_keys(r):
                    tier.delete(ks)
            tier.close()
        for r in range(top[0] + 1):
            for plain_keys in names(r):
                obstore.delete(plain, plain_keys)

    cpu = {k: statistics.median(c for c, _ in v) / (total / GB) for k, v in extra.items()}  # s per GB
    rss = {k: max(r for _, r in v) / MiB for k, v in extra.items()}
    note = f"{n} chunks of {label} in batches of {batch}"
    for res in results:
        name = res.label.split(" ")[0]
        res.note = f"{note}; record {stored[name] / MiB:.2f} MiB"
        if res.label == f"kvtier load {label}":
            res.note += f"; bit-exact: {exact}"
    report.add_results(results)
    for what, base in (("store", "plain put"), ("load", "plain get")):
        key = f"kvtier {what}"
        report.add(
            Figure(
                f"{key} {label}: KV per client CPU-second",
                1 / cpu[key],
                unit="GB/CPU-s",
                baseline=f"{base} {label}",
                baseline_value=1 / cpu[base],
                note=f"{cpu[key]:.3f} vs {cpu[base]:.3f} CPU-s/GB (user+system, all threads; median call)",
            )
        )
        report.add(
            Figure(
                f"{key} {label}: peak RSS growth",
                rss[key],
                unit="MiB",
                baseline=f"{base} {label}",
                baseline_value=rss[base],
                note="peak RSS above the op's start, sampled every 2 ms; lower is better",
            )
        )
    for name in serdes:
        for what in ("store", "load"):
            key = f"kvtier+{name} {what}"
            report.add(
                Figure(f"{key} {label}: client CPU-s per GB of KV", cpu[key], unit="CPU-s/GB", note="incl. serde")
            )
