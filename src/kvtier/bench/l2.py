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
* ``store``: the whole ``Store`` (L1 + the fs tier with its write-behind), in two conditions each:

  - *L1 emptied before each round* (``clear_l1``, untimed; it gives L1's pages back to the kernel): every
    ``store()`` copies into pages faulted in for the first time, and so does the L1 backfill of every hot load's
    L2 hits (in the background). First-touch page faults, not the write path: the figures of a Store just started.
  - *steady state*: L1 is never emptied; its pages stay resident, as in a Store after warm-up. The store rounds
    re-store the same keys (L1 replaces each key's object and reuses its memory); the hot-load rounds alternate
    between two key sets A and B with L1 sized to hold one, so every chunk of a round is loaded from L2 into
    recycled L1 pages (by the backfill), evicting the other set (checked every round through ``l2_prefetched``).

  Store: ``store()`` of every chunk and ``flush()``, beside the same baselines as the tier's store. Hot load:
  ``retrieve_into``, the records in the page cache, beside the tier alone loading the same records from its own
  directory.

Every store round (tier and Store) stores bytes that differ from the previous round's (two source tensors used
in turn): an L2 tier skips a re-store of the bytes it last wrote for a key (``stored_unchanged``), which would
time a checksum instead of a write. Each round checks that no write was skipped, dropped or refused.

Chunks go through in batches of ``--batch`` so the sources and destinations stay at a few chunks whatever
``--chunks`` is; a storing Store's L1 is sized to hold every chunk twice (a write-behind never finds it full),
the steady-state loading Store's one key set. With two key sets, the Store and the tier alone hold twice the
chunks on disk each (``--chunks 64``, raw: about 14 GiB of files at most; removed at the end).
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


def _differing(src: torch.Tensor) -> torch.Tensor:
    """A tensor of ``src``'s shape and dtype whose bytes differ from it, encoded or not: every nonzero element
    negated (the sign survives fp8), every zero made one."""
    return torch.where(src == 0, torch.ones_like(src), src.neg()).contiguous()


def _no_dirty_pages(then: Callable[[], object] | None = None) -> Callable[[], None]:
    """An untimed setup: write back every dirty page first (``os.sync``), then ``then``. With ``durability:
    none`` a store ends in the page cache; past ``vm.dirty_background_ratio`` the kernel writes earlier calls'
    pages back while later calls run, and past ``vm.dirty_ratio`` it throttles writers to the disk's speed, so a
    call would pay for the writes of whatever ran before it (its baseline's too)."""

    def go() -> None:
        os.sync()
        if then is not None:
            then()

    return go


class _Turns:
    """Which of two inputs an operation's next call uses (0 or 1): :meth:`flip` is the operation's untimed setup,
    so successive calls alternate whatever runs between them."""

    def __init__(self, before: Callable[[], object] | None = None) -> None:
        self.turn = 1
        self.before = before  # run first, while ``turn`` is still the last call's

    def flip(self) -> None:
        if self.before is not None:
            self.before()
        self.turn ^= 1


def _unchanged(tier: L2Tier) -> int:
    """Re-stores ``tier`` left unwritten as identical to its last write of the key (see ``L2Tier.store``)."""
    return tier.counts["stored_unchanged"]


def _store_unchanged(store: Store) -> int:
    """The same count for the Store's (only) L2 tier, from its stats."""
    return int(store.stats()["l2"][0]["stored_unchanged"])


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
    """The KV of one run: a source chunk and a second one whose bytes differ (stored in turn, so that no re-store
    is of identical bytes), two key sets in batches (set A, ``keys``, and set B, ``keys_b``, for the steady-state
    loads), reused destinations, and the plain-file baselines (the same bytes written / read without kvtier)
    under ``root``."""

    def __init__(self, src: torch.Tensor, chunks: int, batch: int, root: Path, durability: str) -> None:
        self.src = src
        self.chunks = chunks
        self.nbytes = src.numel() * src.element_size()
        self.total = chunks * self.nbytes
        self.keys = [ObjectKey("bench/model", format(i + 1, "x")) for i in range(chunks)]
        self.keys_b = [ObjectKey("bench/model", format(chunks + i + 1, "x")) for i in range(chunks)]
        self.batches = [self.keys[i : i + batch] for i in range(0, chunks, batch)]
        self.sets = (self.batches, [self.keys_b[i : i + batch] for i in range(0, chunks, batch)])
        self.srcs = [src] * batch
        self.sources = (self.srcs, [_differing(src)] * batch)
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
        """Each file written anew, its previous one removed first, as the fs adapter writes a record: truncating
        an existing file (``O_TRUNC``) makes ext4 (``auto_da_alloc``) write it back to disk at its close, on
        the writer's time (a baseline half as fast as the plain way to write the bytes)."""
        for path in self.plain_paths:
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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
    def tier_store(self, tier: L2Tier, turns: _Turns) -> Callable[[], None]:
        """Store every chunk of set A through ``tier``, from the source of ``turns``' turn; each call must write
        every record (none left unwritten as identical to the last write)."""

        def go() -> None:
            before = _unchanged(tier)
            for ks in self.batches:
                tier.store(ks, self.sources[turns.turn][: len(ks)])
            skipped = _unchanged(tier) - before
            if skipped:
                raise SystemExit(f"bench l2: {tier.name} left {skipped} re-store(s) of identical bytes unwritten")

        return go

    def tier_fill(self, tier: L2Tier, key_set: int) -> None:
        """Store the records a load reads (set A or B), untimed, from the second source (a store round's first
        turn then stores other bytes)."""
        for ks in self.sets[key_set]:
            tier.store(ks, self.sources[1][: len(ks)])

    def tier_load(self, tier: L2Tier, turns: _Turns | None = None) -> Callable[[], None]:
        """Load every chunk of set A, or of the set of ``turns``' turn, through ``tier`` into reused tensors."""

        def go() -> None:
            for ks in self.sets[turns.turn if turns is not None else 0]:
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

    def store_store(self, store: Store, turns: _Turns) -> Callable[[], None]:
        """``store()`` every chunk of set A from the source of ``turns``' turn, then ``flush()``; each call must
        write every chunk to L2: none refused by L1, dropped, or left unwritten as identical to the last write."""

        def go() -> None:
            written, unchanged = store.counts["l2_written"], _store_unchanged(store)
            for ks in self.batches:
                store.store(ks, self.sources[turns.turn][: len(ks)])
            store.flush()
            dropped, refused = store.counts["l2_writes_dropped"], store.counts["l1_store_refused"]
            if dropped or refused:
                raise SystemExit(
                    f"bench l2: the Store dropped {dropped} L2 write(s), refused {refused}; L1 is too small"
                )
            skipped = _store_unchanged(store) - unchanged
            if skipped:
                raise SystemExit(f"bench l2: the Store's L2 left {skipped} re-store(s) of identical bytes unwritten")
            if store.counts["l2_written"] - written != self.chunks:
                done = store.counts["l2_written"] - written
                raise SystemExit(f"bench l2: the Store wrote {done} of {self.chunks} chunk(s) to L2")

        return go

    def store_fill(self, store: Store, key_set: int) -> None:
        """Store set A or B through the Store, a batch at a time with its L2 writes waited for (a store faster
        than its write-behind would drop writes: those records would be missing), untimed, from the second
        source (as :meth:`tier_fill`)."""
        for ks in self.sets[key_set]:
            store.store(ks, self.sources[1][: len(ks)])
            store.flush()
        if store.counts["l2_writes_dropped"] or store.counts["l1_store_refused"]:
            raise SystemExit("bench l2: the Store dropped or refused a write of the records its loads read")

    def store_settle(self, store: Store, turns: _Turns) -> Callable[[], None]:
        """The untimed setup of a steady-state load round: the last round's L1 backfill of its L2 hits waited for,
        and, when the backfill skipped some (it is bounded and best effort: it skips while more than a quarter of
        L1 waits), the set just loaded brought into L1 now, one chunk at a time (``retrieve`` and ``flush``: a
        lone backfill is never skipped; it evicts the oldest objects, the other set's). L1 then holds the set
        just loaded and no chunk of the set loaded next."""
        skipped = [store.counts["l1_backfill_skipped"]]

        def go() -> None:
            store.flush()
            if store.counts["l1_backfill_skipped"] != skipped[0]:
                for ks in self.sets[turns.turn]:
                    for k in ks:
                        store.retrieve([k])
                        store.flush()
            skipped[0] = store.counts["l1_backfill_skipped"]

        return go

    def store_load(self, store: Store, turns: _Turns | None = None) -> Callable[[], None]:
        """``retrieve_into`` every chunk of set A, or with ``turns`` of the set of its turn, each of which must then
        come from L2 (``l2_prefetched``): L1 holds the other set."""

        def go() -> None:
            prefetched = store.counts["l2_prefetched"]
            for ks in self.sets[turns.turn if turns is not None else 0]:
                n = store.retrieve_into(ks, self.outs[: len(ks)])
                if n != len(ks):
                    raise SystemExit(f"bench l2: the Store's load missed {len(ks) - n} chunk(s)")
            from_l2 = store.counts["l2_prefetched"] - prefetched
            if turns is not None and from_l2 != self.chunks:
                raise SystemExit(
                    f"bench l2: {self.chunks - from_l2} of {self.chunks} chunk(s) were still in L1; a steady-state "
                    "load must find the other key set there"
                )

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
    plain_write = Op(f"plain write ({d})", c.plain_write, c.total, _no_dirty_pages())
    c.plain_write()  # the files the plain reads read
    plain_hot = Op("plain read (page cache)", c.plain_read, c.total)
    plain_cold = Op("plain cold read", c.plain_read, c.total, setup=c.drop_plain)
    cold_loads: dict[str, Op] = {}
    with ExitStack() as stack:
        for name in serdes:
            stack.callback(shutil.rmtree, root / f"tier-{name}", ignore_errors=True)  # after close: its page cache
            tier = _tier(root, f"tier-{name}", name, args)
            stack.callback(tier.close)
            turns = _Turns()
            tier_store = Op(f"tier {name} store ({d})", c.tier_store(tier, turns), c.total, _no_dirty_pages(turns.flip))
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
            encode = Op(f"{name} encode alone", ser, c.total, _no_dirty_pages())
            decode = Op(f"{name} decode alone", de, c.total)
            h.compare(f"tier: {name} store ({d})", tier_store, encode, f"{note}; GB/s of KV")
            h.compare(f"tier: {name} hot load", hot, decode, "records in the page cache; GB/s of KV")
            raw_cold = cold_loads.get("raw")
            h.compare(f"tier: {name} cold load", cold, raw_cold or plain_cold, "page cache dropped; GB/s of KV")
        yield


@contextmanager
def _store_mode(h: Harness, c: _Chunks, name: str, root: Path, args: argparse.Namespace) -> Iterator[None]:
    """The whole Store with serde ``name``, in both conditions (one serde at a time: three Stores, two of them
    with an L1 of every chunk twice). Each Store has its own directory: an fs directory takes one adapter."""
    d = c.durability
    with ExitStack() as stack:

        def new_store(label: str, l1_gb: float) -> Store:
            path = root / f"store-{label}-{name}"
            stack.callback(shutil.rmtree, path, ignore_errors=True)  # after the Store's close
            adapter = {
                "type": "fs",
                "base_path": str(path),
                "durability": args.durability,
                "serde": _serde_config(name, args.workers),
            }
            return stack.enter_context(Store(l1_size_gb=l1_gb, l2_adapters=[adapter]))

        # Storing Stores: every chunk twice, so that a write-behind never finds L1 half full (pinned).
        emptied = new_store("emptied", 2 * c.total / GiB + 0.25)
        steady = new_store("steady", 2 * c.total / GiB + 0.25)
        # The steady-state loading Store: L1 holds one key set and not one chunk more (half a chunk of margin for
        # the allocator's rounding), so every chunk of a round comes from L2 and evicts one of the other set.
        loading = new_store("loading", (c.total + c.nbytes // 2) / GiB)
        stack.callback(shutil.rmtree, root / f"store-tier-{name}", ignore_errors=True)
        alone = _tier(root, f"store-tier-{name}", name, args)
        stack.callback(alone.close)
        # The records the loads read: set A in the emptied Store's directory (its store rounds write it again),
        # sets A and B in the loading Store's and the tier alone's. Then both sets loaded once, untimed, so that
        # the loading Store's L1 pages are resident.
        c.store_fill(emptied, 0)
        for key_set in (0, 1):
            c.tier_fill(alone, key_set)
            c.store_fill(loading, key_set)
        load_turns = _Turns()
        load_turns.before = c.store_settle(loading, load_turns)
        steady_load = c.store_load(loading, load_turns)
        for _ in range(2):
            load_turns.flip()
            steady_load()
        # One untimed round of the steady Store, into an empty L1. The harness's warm-up is its second: that one
        # replaces each key's object (touching one more chunk's pages), and from there every page is resident.
        steady_turns = _Turns()
        steady_store = c.store_store(steady, steady_turns)
        steady_turns.flip()
        steady_store()

        def settled(setup: Callable[[], object] | None = None) -> Callable[[], None]:
            """An untimed setup that first waits for every Store's background work (a load's L1 backfill, off
            the caller's path by design) and the kernel's (dirty pages), so that neither runs inside the next
            timed call, a baseline's included; then ``setup``."""

            def go() -> None:
                for store in (emptied, steady, loading):
                    store.flush()
                _no_dirty_pages(setup)()

            return go

        emptied_turns = _Turns(before=emptied.clear_l1)
        alone_turns = _Turns()
        if name == "raw":
            store_baseline = Op(f"plain write ({d})", c.plain_write, c.total, settled())
            fs = f"fs, durability {args.durability}"
        else:
            serde = stack.enter_context(create_serde_processor(_serde_config(name, args.workers)))
            store_baseline = Op(f"{name} encode alone", c.encode(serde)[0], c.total, settled())
            fs = f"fs, durability {args.durability}; GB/s of KV"
        emptied_note = "L1 emptied before each round: first-touch page faults"
        steady_note = "pages resident (steady state)"
        h.compare(
            f"Store: {name} store ({d}), L1 emptied",
            Op(
                f"Store {name} store ({d}), L1 emptied",
                c.store_store(emptied, emptied_turns),
                c.total,
                settled(emptied_turns.flip),
            ),
            store_baseline,
            f"store() + flush(); {emptied_note}; {fs}",
        )
        h.compare(
            f"Store: {name} store ({d}), steady state",
            Op(f"Store {name} store ({d}), steady state", steady_store, c.total, settled(steady_turns.flip)),
            store_baseline,
            f"store() + flush() of the same keys, new bytes; L1 holds their last objects, {steady_note}; {fs}",
        )
        h.compare(
            f"Store: {name} hot load, L1 emptied",
            Op(f"Store {name} hot load, L1 emptied", c.store_load(emptied), c.total, settled(emptied.clear_l1)),
            Op(f"tier {name} hot load", c.tier_load(alone), c.total, settled()),
            f"retrieve_into; {emptied_note}; records in the page cache",
        )
        h.compare(
            f"Store: {name} hot load, steady state",
            Op(f"Store {name} hot load, steady state", steady_load, c.total, settled(load_turns.flip)),
            Op(
                f"tier {name} hot load, sets A, B in turn",
                c.tier_load(alone, alone_turns),
                c.total,
                settled(alone_turns.flip),
            ),
            f"retrieve_into of key sets A and B in turn; L1 full of the other set, {steady_note}: every chunk "
            "from L2 into recycled L1 pages; records in the page cache",
        )
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
