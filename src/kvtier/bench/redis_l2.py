"""``kvtier bench l2 --adapter redis``: store and load of KV chunks through the redis L2 adapter, beside raw
redis-py ``SET`` / ``GET`` of the same bytes on the same server, measured in the same run.

For each value size (``--sizes``, MiB of KV per chunk; the default chunk shape with its layer count scaled), each
round runs, interleaved so that noise hits all alike:

* raw: a redis-py pipeline of ``SET key value`` per batch (``value`` a ready ``bytes`` of the chunk, as a plain
  client would hold it), then a pipeline of ``GET`` (the client's ``bytes`` are the result, no further copy);
* kvtier raw path (no serde): ``L2Tier.store`` (record header + the tensor's own memory, one transaction per
  batch) and ``L2Tier.load_into`` a reused destination tensor (record checked, payload copied in);
* kvtier with fp8 (when the fp8 serde is registered): the same, serialized to half the bytes, beside the raw path.

Each kvtier operation and its baseline are sampled in alternation, the same number of rounds
(:class:`kvtier.bench.common.Harness`). GB/s are bytes of KV (the uncompressed tensor) per second. Without
``--url`` a private ``redis-server`` is started on a free loopback port.
"""

from __future__ import annotations

import argparse
import functools
import uuid

import torch

from kvtier.bench.common import Harness, Op, Report, recording_load
from kvtier.bench.data import DEFAULT_CHUNK_SHAPE, load_kv_file, synthetic_kv
from kvtier.bench.redis_server import LocalRedis
from kvtier.l2.adapters import RedisAdapter, create_l2_adapter
from kvtier.l2.tier import L2Tier, byte_view
from kvtier.serde import registered_serdes
from kvtier.types import ObjectKey

