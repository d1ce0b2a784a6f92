"""``kvtier bench l2``: KV chunks through the serde alone, the L2 tier alone and the whole Store, each sampled in
alternation with its baseline (see :class:`kvtier.bench.common.Harness`).

Modes (``--mode``, repeatable; default all three), each for every ``--serde`` (default raw, and fp8 when
registered) on the fs adapter with ``--durability`` (``none``: the page cache; ``fsync``: every record on disk
before the store returns):

* ``encode``: the serde alone at the store's ``max_workers`` (``--workers``), serialize and deserialize, beside a
  memcpy of the same bytes (the floor of a pass over them). No I/O.
* ``tier``: an ``L2Tier`` alone (the fs adapter and its serde). Store beside a plain write of the same bytes with
  the same durability (raw) or beside the encode alone (fp8: the writes should hide behind the encode); hot
  load beside a plain read of the same bytes from the page cache (raw) or the decode alone (fp8); cold load
  (page cache dropped before each call, untimed) beside a plain cold read of the same bytes (raw) or the raw
  tier's cold load (fp8).
* ``store``: the whole ``Store`` (L1 + the fs tier with its write-behind): ``store()`` of every chunk and
  ``flush()``, L1 emptied before each call (untimed), beside the same baselines as the tier's store; hot load
  (``retrieve_into`` after L1 was emptied, the records in the page cache) beside the tier alone loading the
  same records from its own directory.

Chunks go through in batches of ``--batch`` so the sources and destinations stay at a few chunks whatever
``--chunks`` is; a Store's L1 is sized to hold every chunk twice (a write-behind never finds it full).
``--adapter redis`` / ``object_store`` run those adapters' benches instead (store and load beside their client
library's plain put / get, on the same harness).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from kvtier.bench import object_store_l2, redis_l2
from kvtier.bench.common import Harness, Op, PairResult, Report, add_harness_arguments, parse_shape, recording_load
from kvtier.bench.data import DEFAULT_CHUNK_SHAPE, load_kv_file, synthetic_kv
from kvtier.l2.adapters import FSAdapter, create_l2_adapter
from kvtier.l2.tier import L2Tier, byte_view
from kvtier.serde import LayoutDesc, create_serde_processor, registered_serdes
from kvtier.serde.processor import AsyncSerdeProcessor
from kvtier.storage.store import Store
from kvtier.types import KVFormat, ObjectKey, parse_dtype

MODES = ("encode", "tier", "store")
GiB = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        action="append",
        choices=MODES,
        default=None,
        help="encode (the serde alone), tier (the L2 tier alone), store (the whole Store); repeatable (default: all)",
    )
    parser.add_argument("--chunks", type=int, default=64, help="chunks per call (default: 64 = 2 GiB of KV)")
    parser.add_argument("--shape", default=",".join(map(str, DEFAULT_CHUNK_SHAPE)), help="chunk shape")
    parser.add_argument("--dtype", default="bfloat16", help="chunk dtype (default: bfloat16)")
    parser.add_argument("--data", default=None, help="a safetensors file whose 'kv' tensor is the chunk")
    parser.add_argument(
        "--serde",
        action="append",
        default=None,
        help="serde type to measure, repeatable (default: raw, and fp8 when registered)",
    )
    parser.add_argument("--workers", type=int, default=1, help="serde threads (max_workers) (default: 1)")
    parser.add_argument(
        "--durability",
        choices=("none", "fsync"),
        default="none",
        help="the fs adapter's durability, and the plain write's: none (page cache) or fsync (default: none)",
    )
    parser.add_argument("--batch", type=int, default=4, help="chunks per store / load call (default: 4)")
    parser.add_argument("--dir", default=None, help="directory for the files (default: the temp dir)")
    add_harness_arguments(parser, rounds=3)
    redis_l2.add_redis_arguments(parser)
    object_store_l2.add_object_store_arguments(parser)


def _drop_cache(paths: list[Path]) -> None:
    """Evict ``paths`` from the page cache: written back first (``fdatasync``), since a dirty page stays."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Chunks:
    """The KV of one run: a source chunk, its keys in batches, reused destinations, and the plain-file baselines
    (the same bytes written / read without kvtier) under ``root``."""

    def __init__(self, src: torch.Tensor, chunks: int, batch: int, root: Path, durability: str) -> None:
        self.src = src
        self.nbytes = src.numel() * src.element_size()
        self.total = chunks * self.nbytes
        self.keys = [ObjectKey("bench/model", format(i + 1, "x")) for i in range(chunks)]
        self.batches = [self.keys[i : i + batch] for i in range(0, chunks, batch)]
        self.srcs = [src] * batch
        self.outs = [torch.empty_like(src) for _ in range(batch)]
        self.kv_format = KVFormat.KV_LAYER_TOKEN_HIDDEN if src.dim() == 4 and src.shape[0] == 2 else KVFormat.FLAT
        self.fsync = durability == "fsync"
        self.durability = "fsync" if self.fsync else "no fsync"
        self.payload = byte_view(src)
        self.plain_dir = root / "plain"
        self.plain_dir.mkdir()
        self.plain_paths = [self.plain_dir / f"{i}.bin" for i in range(chunks)]
        self.read_buf = torch.empty(self.nbytes, dtype=torch.uint8)
        self.memcpy_dst = torch.empty_like(src)

    # the baselines
    def memcpy(self) -> None:
        for ks in self.batches:
            for _ in ks:
                self.memcpy_dst.copy_(self.src)

    def plain_write(self) -> None:
        for path in self.plain_paths:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, self.payload)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def plain_read(self) -> None:
        view = byte_view(self.read_buf)
        for path in self.plain_paths:
            with open(path, "rb", buffering=0) as f:
                f.readinto(view)

    def drop_plain(self) -> None:
        _drop_cache(self.plain_paths)

    # kvtier's paths
    def tier_store(self, tier: L2Tier) -> Callable[[], None]:
        def go() -> None:
            for ks in self.batches:
                tier.store(ks, self.srcs[: len(ks)])

        return go

    def tier_load(self, tier: L2Tier) -> Callable[[], None]:
        def go() -> None:
            for ks in self.batches:
                hits = tier.load_into(ks, self.outs[: len(ks)])
                if not all(hits):
                    raise SystemExit(f"bench l2: {tier.name} load missed {hits.count(False)} chunk(s)")

        return go

    def drop_tier(self, tier: L2Tier) -> Callable[[], None]:
        adapter = tier.adapter
        assert isinstance(adapter, FSAdapter)
        return lambda: _drop_cache([adapter.path_for(k.to_str()) for k in self.keys])

    def encode(self, serde: AsyncSerdeProcessor) -> tuple[Callable[[], None], Callable[[], None]]:
        """(serialize every chunk, deserialize every chunk) through ``serde``, batch by batch."""
        layout = LayoutDesc.of(self.src, self.kv_format)
        n = len(self.srcs)
        dsts = [torch.empty(serde.estimate_serialized_size(layout), dtype=torch.uint8) for _ in range(n)]
        sizes = serde.serialize_batch(self.srcs, dsts)
        payloads = [d[:s] for d, s in zip(dsts, sizes, strict=True)]

        def ser() -> None:
            for ks in self.batches:
                serde.serialize_batch(self.srcs[: len(ks)], dsts[: len(ks)])

        def de() -> None:
            for ks in self.batches:
                serde.deserialize_batch(payloads[: len(ks)], self.outs[: len(ks)])

        return ser, de

    def store_store(self, store: Store) -> Callable[[], None]:
        def go() -> None:
            for ks in self.batches:
                store.store(ks, self.srcs[: len(ks)])
            store.flush()
            dropped = store.counts["l2_writes_dropped"]
            if dropped:
                raise SystemExit(f"bench l2: the Store dropped {dropped} L2 write(s); L1 is too small")

        return go

    def store_load(self, store: Store) -> Callable[[], None]:
        def go() -> None:
            for ks in self.batches:
                n = store.retrieve_into(ks, self.outs[: len(ks)])
                if n != len(ks):
                    raise SystemExit(f"bench l2: the Store's load missed {len(ks) - n} chunk(s)")

        return go


