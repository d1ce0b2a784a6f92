"""One L2 tier: an adapter behind its optional serde and the record framing. Shared by every adapter.

Store: each tensor becomes one :mod:`kvtier.l2.record`. With a serde, the serializer writes straight after a
reserved header in a reused scratch buffer and :func:`~kvtier.l2.record.write_header` seals it in place. Without a
serde (or with plain ``raw``, whose payload *is* the tensor's bytes) nothing is serialized: the record goes to the
adapter as two segments, a small header and the tensor's own memory, so an adapter without serde pays no threads,
no buffers and no copy.

Load: each record is read back (a raw payload straight into the destination tensor) and checked against the
serde identity, key and layout the caller expects. A damaged, truncated or foreign record, or one the
deserializer rejects, is a *miss*, counted and deleted from the adapter: never wrong KV.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch

from kvtier.errors import IntegrityError, KVTierError
from kvtier.l2.adapters.base import MISS, L2Adapter
from kvtier.l2.record import (
    MAX_HEADER_SIZE,
    RecordMeta,
    header_size,
    parse_header,
    read_record,
    read_record_parts,
    write_header,
    write_header_parts,
)
from kvtier.serde.base import as_byte_view
from kvtier.serde.processor import AsyncSerdeProcessor, BatchResult, SerdeIdentity
from kvtier.serde.raw import RawSerializer
from kvtier.types import KVFormat, LayoutDesc, ObjectKey

log = logging.getLogger(__name__)


def layout_of(tensor: torch.Tensor) -> LayoutDesc:
    """The record layout of a tensor: the KV chunk layout when it has that shape, flat otherwise."""
    kv = tensor.dim() == 4 and tensor.shape[0] == 2
    return LayoutDesc.of(tensor, KVFormat.KV_LAYER_TOKEN_HIDDEN if kv else KVFormat.FLAT)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's memory as a writable flat memoryview (no copy); the tensor must be contiguous on the CPU."""
    array: Any = as_byte_view(tensor).numpy()
    return memoryview(array)


def record_identity(serde: AsyncSerdeProcessor | None) -> SerdeIdentity:
    """The serde identity written into records (``none`` for an adapter without serde)."""
    return SerdeIdentity.of_config(None) if serde is None else serde.identity


