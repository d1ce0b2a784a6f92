"""One L2 tier: an adapter, its serde pipeline and the record framing. What the Store talks to.

**One store path.** Each tensor becomes one :mod:`kvtier.l2.record`, handed to the adapter as two segments: a small
header and the payload. The payload is what the pipeline's stages make of the tensor; for a tier without serde,
or with plain ``raw``, the pipeline is the identity stage and the payload *is* the tensor's own memory (no thread,
no buffer, no copy). Otherwise the stages write into a scratch buffer lent to that round of the batch. Every
record of an authenticated pipeline is bound to its key, salt, layout and serde identity
(:func:`~kvtier.l2.record.associated_data`, and the salt's own key).

**One load path.** A record is read once, header first (:meth:`~kvtier.l2.adapters.base.L2Adapter.load_records_with`):

1. the header is parsed and checked against the record's real length *before anything is allocated*;
2. a record of another serde identity or another key is read whole into scratch and its checksum verified: intact,
   it is *foreign* (a miss left in place: another deployment's); damaged, it is removed;
3. with the identity stage the payload is read straight into the destination (its layout must account for every
   payload byte); otherwise into scratch lent to this round, checksummed, and decoded on the pipeline's threads
   into the destination, which is asked for only once the record is known intact.

Rounds are pipelined (round r+1 is read while round r decodes). Each round owns the scratch it took until its decode
has finished; only then does the scratch go back to the pool. A round with nothing to decode cannot hand a buffer
still being decoded to another round: there is no shared, indexed scratch set any more.

**Damaged vs foreign.** Physically damaged records (checksum mismatch, truncation, a header that contradicts the
record's length, a payload a stage rejects as malformed) are removed. Intact records that are not ours (another
serde identity, another key, a key we cannot decrypt: :class:`~kvtier.errors.ForeignRecordError`) are misses left
in place: they count toward capacity and stay evictable. Backend failures are :class:`~kvtier.errors.L2Error` and
reach the caller (the Store turns them into misses); nothing else is swallowed here.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.errors import BatchError, ForeignRecordError, IntegrityError, L2Error, SerdeError
from kvtier.l2.adapters.base import MISS, Buffer, L2Adapter
from kvtier.l2.record import (
    MAX_HEADER_SIZE,
    RecordMeta,
    associated_data,
    check_ours,
    header_size,
    parse_header,
    read_record_parts,
    write_header_parts,
)
from kvtier.serde.base import RecordContext, as_byte_view
from kvtier.serde.processor import AsyncSerdeProcessor, BatchResult, SerdeIdentity
from kvtier.serde.raw import RawStage
from kvtier.storage.copy import copy_into
from kvtier.types import KVFormat, LayoutDesc, ObjectKey

log = logging.getLogger(__name__)

#: ``alloc(index, layout)``: the destination of ``keys[index]``, a contiguous CPU tensor of exactly that layout's
#: shape and dtype, or ``None`` to skip the record (a miss for this call). Called at most once per index and
#: call, in the calling thread, only for a record whose header is ours and consistent with its length.
Alloc = Callable[[int, LayoutDesc], torch.Tensor | None]


def layout_of(tensor: torch.Tensor) -> LayoutDesc:
    """The record layout of a tensor: the KV chunk layout when it has that shape, flat otherwise."""
    kv = tensor.dim() == 4 and tensor.shape[0] == 2
    return LayoutDesc.of(tensor, KVFormat.KV_LAYER_TOKEN_HIDDEN if kv else KVFormat.FLAT)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's memory as a writable flat memoryview (no copy); the tensor must be contiguous on the CPU."""
    array: Any = as_byte_view(tensor).numpy()
    return memoryview(array)


def record_identity(serde: AsyncSerdeProcessor | None) -> SerdeIdentity:
    """The serde identity written into records (``none`` for an adapter without serde). Raises
    :class:`~kvtier.errors.ConfigError` for a processor that can say neither its config nor its stages'."""
    return SerdeIdentity.of_config(None) if serde is None else serde.identity