def _serde_config(name: str, workers: int) -> dict[str, object]:
    return {"type": name, "max_workers": workers}


def _tier(root: Path, name: str, serde: str, args: argparse.Namespace) -> L2Tier:
    return create_l2_adapter(
        {
            "type": "fs",
            "base_path": str(root / name),
            "durability": args.durability,
            "serde": _serde_config(serde, args.workers),
        }
    )


@contextmanager
def _encode_mode(h: Harness, c: _Chunks, serdes: list[str], args: argparse.Namespace) -> Iterator[None]:
    memcpy = Op("memcpy", c.memcpy, c.total)
    with ExitStack() as stack:
        for name in serdes:
            serde = stack.enter_context(create_serde_processor(_serde_config(name, args.workers)))
            ser, de = c.encode(serde)
            workers = f"max_workers {args.workers}; no I/O"
            h.compare(f"encode: {name} serialize", Op(f"{name} serialize", ser, c.total), memcpy, workers)
            h.compare(f"encode: {name} deserialize", Op(f"{name} deserialize", de, c.total), memcpy, workers)
        yield


@contextmanager
def _tier_mode(h: Harness, c: _Chunks, serdes: list[str], root: Path, args: argparse.Namespace) -> Iterator[None]:
    d = c.durability
    plain_write = Op(f"plain write ({d})", c.plain_write, c.total)
    c.plain_write()  # the files the plain reads read
    plain_hot = Op("plain read (page cache)", c.plain_read, c.total)
    plain_cold = Op("plain cold read", c.plain_read, c.total, setup=c.drop_plain)
    cold_loads: dict[str, Op] = {}
    with ExitStack() as stack:
        for name in serdes:
            tier = _tier(root, f"tier-{name}", name, args)
            stack.callback(tier.close)
            tier_store = Op(f"tier {name} store ({d})", c.tier_store(tier), c.total)
            hot = Op(f"tier {name} hot load", c.tier_load(tier), c.total)
            cold = cold_loads[name] = Op(f"tier {name} cold load", c.tier_load(tier), c.total, c.drop_tier(tier))
            note = f"fs, durability {args.durability}"
            if name == "raw":
                h.compare(f"tier: raw store ({d})", tier_store, plain_write, note)
                h.compare("tier: raw hot load", hot, plain_hot, "records in the page cache")
                h.compare("tier: raw cold load", cold, plain_cold, "page cache dropped before each call")
                continue
            serde = stack.enter_context(create_serde_processor(_serde_config(name, args.workers)))
            ser, de = c.encode(serde)
            encode = Op(f"{name} encode alone", ser, c.total)
            decode = Op(f"{name} decode alone", de, c.total)
            h.compare(f"tier: {name} store ({d})", tier_store, encode, f"{note}; GB/s of KV")
            h.compare(f"tier: {name} hot load", hot, decode, "records in the page cache; GB/s of KV")
            raw_cold = cold_loads.get("raw")
            h.compare(f"tier: {name} cold load", cold, raw_cold or plain_cold, "page cache dropped; GB/s of KV")
        yield


