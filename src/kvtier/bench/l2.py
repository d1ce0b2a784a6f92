"""``kvtier bench l2``: store, hot load and cold load of KV chunks through the fs adapter, beside a plain-file
write+fsync / cold read of the same bytes and a memcpy, measured in the same run.

Each round: plain files written and fsynced, then the same chunks stored through the fs adapter (durability
fsync); the page cache is dropped for both sets of files (``posix_fadvise(DONTNEED)``; possible because they are
fsynced, so no page is dirty); plain cold read into a reused buffer; cold load through the adapter (read, record
check, deserialize into a reused destination); hot load (the same, with the pages now cached); memcpy. Chunks go
through in batches of ``--batch`` so memory stays at a few chunks whatever ``--chunks`` is.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kvtier.bench import object_store_l2, redis_l2
from kvtier.bench.common import Figure, Report, median_rate, parse_shape, progress, timed
from kvtier.bench.data import DEFAULT_CHUNK_SHAPE, load_kv_file, synthetic_kv
from kvtier.l2.adapters import FSAdapter, create_l2_adapter
from kvtier.l2.tier import byte_view
from kvtier.serde import registered_serdes
from kvtier.types import ObjectKey, parse_dtype

#: targets of the storage issue: (figure, baseline figure, minimum ratio)
TARGETS = {
    ("raw", "cold load"): ("plain cold read", 0.8),
    ("fp8", "cold load"): ("raw cold load", 1.2),
    ("fp8", "hot load"): ("memcpy", 0.4),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=64, help="chunks per round (default: 64 = 2 GiB of KV)")
    parser.add_argument("--shape", default=",".join(map(str, DEFAULT_CHUNK_SHAPE)), help="chunk shape")
    parser.add_argument("--dtype", default="bfloat16", help="chunk dtype (default: bfloat16)")
    parser.add_argument("--data", default=None, help="a safetensors file whose 'kv' tensor is the chunk")
    parser.add_argument(
        "--serde",
        action="append",
        default=None,
        help="serde type to measure, repeatable (default: raw, and fp8 when registered)",
    )
    parser.add_argument("--workers", type=int, default=1, help="serde threads (max_workers) per adapter (default: 1)")
    parser.add_argument("--batch", type=int, default=4, help="chunks per store / load batch (default: 4)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--dir", default=None, help="directory for the files (default: the temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    redis_l2.add_redis_arguments(parser)
    object_store_l2.add_object_store_arguments(parser)


def _drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(args: argparse.Namespace) -> Report:
    if args.adapter == "redis":
        return redis_l2.run(args)
    if args.adapter == "object_store":
        return object_store_l2.run(args)
    if args.chunks < 1 or args.rounds < 1 or args.batch < 1 or args.workers < 1:
        raise SystemExit("--chunks, --batch, --workers and --rounds must be >= 1")
    serdes = args.serde or ["raw", *(["fp8"] if "fp8" in registered_serdes() else [])]
    for name in serdes:
        if name not in registered_serdes():
            raise SystemExit(f"--serde: {name!r} is not registered; known: {registered_serdes()}")
    src = load_kv_file(args.data) if args.data else synthetic_kv(parse_shape(args.shape), parse_dtype(args.dtype))
    nbytes = src.numel() * src.element_size()
    batch = min(args.batch, args.chunks)
    root = Path(tempfile.mkdtemp(prefix="kvtier-bench-l2-", dir=args.dir))
    keys = [ObjectKey("bench/model", format(i + 1, "x")) for i in range(args.chunks)]
    batches = [keys[i : i + batch] for i in range(0, len(keys), batch)]
    srcs = [src] * batch
    outs = [torch.empty_like(src) for _ in range(batch)]
    plain_buf = torch.empty(nbytes, dtype=torch.uint8)
    plain_paths = [root / "plain" / f"{i}.bin" for i in range(args.chunks)]
    (root / "plain").mkdir()
    tiers = {
        name: create_l2_adapter(
            {
                "type": "fs",
                "base_path": str(root / name),
                "durability": "fsync",
                "serde": {"type": name, "max_workers": args.workers},
            }
        )
        for name in serdes
    }
    samples: dict[str, list[float]] = {"memcpy": [], "plain write+fsync": [], "plain cold read": []}
    for name in serdes:
        for op in ("store", "cold load", "hot load"):
            samples[f"{name} {op}"] = []
    total = args.chunks * nbytes
    payload = byte_view(src)

    def plain_write() -> None:
        for path in plain_paths:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)

    def plain_read() -> None:
        view = byte_view(plain_buf)
        for path in plain_paths:
            with open(path, "rb", buffering=0) as f:
                f.readinto(view)

    def load_all(name: str) -> None:
        tier = tiers[name]
        for ks in batches:
            hits = tier.load_into(ks, outs[: len(ks)])
            if not all(hits):
                raise SystemExit(f"bench l2: {name} load missed {hits.count(False)} chunk(s)")

    def store_all(name: str) -> None:
        for ks in batches:
            tiers[name].store(ks, srcs[: len(ks)])

    memcpy_dst = torch.empty_like(src)
    exact: dict[str, bool] = {}
    try:
        # Warm-up, untimed: touches the destination pages, starts the adapters, grows the serde scratch.
        memcpy_dst.copy_(src)
        for name, tier in tiers.items():
            tier.store(batches[0], srcs[: len(batches[0])])
            load_all_first = tier.load_into(batches[0], outs[: len(batches[0])])
            if not all(load_all_first):
                raise SystemExit(f"bench l2: {name} warm-up load missed")
        with progress(args.rounds, "bench l2", enabled=not args.json) as advance:
            for _ in range(args.rounds):
                samples["plain write+fsync"].append(timed(plain_write))
                for name in tiers:
                    samples[f"{name} store"].append(timed(functools.partial(store_all, name)))
                _drop_cache(plain_paths)
                samples["plain cold read"].append(timed(plain_read))
                for name, tier in tiers.items():
                    adapter = tier.adapter
                    assert isinstance(adapter, FSAdapter)
                    _drop_cache([adapter.path_for(k.to_str()) for k in keys])
                    samples[f"{name} cold load"].append(timed(functools.partial(load_all, name)))
                    samples[f"{name} hot load"].append(timed(functools.partial(load_all, name)))
                    exact[name] = torch.equal(outs[0].view(torch.uint8), src.view(torch.uint8))
                samples["memcpy"].append(timed(lambda: memcpy_dst.copy_(src)))
                advance()
        record_bytes = {name: tier.adapter.used_bytes / args.chunks for name, tier in tiers.items()}
    finally:
        for tier in tiers.values():
            tier.close()
        shutil.rmtree(root, ignore_errors=True)

    rates = {name: median_rate(s, nbytes if name == "memcpy" else total) for name, s in samples.items()}
    report = Report(
        "l2",
        {
            "adapter": "fs (durability fsync)",
            "serdes": serdes,
            "chunks": args.chunks,
            "shape": list(src.shape),
            "dtype": str(src.dtype).removeprefix("torch."),
            "gib_per_round": round(total / (1 << 30), 3),
            "batch": batch,
            "serde_workers": args.workers,
            "rounds": args.rounds,
            "data": args.data or "synthetic",
        },
    )
    report.add(Figure("memcpy (reused buffer)", rates["memcpy"]))
    report.add(Figure("plain write+fsync", rates["plain write+fsync"]))
    report.add(Figure("plain cold read", rates["plain cold read"]))
    baselines = {"store": "plain write+fsync", "cold load": "plain cold read", "hot load": "memcpy"}
    for name in serdes:
        for op in ("store", "cold load", "hot load"):
            base, target = baselines[op], None
            if (name, op) in TARGETS:
                base, target = TARGETS[(name, op)]
            base_rate = rates[base]
            note = f"{record_bytes[name] / nbytes:.3f} bytes on disk per byte of KV"
            if op == "hot load":
                note = "bit-exact" if exact[name] else "lossy"
            report.add(
                Figure(
                    f"{name} {op} (GB/s of KV)",
                    rates[f"{name} {op}"],
                    baseline=base,
                    baseline_value=base_rate,
                    target=target,
                    note=note,
                )
            )
    return report