class ScratchPool:
    """uint8 buffers lent to one round of a load or store at a time.

    A buffer taken by a round is given back only once that round is done with it (its decode finished, its write
    returned), so two rounds in flight never share one. Up to ``keep`` free buffers are kept for reuse (a copy
    into a reused buffer runs at memcpy speed, into a fresh one at a fraction of it); more are dropped.
    """

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.bytes_held = 0  # free and lent buffers together
        # Buffers a round handed on to refills (L1 backfills) instead of giving them back: while they are out, as
        # many more free ones are kept, so a load that runs while backfills lag reuses buffers (a fresh one costs
        # its first-touch page faults, on the caller's path) and the pool shrinks back to ``keep`` once they return.
        self._lent = 0

    def take(self, size: int) -> torch.Tensor:
        """A buffer of at least ``size`` bytes (the smallest free one that fits, else a new one)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= size]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            self.bytes_held += size
        return torch.empty(size, dtype=torch.uint8)

    def give(self, bufs: Sequence[torch.Tensor], *, lent: bool = False) -> None:
        """Take ``bufs`` back (``lent``: buffers :meth:`lend` handed out)."""
        with self._lock:
            if lent:
                self._lent -= len(bufs)
            self._free.extend(bufs)
            keep = self._keep + self._lent
            if len(self._free) > keep:
                self._free.sort(key=lambda b: b.numel(), reverse=True)  # keep the largest: they fit any chunk
                for dropped in self._free[keep:]:
                    self.bytes_held -= dropped.numel()
                del self._free[keep:]

    def lend(self) -> None:
        """A buffer taken by a round goes on to a refill; it comes back by ``give(..., lent=True)``."""
        with self._lock:
            self._lent += 1


class _StoreRounds:
    """Admission of store rounds to their encode, across a tier's writers: any round while fewer than ``rounds``
    are held (encoding, or encoded and not yet written), more while all held rounds together stay within
    ``small_bytes``. Large records: at most ``rounds`` rounds of scratch, what the scratch pool keeps. Small ones:
    bounded by the writers alone, so their writes (an fsync each with ``durability: "fsync"``) overlap."""

    def __init__(self, rounds: int, small_bytes: int) -> None:
        self._rounds = rounds
        self._small_bytes = small_bytes
        self._held = 0
        self._bytes = 0
        self._cv = threading.Condition()

    def take(self, nbytes: int, *, wait: bool) -> bool:
        """Admit a round of ``nbytes`` of scratch; without ``wait``, only if it can be admitted now."""

        def room() -> bool:
            return self._held < self._rounds or self._bytes + nbytes <= self._small_bytes

        with self._cv:
            if wait:
                self._cv.wait_for(room)
            elif not room():
                return False
            self._held += 1
            self._bytes += nbytes
            return True

    def give(self, nbytes: int) -> None:
        """A round admitted with ``nbytes`` is done with its scratch."""
        with self._cv:
            self._held -= 1
            self._bytes -= nbytes
            self._cv.notify_all()

    @property
    def held(self) -> int:
        return self._held


class Refill:
    """How L1 gets its own copy of a hit that a load wrote into a caller's tensor, later, without trusting it.

    The caller owns its tensor again as soon as the load returned and may overwrite it at once, so the copy is
    made from something the caller cannot touch, or checked against it:

    * a record read in place (the identity stage: its payload *is* the tensor's bytes) is copied from the caller's
      tensor and checked against the record's own checksum (its header, kept from the load): :attr:`reads_loaded`;
    * a record that was decoded (fp8, compression, encryption: a checksum covers the encoded bytes, not the decoded
      ones) is decoded again from its encoded bytes, which the tier verified at load and keeps for this: the caller's
      tensor is never read again.

    :meth:`fill` runs on the caller's background thread (the Store's L1 backfill), never on a serde worker, so it
    cannot queue in front of the pipeline's loads. :meth:`close` gives back what it holds; call it exactly once,
    after :meth:`fill` or instead of it (dropping a refill without closing it only costs the scratch's reuse).
    """

    #: whether :meth:`fill` reads the caller's tensor (which must then stay valid, e.g. mapped, until it ran)
    reads_loaded: bool = False
    #: memory the refill holds until it is closed (for the backfill's bound), besides the caller's tensor
    nbytes: int = 0

    def fill(self, dst: torch.Tensor, loaded: torch.Tensor) -> bool:
        """Write the object into ``dst`` (a tensor of its layout; ``loaded`` is the caller's tensor the load
        filled); return whether ``dst`` now holds exactly the record's object."""
        raise NotImplementedError

    def close(self) -> None:
        """Give back what the refill holds; idempotent."""


class _CheckedCopy(Refill):
    """An identity-stage hit: copy the caller's tensor, then check the copy against the record's checksum."""

    reads_loaded = True

    def __init__(self, header: bytes) -> None:
        self._header = header

    def fill(self, dst: torch.Tensor, loaded: torch.Tensor) -> bool:
        copy_into(dst, loaded)
        try:
            read_record_parts(self._header, byte_view(dst))  # the caller may have written its tensor since
        except IntegrityError:
            return False
        return True


class _Redecode(Refill):
    """A decoded hit: decode the record again, from the verified encoded bytes kept in scratch."""

    def __init__(
        self,
        serde: AsyncSerdeProcessor,
        scratch: ScratchPool,
        buf: torch.Tensor,
        payload: torch.Tensor,
        context: RecordContext,
    ) -> None:
        self._serde = serde
        self._pool = scratch
        self._buf: torch.Tensor | None = buf
        self._payload = payload
        self._context = context
        self.nbytes = buf.numel()

    def fill(self, dst: torch.Tensor, loaded: torch.Tensor) -> bool:
        if self._buf is None:
            return False
        try:
            self._serde.deserialize_now(self._payload, dst, self._context)
        except Exception as exc:  # decoded once already; a failure now proves nothing about the record
            log.warning("L1 copy of a decoded L2 hit failed: %r", exc)
            return False
        return True

    def close(self) -> None:
        buf, self._buf = self._buf, None
        if buf is not None:
            self._payload = _NO_BYTES
            self._pool.give([buf], lent=True)


_NO_BYTES = torch.empty(0, dtype=torch.uint8)


@dataclass
class _Slot:
    """One record of a load round between its header and its decode."""

    length: int
    meta: RecordMeta
    hlen: int
    header: Buffer
    payload: Buffer
    foreign: BaseException | None = None  # set: read only to tell damaged from foreign
    dst: torch.Tensor | None = None  # the identity stage's destination (payload is its memory)
    scratch: torch.Tensor | None = None


@dataclass
class _LoadCall:
    """The state of one :meth:`L2Tier.load` call, shared by its rounds."""

    keys: Sequence[ObjectKey]
    strs: list[str]
    alloc: Alloc
    out: list[torch.Tensor | None]
    refills: dict[int, Refill] | None = None  # hits: how L1 gets its own copy later (see L2Tier.load)
    bad: list[str] = field(default_factory=list)  # damaged: removed at the end of the call
    tally: dict[str, int] = field(
        default_factory=lambda: {"integrity_misses": 0, "foreign_misses": 0, "decode_errors": 0}
    )


@dataclass
class _Round:
    """What a load round owns until its decode finished: its scratch, and where its decoded records go."""

    scratch: list[torch.Tensor] = field(default_factory=list)
    future: Future[BatchResult] | None = None
    targets: list[int] = field(default_factory=list)
    dsts: list[torch.Tensor] = field(default_factory=list)
    srcs: list[torch.Tensor] = field(default_factory=list)  # the encoded payloads, views of ...
    bufs: list[torch.Tensor] = field(default_factory=list)  # ... these buffers of the round's scratch
    contexts: list[RecordContext] = field(default_factory=list)


#: store rounds beyond three that may encode at once while all of them together hold at most this much scratch
SMALL_ROUNDS_BYTES = 32 << 20
#: keys whose last written record a tier remembers (checksum and length: 40-odd bytes of memory each)
WRITTEN_MEMO = 1 << 16
#: the part of a sealed header that pins down the whole record: magic, version, lengths and the checksum
_SEAL = slice(0, 24)


class _Encoding:
    """One store round between its submit to the serde's threads and its write: the scratch it owns (given back
    only after the write), and per record ``[payload]`` (``[header, payload]`` once :meth:`seal` ran) or the
    error."""

    def __init__(self, metas: list[RecordMeta], n: int, nbytes: int = 0) -> None:
        self.metas = metas
        self.nbytes = nbytes  # the scratch it was admitted with (L2Tier._store_rounds)
        self.scratch: list[torch.Tensor] = []
        self.records: list[list[Buffer]] = [[] for _ in range(n)]
        self.errors: dict[int, BaseException] = {}
        self.submitted = 0
        self._left = n
        self._lock = threading.Lock()
        self.done = threading.Event()
        if n == 0:
            self.done.set()

    def frame(self, j: int, buf: torch.Tensor, fut: Future[BatchResult]) -> None:
        """Runs on the serde thread that encoded record ``j``, right after: notes its payload (or its error). The
        header and its checksum are made by the writer (:meth:`seal`), so the serde's threads, the store path's
        bottleneck, do nothing but encode while the other cores checksum and write."""
        try:
            result = fut.result()
            if result.errors:
                self.errors[j] = result.errors[0]
            else:
                self.records[j] = [byte_view(buf[: result.sizes[0]])]
        except BaseException as exc:  # reported by the write of this round, never lost in a callback
            self.errors[j] = exc
        finally:
            self._finish(1)

    def seal(self) -> None:
        """Header and checksum of every encoded record, on the calling (writer) thread."""
        for meta, record in zip(self.metas, self.records, strict=True):
            (payload,) = record
            header = bytearray(header_size(meta))
            write_header_parts(header, meta, payload)
            record.insert(0, header)

    def abandon(self, n: int) -> None:
        """``n`` records that were never submitted (the submit itself failed): nothing to wait for."""
        self._finish(n)

    def _finish(self, n: int) -> None:
        with self._lock:
            self._left -= n
            last = self._left <= 0
        if last:
            self.done.set()


class L2Tier:
    """An :class:`L2Adapter` with its serde (``None``: none) and record framing; see the module docstring.

    ``config`` is the full adapter config, ``serde`` included. Counters are in :meth:`stats`. Every method may be
    called from several threads.
    """

    def __init__(self, adapter: L2Adapter, serde: AsyncSerdeProcessor | None, config: dict[str, Any]) -> None:
        self.adapter = adapter
        self.serde = serde
        self.config = config
        self.identity = record_identity(serde)  # refuses, at construction, a serde that cannot name itself
        # raw's payload is exactly the tensor's bytes: the identity stage of the same path, with no copy at all.
        self._identity_stage = serde is None or type(serde.serializer) is RawStage
        # Concurrent store batches the Store's write pipeline runs on this tier: an adapter that gains from
        # overlapping writes (local disk: several batches' fsyncs in flight at once) says so with store_writers.
        self.writers = max(1, int(getattr(adapter, "store_writers", 1)))
        # Records per round: enough to keep every serde worker busy, few enough to bound the scratch memory.
        self._round = 1 << 30 if self._identity_stage else 2 * (serde.max_workers if serde else 1)
        # Two rounds of scratch in flight per load (one decoding, one reading), more with concurrent callers.
        self._scratch = ScratchPool(keep=4 * self._round if not self._identity_stage else 0)
        # Store rounds encoding or encoded and not yet written, across every writer of this tier: three rounds of
        # large records keep the serde's workers busy while earlier rounds are written and stay within what the
        # scratch pool keeps, so an encode never writes into fresh memory (its first-touch page faults would run
        # on the serde's threads, the store path's bottleneck; without the bound the Store's eight fs writers had
        # up to 32 records of 16 MiB in flight and a quarter of every round's buffers were fresh). Rounds of small
        # records are bounded by the writers alone: their writes (an fsync each with durability "fsync") overlap.
        self._store_rounds = _StoreRounds(3, SMALL_ROUNDS_BYTES)
        self._counts_lock = threading.Lock()
        # The record each key last got from this tier, by its sealed header's checksum and length: a re-store of
        # identical bytes (popular prefixes are stored again and again, by every engine) is not written again
        # while the adapter still holds the key. Bounded; forgotten on delete and on failure.
        self._written: collections.OrderedDict[str, tuple[bytes, int]] = collections.OrderedDict()
        self._written_lock = threading.Lock()
        self.counts = {
            "stored": 0,
            "store_failures": 0,
            "stored_unchanged": 0,
            "hits": 0,
            "misses": 0,
            "integrity_misses": 0,
            "foreign_misses": 0,
            "decode_errors": 0,
        }

    @property
    def name(self) -> str:
        serde = "" if self.serde is None else f"+{self.identity.name}"
        return f"{self.adapter.type_name}{serde}"

    def _count(self, what: str, n: int = 1) -> None:
        if n:
            with self._counts_lock:
                self.counts[what] += n

    def _meta(self, key: ObjectKey, layout: LayoutDesc) -> RecordMeta:
        return RecordMeta(self.identity, layout, key.to_str())

    @staticmethod
    def _context(key: ObjectKey, meta: RecordMeta) -> RecordContext:
        return RecordContext(cache_salt=key.cache_salt, associated_data=associated_data(meta))

    # -- store: one path ----------------------------------------------------------------------------------------
    def store(self, keys: Sequence[ObjectKey], tensors: Sequence[torch.Tensor]) -> None:
        """Store a batch, all or nothing: on any failure the batch's keys are deleted and the error raised.

        Rounds overlap: round k+1 is encoded on the serde's threads while round k is checksummed (its headers
        made) and written on this thread: the serde's threads, the store path's bottleneck, only encode. Without
        serde (or with ``raw``) there is nothing to encode: the checksum is the only pass over the tensor's bytes,
        and the payload is written from them.
        """
        if len(keys) != len(tensors):
            raise ValueError(f"batch has {len(keys)} keys but {len(tensors)} tensors")
        srcs = [t if t.is_contiguous() and t.device.type == "cpu" else t.detach().cpu().contiguous() for t in tensors]
        try:
            if self._identity_stage:
                self._store_identity(keys, srcs)
            else:
                self._store_encoded(keys, srcs)
        except BaseException:
            self._count("store_failures", len(keys))
            # Earlier rounds of this batch may have landed; a failed batch must leave none of its keys behind.
            self._delete_quietly([k.to_str() for k in keys])
            raise
        self._count("stored", len(keys))

    def _store_identity(self, keys: Sequence[ObjectKey], srcs: Sequence[torch.Tensor]) -> None:
        records: list[list[Buffer]] = []
        for key, src in zip(keys, srcs, strict=True):
            meta = self._meta(key, layout_of(src))
            payload = byte_view(src)
            header = bytearray(header_size(meta))  # at most MAX_HEADER_SIZE: not the per-chunk copy to avoid
            write_header_parts(header, meta, payload)
            records.append([header, payload])
        self._store_records([k.to_str() for k in keys], records)

    def _store_records(self, keys: list[str], records: list[list[Buffer]]) -> None:
        """Hand sealed records to the adapter, leaving out those identical to what the adapter still holds from
        this tier's last write of that key (same checksum and length: same bytes)."""
        marks = [(bytes(memoryview(r[0])[_SEAL]), sum(len(memoryview(b)) for b in r)) for r in records]
        with self._written_lock:
            same = [self._written.get(k) == m for k, m in zip(keys, marks, strict=True)]
        if any(same):
            held = self.adapter.contains([k for k, s in zip(keys, same, strict=True) if s])
            it = iter(held)
            same = [s and next(it) for s in same]
        todo = [i for i, s in enumerate(same) if not s]
        if len(todo) < len(keys):
            self._count("stored_unchanged", len(keys) - len(todo))
        if todo:
            self.adapter.store_records([keys[i] for i in todo], [records[i] for i in todo])
        with self._written_lock:
            for k, m in zip(keys, marks, strict=True):
                self._written[k] = m
                self._written.move_to_end(k)
            while len(self._written) > WRITTEN_MEMO:
                self._written.popitem(last=False)

    def _forget_written(self, keys: Sequence[str]) -> None:
        with self._written_lock:
            for k in keys:
                self._written.pop(k, None)

    def _store_encoded(self, keys: Sequence[ObjectKey], srcs: Sequence[torch.Tensor]) -> None:
        """Encode round k+1 while round k is written; at most two rounds in flight per call, and at most the tier's
        admission of store rounds across calls (a call that holds an encoded round never waits to be admitted: it
        writes that round first, so concurrent writers cannot hold every admission while waiting for more)."""
        encoding: _Encoding | None = None
        try:
            for start in range(0, len(keys), self._round):
                ks, ss = keys[start : start + self._round], srcs[start : start + self._round]
                following = self._encode(ks, ss, wait=encoding is None)
                if following is None:  # rounds encoded and waiting fill the admission: write this call's first
                    previous, encoding = encoding, None
                    assert previous is not None
                    self._write_encoded(previous)
                    following = self._encode(ks, ss, wait=True)
                    assert following is not None
                previous, encoding = encoding, following
                if previous is not None:
                    self._write_encoded(previous)
            if encoding is not None:
                previous, encoding = encoding, None
                self._write_encoded(previous)
        finally:
            if encoding is not None:  # a write failed: the next round's encode must finish with its scratch first
                encoding.done.wait()
                self._end_round(encoding)

    def _encode(self, keys: Sequence[ObjectKey], srcs: Sequence[torch.Tensor], *, wait: bool) -> _Encoding | None:
        """Submit one round's encode once the tier admits it (:class:`_StoreRounds`; without ``wait``: None when it
        cannot now); each record's payload is noted by the thread that encoded it (:meth:`_Encoding.frame`)."""
        assert self.serde is not None  # the identity stage is the only path without one
        metas = [self._meta(k, layout_of(s)) for k, s in zip(keys, srcs, strict=True)]
        sizes = [self.serde.estimate_serialized_size(meta.layout) for meta in metas]
        if not self._store_rounds.take(sum(sizes), wait=wait):
            return None
        enc = _Encoding(metas, len(metas), sum(sizes))  # admitted until _end_round
        try:
            for j, (key, meta, src, size) in enumerate(zip(keys, metas, srcs, sizes, strict=True)):
                buf = self._scratch.take(size)
                enc.scratch.append(buf)
                fut = self.serde.submit_serialize([src], [buf], contexts=[self._context(key, meta)])
                enc.submitted += 1
                fut.add_done_callback(functools.partial(enc.frame, j, buf))
        except BaseException:
            enc.abandon(len(metas) - enc.submitted)
            enc.done.wait()
            self._end_round(enc)
            raise
        return enc

    def _end_round(self, enc: _Encoding) -> None:
        """A store round is done with its scratch (the adapter keeps no reference past ``store_records``)."""
        self._scratch.give(enc.scratch)
        self._store_rounds.give(enc.nbytes)

    def _write_encoded(self, enc: _Encoding) -> None:
        try:
            enc.done.wait()
            if enc.errors:
                raise BatchError("serialize batch failed", enc.errors)
            enc.seal()
            self._store_records([m.key for m in enc.metas], enc.records)
        finally:
            self._end_round(enc)

    # -- load: one path -----------------------------------------------------------------------------------------
    def load(
        self, keys: Sequence[ObjectKey], alloc: Alloc, refills: dict[int, Refill] | None = None
    ) -> list[torch.Tensor | None]:
        """Load each key's record into the destination ``alloc`` gives for its layout; return that tensor for a
        hit, ``None`` for a miss (absent, damaged: removed, foreign: kept, skipped by ``alloc``).

        ``refills`` (optional): filled, by index, with a :class:`Refill` for each hit, by which a copy of the
        object can be made later without trusting the destination (a caller's tensor the caller may overwrite at
        once). The caller closes each one. Without it, nothing is kept past the call.

        Raises :class:`~kvtier.errors.L2Error` when the backend fails, and whatever ``alloc`` raises; in every
        case no decode is still writing into a destination when this returns or raises.
        """
        n = len(keys)
        call = _LoadCall(keys, [k.to_str() for k in keys], alloc, [None] * n, refills=refills)
        in_flight: deque[_Round] = deque()
        try:
            if n > 1:
                self.adapter.will_load(call.strs)
            for start in range(0, n, self._round):
                rnd = _Round()
                in_flight.append(rnd)  # owned from here on: its scratch goes back only when it is finished
                self._load_round(call, range(start, min(n, start + self._round)), rnd)
                while len(in_flight) > 2 or (in_flight and in_flight[0].future is None):
                    self._finish(call, in_flight.popleft())
            while in_flight:
                self._finish(call, in_flight.popleft())
        finally:
            for rnd in in_flight:  # an error mid-way: every decode must be done with its buffers first
                if rnd.future is not None:
                    rnd.future.result()
                self._scratch.give(rnd.scratch)
            self._tally(call)
        return call.out

    def _load_round(self, call: _LoadCall, idx: range, rnd: _Round) -> None:
        keys, strs, alloc, out, bad, tally = call.keys, call.strs, call.alloc, call.out, call.bad, call.tally
        slots: dict[int, _Slot] = {}
        seen: set[int] = set()

        def prepare(j: int, head: memoryview, length: int) -> Sequence[Buffer] | None:
            i = idx[j]
            seen.add(j)
            old = slots.get(j)
            if old is not None and old.length == length:  # an adapter's retry of the same batch: same buffers
                return [old.header, old.payload]
            slots.pop(j, None)
            try:
                meta, hlen, plen = parse_header(head, total_size=length)  # checked before anything is allocated
            except IntegrityError as exc:
                self._damaged(strs[i], exc, bad, tally)
                return None
            try:
                check_ours(meta, self.identity, strs[i])
            except ForeignRecordError as exc:
                # Foreign by its header, or a header damaged to look so: only the checksum can tell, so read it whole.
                slots[j] = self._slot_in_scratch(rnd, length, meta, hlen, foreign=exc)
                return [slots[j].header, slots[j].payload]
            if not self._identity_stage:
                slots[j] = self._slot_in_scratch(rnd, length, meta, hlen)
                return [slots[j].header, slots[j].payload]
            if plen != meta.layout.nbytes:
                self._damaged(strs[i], IntegrityError(f"payload of {plen} bytes for {meta.layout}"), bad, tally)
                return None
            dst = self._alloc(alloc, i, meta.layout)
            if dst is None:
                return None
            header = bytearray(hlen)
            slots[j] = _Slot(length, meta, hlen, header, byte_view(dst), dst=dst)
            return [header, slots[j].payload]

        lengths = self.adapter.load_records_with([strs[i] for i in idx], MAX_HEADER_SIZE, prepare)
        for j, i in enumerate(idx):
            length = lengths[j]
            slot = slots.get(j)
            if length == MISS:
                continue
            if slot is None:
                if j not in seen:  # the backend had no bytes to show (a value of another type under our key)
                    self._damaged(strs[i], IntegrityError("unreadable record"), bad, tally)
                continue
            if length != slot.length:
                continue  # replaced while being read: not the record whose header we checked; a miss
            try:
                read_record_parts(slot.header, slot.payload)  # the checksum over header and payload
            except IntegrityError as exc:
                self._damaged(strs[i], exc, bad, tally)
                continue
            if slot.foreign is not None:
                self._foreign(strs[i], slot.foreign, tally)
                continue
            if slot.dst is not None:
                out[i] = slot.dst  # the identity stage: the payload was read straight into it
                if call.refills is not None:
                    call.refills[i] = _CheckedCopy(bytes(slot.header))
                continue
            dst = self._alloc(alloc, i, slot.meta.layout)  # asked for only now: the header is known intact
            if dst is None:
                continue
            assert slot.scratch is not None  # every non-identity slot reads into scratch
            rnd.srcs.append(slot.scratch[slot.hlen : slot.length])
            rnd.bufs.append(slot.scratch)
            rnd.contexts.append(self._context(keys[i], slot.meta))
            rnd.targets.append(i)
            rnd.dsts.append(dst)
        if rnd.srcs:
            assert self.serde is not None
            rnd.future = self.serde.submit_deserialize(rnd.srcs, rnd.dsts, contexts=rnd.contexts)

    def _slot_in_scratch(
        self, rnd: _Round, length: int, meta: RecordMeta, hlen: int, foreign: BaseException | None = None
    ) -> _Slot:
        """A record read whole into scratch that ``rnd`` owns until it is finished."""
        buf = self._scratch.take(length)
        rnd.scratch.append(buf)
        view = byte_view(buf[:length])
        return _Slot(length, meta, hlen, view[:hlen], view[hlen:length], foreign=foreign, scratch=buf)

    def _alloc(self, alloc: Alloc, i: int, layout: LayoutDesc) -> torch.Tensor | None:
        dst = alloc(i, layout)
        if dst is not None and (
            tuple(dst.shape) != layout.shape
            or dst.dtype != layout.dtype
            or not dst.is_contiguous()
            or dst.device.type != "cpu"
        ):
            raise ValueError(
                f"load destination must be a contiguous CPU tensor of {list(layout.shape)} {layout.dtype}, got "
                f"{list(dst.shape)} {dst.dtype} on {dst.device} (contiguous: {dst.is_contiguous()})"
            )
        return dst

    def _finish(self, call: _LoadCall, rnd: _Round) -> None:
        """Wait for a round's decode, sort its records into hits, damaged and foreign, return its scratch."""
        strs, out, bad, tally = call.strs, call.out, call.bad, call.tally
        try:
            if rnd.future is None:
                return
            result = rnd.future.result()
            kept: set[int] = set()
            for j, (i, dst) in enumerate(zip(rnd.targets, rnd.dsts, strict=True)):
                exc = result.errors.get(j)
                if exc is None:
                    out[i] = dst
                    if call.refills is not None:
                        call.refills[i] = self._keep_for_refill(rnd, j, kept)
                elif isinstance(exc, ForeignRecordError):
                    self._foreign(strs[i], exc, tally)  # e.g. a key we cannot decrypt: another deployment's
                elif isinstance(exc, IntegrityError | SerdeError):
                    self._damaged(strs[i], exc, bad, tally)  # intact checksum, yet a stage finds it malformed
                else:
                    # A stage that fails on a record for another reason (a bug, a resource) proves nothing about
                    # the record: a miss, left in place, counted and logged.
                    tally["decode_errors"] += 1
                    log.warning("L2 %s: decode of %s failed: %r", self.name, strs[i], exc)
                if kept:  # the encoded bytes of those hits now belong to their refills
                    rnd.scratch = [buf for buf in rnd.scratch if id(buf) not in kept]
        finally:
            rnd.future = None
            self._scratch.give(rnd.scratch)
            rnd.scratch = []

    def _keep_for_refill(self, rnd: _Round, j: int, kept: set[int]) -> Refill:
        """The refill of round ``rnd``'s ``j``-th decoded hit: it takes over the scratch buffer holding the
        record (verified by its checksum before the decode), which the round then no longer gives back."""
        assert self.serde is not None
        kept.add(id(rnd.bufs[j]))
        self._scratch.lend()
        return _Redecode(self.serde, self._scratch, rnd.bufs[j], rnd.srcs[j], rnd.contexts[j])

    def _damaged(self, key: str, exc: BaseException, bad: list[str], tally: dict[str, int]) -> None:
        log.warning("L2 %s: record %s is damaged, removed: %s", self.name, key, exc)
        tally["integrity_misses"] += 1
        bad.append(key)

    def _foreign(self, key: str, exc: BaseException, tally: dict[str, int]) -> None:
        log.info("L2 %s: record %s is not ours, left in place: %s", self.name, key, exc)
        tally["foreign_misses"] += 1

    def _tally(self, call: _LoadCall) -> None:
        hits = sum(o is not None for o in call.out)
        self._count("hits", hits)
        self._count("misses", len(call.out) - hits)
        for what, count in call.tally.items():
            self._count(what, count)
        if call.bad:
            self._delete_quietly(call.bad)

    def load_into(self, keys: Sequence[ObjectKey], dsts: Sequence[torch.Tensor]) -> list[bool]:
        """Fill ``dsts[i]`` (contiguous CPU tensors) from the records of ``keys[i]``; return which were hits. A
        record of another shape or dtype than its ``dst`` is a miss; a miss leaves its ``dst`` unspecified."""
        if len(keys) != len(dsts):
            raise ValueError(f"batch has {len(keys)} keys but {len(dsts)} destinations")
        for d in dsts:
            if not d.is_contiguous() or d.device.type != "cpu":
                raise ValueError("load destinations must be contiguous CPU tensors")

        def alloc(i: int, layout: LayoutDesc) -> torch.Tensor | None:
            dst = dsts[i]
            return dst if tuple(dst.shape) == layout.shape and dst.dtype == layout.dtype else None

        return [t is not None for t in self.load(keys, alloc)]

    # -- lookup -------------------------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Whether each key holds a record that is ours (this serde identity, this key), from its header alone:
        a foreign or unreadable record is not a hit. The payload is checked by the load."""
        return [layout is not None for layout in self.layouts(keys)]

    def layouts(self, keys: Sequence[ObjectKey]) -> list[LayoutDesc | None]:
        """The layout each key's record claims in its header (``None``: absent, unreadable or foreign). Nothing
        is removed here: without the payload's checksum a header alone cannot tell damaged from foreign."""
        strs = [k.to_str() for k in keys]
        out: list[LayoutDesc | None] = []
        for key, head in zip(strs, self.adapter.read_heads(strs, MAX_HEADER_SIZE), strict=True):
            try:
                if head is None:
                    raise IntegrityError("absent")
                meta, _, _ = parse_header(head)
                check_ours(meta, self.identity, key)
                out.append(meta.layout)
            except IntegrityError:
                out.append(None)
        return out

    # -- the rest -----------------------------------------------------------------------------------------------
    def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Whether each key holds a record at all (ours or not); see :meth:`lookup` for usable ones."""
        return self.adapter.contains([k.to_str() for k in keys])

    def delete(self, keys: Sequence[ObjectKey]) -> None:
        strs = [k.to_str() for k in keys]
        self._forget_written(strs)
        self.adapter.delete(strs)

    def _delete_quietly(self, keys: list[str]) -> None:
        self._forget_written(keys)
        try:
            self.adapter.delete(keys)
        except L2Error as exc:  # cleanup must not mask the outcome being reported; a later load retries it
            log.warning("L2 %s: could not delete %d record(s): %s", self.name, len(keys), exc)

    def stats(self) -> dict[str, Any]:
        with self._counts_lock:
            counts = dict(self.counts)
        return {
            **self.adapter.stats(),
            "serde": self.identity.name,
            **counts,
            "scratch_bytes": self._scratch.bytes_held,
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