@contextmanager
def _store_mode(h: Harness, c: _Chunks, name: str, root: Path, args: argparse.Namespace) -> Iterator[None]:
    """The whole Store with serde ``name`` (one serde at a time: a Store's L1 holds every chunk twice)."""
    d = c.durability
    l1_gb = 2 * c.total / GiB + 0.25  # every chunk twice: a write-behind never finds L1 half full
    adapter = {
        "type": "fs",
        "base_path": str(root / f"store-{name}"),
        "durability": args.durability,
        "serde": _serde_config(name, args.workers),
    }
    with ExitStack() as stack:
        store = stack.enter_context(Store(l1_size_gb=l1_gb, l2_adapters=[adapter]))
        alone = _tier(root, f"store-tier-{name}", name, args)
        stack.callback(alone.close)
        c.tier_store(alone)()  # the records the tier alone loads, the same bytes as the Store's
        store_op = Op(f"Store {name} store ({d})", c.store_store(store), c.total, setup=store.clear_l1)
        load_op = Op(f"Store {name} hot load", c.store_load(store), c.total, setup=store.clear_l1)
        tier_load = Op(f"tier {name} hot load", c.tier_load(alone), c.total)
        note = f"store() + flush(), L1 emptied before; fs, durability {args.durability}"
        if name == "raw":
            h.compare(f"Store: raw store ({d})", store_op, Op(f"plain write ({d})", c.plain_write, c.total), note)
        else:
            serde = stack.enter_context(create_serde_processor(_serde_config(name, args.workers)))
            encode = Op(f"{name} encode alone", c.encode(serde)[0], c.total)
            h.compare(f"Store: {name} store ({d})", store_op, encode, f"{note}; GB/s of KV")
        h.compare(f"Store: {name} hot load", load_op, tier_load, "retrieve_into, L1 emptied before, records cached")
        yield


def run(args: argparse.Namespace) -> Report:
    if args.adapter == "redis":
        return redis_l2.run(args)
    if args.adapter == "object_store":
        return object_store_l2.run(args)
    if args.chunks < 1 or args.rounds < 1 or args.batch < 1 or args.workers < 1:
        raise SystemExit("--chunks, --batch, --workers and --rounds must be >= 1")
    modes = [m for m in MODES if m in (args.mode or MODES)]
    serdes = args.serde or ["raw", *(["fp8"] if "fp8" in registered_serdes() else [])]
    for name in serdes:
        if name not in registered_serdes():
            raise SystemExit(f"--serde: {name!r} is not registered; known: {registered_serdes()}")
    src = load_kv_file(args.data) if args.data else synthetic_kv(parse_shape(args.shape), parse_dtype(args.dtype))
    batch = min(args.batch, args.chunks)
    report = Report(
        "l2",
        {
            "modes": modes,
            "adapter": "fs",
            "durability": args.durability,
            "serdes": serdes,
            "serde_workers": args.workers,
            "chunks": args.chunks,
            "shape": list(src.shape),
            "dtype": str(src.dtype).removeprefix("torch."),
            "gib_per_call": round(args.chunks * src.numel() * src.element_size() / GiB, 3),
            "batch": batch,
            "rounds": args.rounds,
            "order": args.order,
            "data": args.data or "synthetic",
        },
    )
    results: list[PairResult] = []
    root = Path(tempfile.mkdtemp(prefix="kvtier-bench-l2-", dir=args.dir))
    try:
        with recording_load(report):
            c = _Chunks(src, args.chunks, batch, root, args.durability)
            # One harness per mode (per serde for the Store): its resources (tiers, Stores and their L1) live only
            # while its rounds run.
            for mode in modes:
                for name in serdes if mode == "store" else [None]:
                    h = Harness(args.rounds, order=args.order, reference_samples=1)
                    if mode == "encode":
                        build = _encode_mode(h, c, serdes, args)
                    elif mode == "tier":
                        build = _tier_mode(h, c, serdes, root, args)
                    else:
                        assert name is not None
                        build = _store_mode(h, c, name, root, args)
                    with build:
                        results += h.run(f"bench l2 {mode} {name or ''}", show_progress=not args.json)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report.add_results(results)
    return report