MiB = 1 << 20


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``kvtier bench l2`` gains for ``--adapter redis`` (it shares ``--batch``, ``--rounds``,
    ``--serde``, ``--data`` and ``--json``; ``--chunks``, ``--shape`` and ``--dir`` are for fs)."""
    parser.add_argument(
        "--adapter",
        choices=["fs", "redis", "object_store"],
        default="fs",
        help="the L2 adapter to measure (default: fs)",
    )
    parser.add_argument("--url", default=None, help="redis: a server to use (default: a private redis-server)")
    parser.add_argument("--sizes", default="32,4", help="redis: chunk sizes in MiB of bf16 KV (default: 32,4)")
    parser.add_argument(
        "--mib-per-round", type=int, default=256, help="redis: MiB of KV per operation and round (default: 256)"
    )


def _chunks(args: argparse.Namespace) -> list[tuple[str, torch.Tensor]]:
    if args.data:
        kv = load_kv_file(args.data)
        return [(f"{kv.numel() * kv.element_size() / MiB:.1f} MiB ({args.data})", kv)]
    out = []
    for text in args.sizes.split(","):
        try:
            mib = int(text)
        except ValueError as exc:
            raise SystemExit(f"--sizes: expected integers (MiB), got {text!r}") from exc
        two, _, tokens, hidden = DEFAULT_CHUNK_SHAPE
        per_layer = two * tokens * hidden * 2  # bytes of bf16 KV per layer: 1 MiB
        if mib < 1 or (mib * MiB) % per_layer:
            raise SystemExit(f"--sizes: {mib} MiB is not a whole number of 1 MiB layers")
        out.append((f"{mib} MiB", synthetic_kv((two, mib * MiB // per_layer, tokens, hidden), torch.bfloat16)))
    return out


def run(args: argparse.Namespace) -> Report:
    if args.rounds < 1 or args.batch < 1 or args.mib_per_round < 1 or getattr(args, "workers", 1) < 1:
        raise SystemExit("--rounds, --batch, --workers and --mib-per-round must be >= 1")
    # The raw path without serde is always measured (it is the baseline of every serde); "raw" as a serde is
    # that same path (the serde layer sends the tensor's memory directly), so it adds nothing.
    asked = args.serde if args.serde is not None else (["fp8"] if "fp8" in registered_serdes() else [])
    serdes = [name for name in asked if name != "raw"]
    for name in serdes:
        if name not in registered_serdes():
            raise SystemExit(f"--serde: {name!r} is not registered; known: {registered_serdes()}")
    chunks = _chunks(args)
    server = None if args.url else LocalRedis().start()
    url = args.url or (server.url if server else "")
    report = Report(
        "bench l2 --adapter redis",
        {
            "url": "private redis-server" if server else url,
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
                _bench_size(report, url, label, src, serdes=serdes, args=args)
    finally:
        if server is not None:
            server.close()
    return report


def _bench_size(
    report: Report, url: str, label: str, src: torch.Tensor, *, serdes: list[str], args: argparse.Namespace
) -> None:
    import redis

    nbytes = src.numel() * src.element_size()
    workers = getattr(args, "workers", 1)  # bench l2's --workers: serde threads per adapter
    n = max(1, args.mib_per_round * MiB // nbytes)
    batch = min(args.batch, n)
    prefix = f"kvtier-bench-{uuid.uuid4().hex[:8]}"
    keys = [ObjectKey("bench/model", format(i + 1, "x")) for i in range(n)]
    batches = [keys[i : i + batch] for i in range(0, n, batch)]
    raw_keys = [f"{prefix}-raw:{i}" for i in range(n)]
    raw_batches = [raw_keys[i : i + batch] for i in range(0, n, batch)]
    value = bytes(byte_view(src))  # what a plain client would hold: one bytes object of the chunk
    outs = [torch.empty_like(src) for _ in range(batch)]
    client = redis.Redis.from_url(url)
    tiers: dict[str, L2Tier] = {"kvtier": create_l2_adapter({"type": "redis", "url": url, "key_prefix": prefix})}
    for name in serdes:
        tiers[f"kvtier+{name}"] = create_l2_adapter(
            {
                "type": "redis",
                "url": url,
                "key_prefix": f"{prefix}-{name}",
                "serde": {"type": name, "max_workers": workers},
            }
        )

    def raw_set() -> None:
        for ks in raw_batches:
            pipe = client.pipeline(transaction=False)
            for k in ks:
                pipe.set(k, value)
            pipe.execute()

    def raw_get() -> None:
        for ks in raw_batches:
            pipe = client.pipeline(transaction=False)
            for k in ks:
                pipe.get(k)
            if any(v is None or len(v) != nbytes for v in pipe.execute()):
                raise SystemExit("bench redis: a raw GET missed")

    def store(tier: L2Tier) -> None:
        for ks in batches:
            tier.store(ks, [src] * len(ks))

    def load(tier: L2Tier) -> None:
        for ks in batches:
            if not all(tier.load_into(ks, outs[: len(ks)])):
                raise SystemExit(f"bench redis: {tier.name} load missed")

    h = Harness(args.rounds, order=args.order)
    raw_set_op = Op(f"raw SET {label}", raw_set, n * nbytes)
    raw_get_op = Op(f"raw GET {label}", raw_get, n * nbytes)
    stores = {name: Op(f"{name} store {label}", functools.partial(store, t), n * nbytes) for name, t in tiers.items()}
    loads = {name: Op(f"{name} load {label}", functools.partial(load, t), n * nbytes) for name, t in tiers.items()}
    h.compare(f"kvtier store {label}", stores["kvtier"], raw_set_op)
    h.compare(f"kvtier load {label}", loads["kvtier"], raw_get_op)
    for name in serdes:
        h.compare(f"kvtier+{name} store {label}", stores[f"kvtier+{name}"], stores["kvtier"])
        h.compare(f"kvtier+{name} load {label}", loads[f"kvtier+{name}"], loads["kvtier"])
    try:
        results = h.run(f"bench redis {label}", show_progress=not args.json)
        load(tiers["kvtier"])  # the raw path must give the chunk back bit for bit
        exact = all(torch.equal(o.view(torch.uint8), src.view(torch.uint8)) for o in outs)
        stored = {name: tier.adapter.used_bytes / n for name, tier in tiers.items()}
    finally:
        for tier in tiers.values():
            tier.delete(keys)
            tier.close()
            adapter = tier.adapter
            if isinstance(adapter, RedisAdapter):
                client.delete(*adapter.accounting_keys)
        client.delete(*raw_keys)
        client.close()

    for r in results:
        name = r.label.split(" ")[0]
        r.note = f"{n} chunks of {label} in batches of {batch}; record {stored[name] / MiB:.2f} MiB"
        if r.label == f"kvtier load {label}":
            r.note += f"; bit-exact: {exact}"
    report.add_results(results)