class _Scratch:
    """Reused uint8 buffers for one direction (store or load), grown to the largest size seen; counts bytes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._bufs: list[torch.Tensor] = []
        self.bytes_held = 0

    def get(self, index: int, size: int) -> torch.Tensor:
        while len(self._bufs) <= index:
            self._bufs.append(torch.empty(0, dtype=torch.uint8))
        buf = self._bufs[index]
        if buf.numel() < size:
            self.bytes_held += size - buf.numel()
            buf = torch.empty(size, dtype=torch.uint8)
            self._bufs[index] = buf
        return buf[:size]


class L2Tier:
    """An :class:`L2Adapter` with its serde (``None``: none) and record framing; what the Store talks to.

    ``config`` is the full adapter config, ``serde`` included. Counters are in :meth:`stats`.
    """

    def __init__(self, adapter: L2Adapter, serde: AsyncSerdeProcessor | None, config: dict[str, Any]) -> None:
        self.adapter = adapter
        self.serde = serde
        self.config = config
        self.identity = record_identity(serde)
        # raw's payload is exactly the tensor's bytes, so the direct path writes the same record with no copy.
        self._direct = serde is None or type(serde.serializer) is RawSerializer
        # Items per serde round: enough to keep every worker busy, few enough to bound the scratch memory.
        self._round = 1 if serde is None else 2 * serde.max_workers
        self._store_scratch = _Scratch()
        self._load_scratch = _Scratch()
        self._counts_lock = threading.Lock()
        self.counts = {"stored": 0, "store_failures": 0, "hits": 0, "misses": 0, "integrity_misses": 0}

    @property
    def name(self) -> str:
        serde = "" if self.serde is None else f"+{self.identity.name}"
        return f"{self.adapter.type_name}{serde}"

    def _count(self, what: str, n: int = 1) -> None:
        with self._counts_lock:
            self.counts[what] += n

    def _meta(self, key: ObjectKey, layout: LayoutDesc) -> RecordMeta:
        return RecordMeta(self.identity, layout, key.to_str())

    # -- store ------------------------------------------------------------------------------------------------
    def store(self, keys: Sequence[ObjectKey], tensors: Sequence[torch.Tensor]) -> None:
        """Store a batch, all or nothing: on any failure the batch's keys are deleted and the error raised."""
        if len(keys) != len(tensors):
            raise ValueError(f"batch has {len(keys)} keys but {len(tensors)} tensors")
        srcs = [t if t.is_contiguous() and t.device.type == "cpu" else t.detach().cpu().contiguous() for t in tensors]
        try:
            if self._direct:
                self._store_direct(keys, srcs)
            else:
                for start in range(0, len(keys), self._round):
                    end = start + self._round
                    self._store_serde(keys[start:end], srcs[start:end])
        except BaseException:
            self._count("store_failures", len(keys))
            # Earlier rounds of this batch may have landed; a failed batch must leave none of its keys behind.
            self._delete_quietly([k.to_str() for k in keys])
            raise
        self._count("stored", len(keys))

    def _store_direct(self, keys: Sequence[ObjectKey], srcs: Sequence[torch.Tensor]) -> None:
        records = []
        for key, src in zip(keys, srcs, strict=True):
            meta = self._meta(key, layout_of(src))
            header = bytearray(header_size(meta))  # at most MAX_HEADER_SIZE: not the per-chunk copy to avoid
            payload = byte_view(src)
            write_header_parts(header, meta, payload)
            records.append([header, payload])
        self.adapter.store_records([k.to_str() for k in keys], records)

    def _store_serde(self, keys: Sequence[ObjectKey], srcs: Sequence[torch.Tensor]) -> None:
        assert self.serde is not None  # _direct is False only with a serde
        with self._store_scratch.lock:
            metas = [self._meta(k, layout_of(s)) for k, s in zip(keys, srcs, strict=True)]
            hlens = [header_size(m) for m in metas]
            bufs = [
                self._store_scratch.get(i, h + self.serde.estimate_serialized_size(m.layout))
                for i, (m, h) in enumerate(zip(metas, hlens, strict=True))
            ]
            sizes = self.serde.serialize_batch(srcs, [b[h:] for b, h in zip(bufs, hlens, strict=True)])
            records = []
            for buf, meta, n in zip(bufs, metas, sizes, strict=True):
                total = write_header(buf, meta, n)
                records.append([byte_view(buf[:total])])
            self.adapter.store_records([k.to_str() for k in keys], records)

    # -- load -------------------------------------------------------------------------------------------------
    def load_into(self, keys: Sequence[ObjectKey], dsts: Sequence[torch.Tensor]) -> list[bool]:
        """Fill ``dsts[i]`` (contiguous CPU tensors of the expected shape and dtype) from the records of
        ``keys[i]``; return which were hits. A miss leaves its ``dst`` with unspecified contents."""
        if len(keys) != len(dsts):
            raise ValueError(f"batch has {len(keys)} keys but {len(dsts)} destinations")
        for d in dsts:
            if not d.is_contiguous() or d.device.type != "cpu":
                raise ValueError("load destinations must be contiguous CPU tensors")
        if len(keys) > 1:
            self.adapter.will_load([k.to_str() for k in keys])
        if self._direct:
            return self._load_direct(keys, dsts)
        return self._load_serde(keys, dsts)

    def _load_direct(self, keys: Sequence[ObjectKey], dsts: Sequence[torch.Tensor]) -> list[bool]:
        metas = [self._meta(k, layout_of(d)) for k, d in zip(keys, dsts, strict=True)]
        headers = [bytearray(header_size(m)) for m in metas]
        payloads = [byte_view(d) for d in dsts]
        lengths = self.adapter.load_records(
            [k.to_str() for k in keys], [[h, p] for h, p in zip(headers, payloads, strict=True)]
        )
        hits = []
        bad = []
        for meta, header, payload, length in zip(metas, headers, payloads, lengths, strict=True):
            if length == MISS:
                hits.append(False)
                continue
            try:
                if length != len(header) + len(payload):
                    raise IntegrityError(f"record is {length} bytes, {len(header) + len(payload)} expected")
                read_record_parts(header, payload, serde=self.identity, key=meta.key, layout=meta.layout)
                hits.append(True)
            except IntegrityError as exc:
                log.warning("L2 %s: record %s is unusable, removed: %s", self.name, meta.key, exc)
                bad.append(meta.key)
                hits.append(False)
        return self._tally(hits, bad)

    def _load_serde(self, keys: Sequence[ObjectKey], dsts: Sequence[torch.Tensor]) -> list[bool]:
        """Rounds of ``_round`` records, pipelined: round r+1 is read while round r decodes on the serde's
        threads. Two sets of scratch buffers alternate; a set is reused only after its decode has finished."""
        assert self.serde is not None
        hits = [False] * len(keys)
        bad: list[str] = []
        pending: list[tuple[Future[BatchResult], list[int], list[RecordMeta]]] = []

        def finish(fut: Future[BatchResult], targets: list[int], metas: list[RecordMeta]) -> None:
            result = fut.result()
            for j, i in enumerate(targets):
                if j in result.errors:
                    # The record passed its checksum, yet the serde rejects it (an authentication tag, a decoder
                    # check): still a miss, and the record is of no use to anyone.
                    log.warning("L2 %s: deserialize of %s failed: %r", self.name, metas[j].key, result.errors[j])
                    bad.append(metas[j].key)
                else:
                    hits[i] = True

        with self._load_scratch.lock:
            try:
                for r, start in enumerate(range(0, len(keys), self._round)):
                    if len(pending) >= 2:  # the decode that used this round's scratch set must be done
                        finish(*pending.pop(0))
                    base = (r % 2) * self._round
                    idx = list(range(start, min(len(keys), start + self._round)))
                    metas = [self._meta(keys[i], layout_of(dsts[i])) for i in idx]
                    bufs = [
                        self._load_scratch.get(base + j, header_size(m) + self.serde.estimate_serialized_size(m.layout))
                        for j, m in enumerate(metas)
                    ]
                    lengths = self.adapter.load_records([m.key for m in metas], [[byte_view(b)] for b in bufs])
                    payloads: list[torch.Tensor] = []
                    targets: list[int] = []
                    target_metas: list[RecordMeta] = []
                    for i, meta, buf, length in zip(idx, metas, bufs, lengths, strict=True):
                        if length == MISS:
                            continue
                        try:
                            if length > buf.numel():
                                raise IntegrityError(f"record is {length} bytes, at most {buf.numel()} expected")
                            _, payload = read_record(
                                byte_view(buf[:length]), serde=self.identity, key=meta.key, layout=meta.layout
                            )
                        except IntegrityError as exc:
                            log.warning("L2 %s: record %s is unusable, removed: %s", self.name, meta.key, exc)
                            bad.append(meta.key)
                            continue
                        payloads.append(buf[length - len(payload) : length])
                        targets.append(i)
                        target_metas.append(meta)
                    if payloads:
                        fut = self.serde.submit_deserialize(payloads, [dsts[i] for i in targets])
                        pending.append((fut, targets, target_metas))
                while pending:
                    finish(*pending.pop(0))
            finally:
                for fut, _, _ in pending:  # an error mid-way: workers must be done with the scratch first
                    fut.result()
        return self._tally(hits, bad)

    def _tally(self, hits: list[bool], bad: list[str]) -> list[bool]:
        n_hit = sum(hits)
        self._count("hits", n_hit)
        self._count("misses", len(hits) - n_hit)
        if bad:
            self._count("integrity_misses", len(bad))
            self._delete_quietly(bad)
        return hits

    def layouts(self, keys: Sequence[ObjectKey]) -> list[LayoutDesc | None]:
        """The layout each key's record holds, read from its header (``None``: absent, unusable or foreign;
        an unusable or foreign record is deleted). Lets a caller size the destination before loading."""
        strs = [k.to_str() for k in keys]
        heads = self.adapter.read_heads(strs, MAX_HEADER_SIZE)
        out: list[LayoutDesc | None] = []
        bad = []
        for key, head in zip(strs, heads, strict=True):
            if head is None:
                out.append(None)
                continue
            try:
                meta, _, _ = parse_header(head)
                if meta.serde != self.identity or meta.key != key:
                    raise IntegrityError(f"record of {meta.key!r} by serde {meta.serde.name!r} is foreign here")
                out.append(meta.layout)
            except IntegrityError as exc:
                log.warning("L2 %s: record %s is unusable, removed: %s", self.name, key, exc)
                bad.append(key)
                out.append(None)
        if bad:
            self._count("integrity_misses", len(bad))
            self._delete_quietly(bad)
        return out

    # -- the rest ---------------------------------------------------------------------------------------------
    def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        return self.adapter.contains([k.to_str() for k in keys])

    def delete(self, keys: Sequence[ObjectKey]) -> None:
        self.adapter.delete([k.to_str() for k in keys])

    def _delete_quietly(self, keys: list[str]) -> None:
        try:
            self.adapter.delete(keys)
        except (OSError, KVTierError, RuntimeError) as exc:  # cleanup must not mask the error being handled
            log.warning("L2 %s: could not delete %d record(s): %r", self.name, len(keys), exc)

    def stats(self) -> dict[str, Any]:
        with self._counts_lock:
            counts = dict(self.counts)
        return {
            **self.adapter.stats(),
            "serde": self.identity.name,
            **counts,
            "scratch_bytes": self._store_scratch.bytes_held + self._load_scratch.bytes_held,
            **({"serde_time": self.serde.stats()} if self.serde is not None else {}),
        }

    def close(self) -> None:
        """Close the serde's threads and the adapter; idempotent."""
        if self.serde is not None:
            self.serde.close()
        self.adapter.close()

    def __enter__(self) -> L2Tier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"L2Tier({self.name})"
