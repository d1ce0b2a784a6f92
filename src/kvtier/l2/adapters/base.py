"""The L2 adapter contract: a backend that moves framed records (bytes) by key.

An L2 adapter (local disk, memory, Redis, ...) knows nothing about tensors, serdes or the record format. It stores,
loads, tests and deletes *records*: byte strings under string keys (``ObjectKey.to_str()``). One shared layer,
:class:`kvtier.l2.tier.L2Tier`, sits above every adapter and does the rest: it runs the adapter's
serde, frames the payload as a :mod:`kvtier.l2.record`, checks every record it loads and turns damaged records
into misses it deletes, foreign ones into misses it leaves in place. A new backend therefore implements only
bytes I/O.

Contract for every implementation (the conformance suite :class:`kvtier.testing.L2AdapterTests` checks it):

* **Batches.** Every operation takes a batch of keys. ``store_records`` is all-or-nothing: when it raises, none
  of the batch's keys holds a new record (an older record of such a key may be gone too: that is a miss, never
  a torn record). A reader never sees a partly written record.
* **Scatter / gather.** A record to store is a sequence of buffers (e.g. a small header and the tensor's own
  memory) written back to back; ``load_records`` reads a record into a sequence of caller buffers, so a raw
  payload can land straight in its destination. Neither keeps references to the buffers after returning.
* **One read per record.** :meth:`L2Adapter.load_records_with` reads a record once: the adapter learns its
  length, reads its first bytes (the header), asks the caller where the whole record goes (the caller checks the
  header against the length before it allocates anything) and reads the rest there. The default is built on
  ``_load`` and ``_read_heads`` (up to three round trips); a backend overrides ``_load_with`` to do it in one.
* **Errors.** A missing key is not an error (``load_records`` reports ``MISS``). A failure of the backend itself
  (I/O, timeout, outage) raises :class:`~kvtier.errors.L2Error`, the one backend error: the public methods
  translate any ``OSError`` a backend raises into it, and a backend translates its client library's own errors
  (redis-py's) at its boundary. :class:`~kvtier.errors.CapacityError` says a record cannot fit (larger than the
  capacity, disk full). Anything else (``TypeError``, ``ValueError``, ...) is a bug or a caller's mistake and
  reaches the caller unchanged.
* **Capacity.** ``capacity_bytes`` (``None``: unbounded) bounds ``used_bytes``, the bytes of stored records. A
  bounded adapter evicts to make room; a record larger than the capacity raises ``CapacityError``.
* **Lazy resources.** Constructing an adapter checks its config and nothing else: files, connections and
  threads are created by the first operation (:meth:`_start`), so a configured but unused adapter costs nothing.
* **Threads.** Every method may be called from several threads at once.
* ``close()`` releases resources and is idempotent; any later operation raises ``RuntimeError``.
* **Enumeration and purge.** :meth:`L2Adapter.list_keys` walks the keys held that match a :class:`KeyMatch` (a
  model, a tenant's salt digest, both, or everything) in bounded batches; :meth:`L2Adapter.purge` deletes them
  batch by batch, reporting progress. A backend implements ``_list_keys`` (required for purge; the conformance
  suite checks it) and may override ``_purge`` with a cheaper path (Redis: ``SCAN`` + ``UNLINK``). A walk sees
  every record that existed when it began and was not removed meanwhile; records stored during the walk may or
  may not be seen (the Store's purge fence keeps its own writes out). Each batch is its own backend call, so
  other operations keep running between batches.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from kvtier.config import canonical_json
from kvtier.errors import L2Error
from kvtier.key_names import parse_key_str

#: ``load_records`` result for a key that holds no record.
MISS = -1

Buffer = Any  # anything memoryview() accepts: bytes, bytearray, memoryview, numpy array

#: ``prepare(index, head, length)``: ``head`` is the first ``min(head_size, length)`` bytes of record ``index``
#: (valid only during the call), ``length`` its whole length; returns the buffers the whole record (head
#: included) is read into, back to back, or ``None`` to skip the record (nothing more of it is read). Called in
#: the thread that called :meth:`L2Adapter.load_records_with`, in key order; what it raises reaches that caller.
Prepare = Callable[[int, memoryview, int], Sequence[Buffer] | None]

T = TypeVar("T")

#: Keys per batch of a purge walk unless the caller says otherwise: each batch is one backend call, short enough
#: that the operations of the serving path interleave with a purge of millions of records.
PURGE_BATCH = 500

#: ``progress(deleted_so_far, batch)``: called after each batch a purge deleted, with the total so far and the
#: batch's keys (for events and logs), in the purging thread.
Progress = Callable[[int, list[str]], None]


@dataclass(frozen=True, slots=True)
class KeyMatch:
    """Which records an enumeration or a purge selects, by the fields of their key string
    (``ObjectKey.to_str()``: ``model@rank@saltdigest@hash``).

    ``model_name``: only this model's records (``None``: any model). ``salt_digest``: only this tenant's
    (``ObjectKey.salt_digest``: 32 hex digits; ``""`` the unsalted tenant; ``None``: any tenant). Both ``None``
    selects every record that has the shape of an object key. A key string of any other shape is never selected:
    a purge removes only what kvtier named.
    """

    model_name: str | None = None
    salt_digest: str | None = None

    def matches(self, key: str) -> bool:
        """Whether the key string ``key`` is selected."""
        fields = parse_key_str(key)
        if fields is None:
            return False
        if self.model_name is not None and fields.quoted_model != self.quoted_model:
            return False
        return self.salt_digest is None or fields.salt_digest == self.salt_digest

    @property
    def quoted_model(self) -> str:
        """The model name as it stands in a key string (percent-quoted, as ``ObjectKey.to_str()`` writes it)."""
        return "" if self.model_name is None else quote(self.model_name, safe="")

    @property
    def everything(self) -> bool:
        return self.model_name is None and self.salt_digest is None

    def describe(self) -> str:
        """For logs: the model and the salt *digest* (never a salt)."""
        parts = [f"model={self.model_name}" if self.model_name is not None else "all models"]
        if self.salt_digest is not None:
            parts.append(f"salt_digest={self.salt_digest or '(unsalted)'}")
        return ", ".join(parts)


def batched(keys: Iterator[str] | Sequence[str], size: int) -> Iterator[list[str]]:
    """``keys`` in lists of at most ``size`` (a helper for ``_list_keys``)."""
    batch: list[str] = []
    for key in keys:
        batch.append(key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class L2Adapter(ABC):
    """Base of every L2 backend. Subclasses implement the ``_``-prefixed methods; the public ones add the
    checks and the lazy start that every adapter shares.

    ``config`` is the adapter's JSON config without ``serde`` (set by :func:`create_l2_adapter`); two adapters
    are equal when their configs are.
    """

    #: the ``type`` name the adapter is registered under (set by the registry)
    type_name: str = ""
    #: Called with the keys of records the adapter evicted to make room on its own capacity index (not deleted,
    #: purged or replaced ones); the Store sets it to report KV events. It may be called under the adapter's
    #: lock and must neither block nor raise. Adapters that evict call :meth:`_evicted`.
    on_evict: Callable[[Sequence[str]], None] | None = None

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self._state_lock = threading.Lock()
        self._started = False
        self._closed = False

    def _evicted(self, keys: Sequence[str]) -> None:
        """Report evicted keys to :attr:`on_evict`."""
        if keys and self.on_evict is not None:
            self.on_evict(keys)

    # -- what a backend implements --------------------------------------------------------------------------
    def _start(self) -> None:  # noqa: B027 - optional hook, most backends need no resources
        """Create files, connections or threads; called once, by the first operation."""

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`_start` created; called once, only if it ran."""

    @abstractmethod
    def _store(self, keys: Sequence[str], records: Sequence[Sequence[Buffer]]) -> None:
        """Store ``records[i]`` (its buffers back to back) under ``keys[i]``, all or nothing."""

    @abstractmethod
    def _load(self, keys: Sequence[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        """Read each record into ``dsts[i]``; return its stored length, or :data:`MISS`."""

    @abstractmethod
    def _read_heads(self, keys: Sequence[str], size: int) -> list[bytes | None]:
        """The first ``min(size, length)`` bytes of each record, or ``None`` when absent."""

    @abstractmethod
    def _contains(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key holds a record."""

    @abstractmethod
    def _delete(self, keys: Sequence[str]) -> None:
        """Remove the records of ``keys``; absent keys are ignored."""

    def _load_with(self, keys: Sequence[str], head_size: int, prepare: Prepare) -> list[int]:
        """Read each record once through ``prepare`` (see :data:`Prepare`); return its length or :data:`MISS`.

        This default works for any backend from ``_load`` and ``_read_heads``: a first load into a
        ``head_size`` buffer gives each record's length (and all of a small one), ``_read_heads`` the head of a
        larger one, and a second load reads it whole into the buffers ``prepare`` gave. A record replaced
        between those calls reports its new length, which the caller sees differ and treats as a miss. Override
        it to read each record in one go (every built-in adapter does).
        """
        heads = [bytearray(head_size) for _ in keys]
        lengths = self._load(keys, [[h] for h in heads])
        out = list(lengths)
        big = [i for i, n in enumerate(lengths) if n > head_size]
        big_heads = self._read_heads([keys[i] for i in big], head_size) if big else []
        later: list[tuple[int, Sequence[Buffer]]] = []
        for i, n in enumerate(lengths):
            if n == MISS:
                continue
            if n <= head_size:
                bufs = prepare(i, memoryview(heads[i])[:n], n)
                if bufs is not None:
                    scatter(memoryview(heads[i])[:n], bufs)
                continue
            head = big_heads[big.index(i)]
            if head is None or len(head) < head_size:  # deleted or replaced by a shorter record meanwhile
                out[i] = MISS if head is None else len(head)
                continue
            bufs = prepare(i, memoryview(head), n)
            if bufs is not None:
                later.append((i, bufs))
        if later:
            again = self._load([keys[i] for i, _ in later], [bufs for _, bufs in later])
            for (i, _), n in zip(later, again, strict=True):
                out[i] = n
        return out

    def _list_keys(self, match: KeyMatch, batch_size: int) -> Iterator[list[str]]:
        """The keys held that ``match`` selects, in lists of at most ``batch_size``. Required for purge (a backend
        without it cannot be purged: :meth:`purge` raises ``NotImplementedError``). Keep the work per batch
        bounded: the generator is resumed once per batch, other operations run in between."""
        raise NotImplementedError(f"L2 adapter {self.type_name or type(self).__name__!r} cannot list its keys")

    def _purge(self, match: KeyMatch, batch_size: int, progress: Progress | None) -> int:
        """Delete every record ``match`` selects; return how many were deleted. This default lists a batch and
        deletes it, batch by batch; override it where the backend deletes by pattern more cheaply."""
        deleted = 0
        for batch in self._list_keys(match, batch_size):
            self._delete(batch)
            deleted += len(batch)
            if progress is not None:
                progress(deleted, batch)
        return deleted

    def _will_load(self, keys: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Optional: start fetching these records (read-ahead); the default does nothing."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int | None:
        """The most bytes of records the adapter holds, or ``None`` when unbounded."""

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes of records held now."""

    def stats(self) -> dict[str, Any]:
        """Counters for ``Store.stats()``; subclasses extend the dict."""
        return {"type": self.type_name, "capacity_bytes": self.capacity_bytes, "used_bytes": self.used_bytes}

    # -- the public, checked operations ---------------------------------------------------------------------
    def store_records(self, keys: Sequence[str], records: Sequence[Sequence[Buffer]]) -> None:
        """Store a batch of records, all or nothing (see the module docstring)."""
        _same_length(keys, records, "records")
        if keys:
            self._call("store", self._store, keys, records)

    def load_records(self, keys: Sequence[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        """Read each record into the buffers ``dsts[i]`` (filled in order) and return its stored length, or
        :data:`MISS`. A length above the buffers' total means the record did not fit: ``dsts[i]`` then holds
        an unspecified prefix and the caller treats the record as not the one it expected."""
        _same_length(keys, dsts, "dsts")
        if not keys:
            return []
        return self._call("load", self._load, keys, dsts)

    def load_records_with(self, keys: Sequence[str], head_size: int, prepare: Prepare) -> list[int]:
        """Read each record once, header first: ``prepare(i, head, length)`` sees the first ``head_size`` bytes
        and the length of record ``i`` and returns where the whole record goes (``None``: skip it). Returns each
        record's length (``MISS`` when absent). The caller compares it with the length ``prepare`` saw: they
        differ only when the record was replaced meanwhile, and the buffers then hold no usable record."""
        if not keys:
            return []
        return self._call("load", self._load_with, keys, head_size, prepare)

    def will_load(self, keys: Sequence[str]) -> None:
        """A hint that ``keys`` are about to be loaded, so a backend can start reading them (the fs adapter
        issues read-ahead) while the caller decodes earlier records. Best effort: never raises for a miss."""
        if keys:
            self._call("read-ahead", self._will_load, keys)

    def read_heads(self, keys: Sequence[str], size: int) -> list[bytes | None]:
        """The first ``size`` bytes of each record (all of it when shorter), ``None`` when absent: enough to
        parse a record header and learn the layout before loading."""
        if not keys:
            return []
        return self._call("read_heads", self._read_heads, keys, size)

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key holds a record (a damaged record still counts until a load finds it damaged)."""
        if not keys:
            return []
        return self._call("contains", self._contains, keys)

    def delete(self, keys: Sequence[str]) -> None:
        """Remove the records of ``keys``; absent keys are ignored."""
        if keys:
            self._call("delete", self._delete, keys)

    def list_keys(self, match: KeyMatch | None = None, batch_size: int = PURGE_BATCH) -> Iterator[list[str]]:
        """The keys held that ``match`` selects (``None``: every record), in lists of at most ``batch_size``.
        Backend failures raise :class:`~kvtier.errors.L2Error` from the iteration."""
        _check_batch_size(batch_size)
        it = self._call("list", self._list_keys, match or KeyMatch(), batch_size)
        while True:
            batch = self._call("list", next, it, None)
            if batch is None:
                return
            if batch:
                yield batch

    def purge(
        self, match: KeyMatch | None = None, batch_size: int = PURGE_BATCH, progress: Progress | None = None
    ) -> int:
        """Delete every record ``match`` selects (``None``: every record kvtier stored), in batches of at most
        ``batch_size``, calling ``progress(deleted so far, the batch's keys)`` after each; return how many were
        deleted (a backend that cannot count exactly reports the keys it asked to delete). Backend failures raise
        :class:`~kvtier.errors.L2Error`; the records deleted before stay deleted."""
        _check_batch_size(batch_size)
        return self._call("purge", self._purge, match or KeyMatch(), batch_size, progress)

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Start the adapter if needed and run one backend operation, translating a backend failure (any
        ``OSError``) into :class:`~kvtier.errors.L2Error` at this boundary."""
        try:
            self._ensure_started()
            return fn(*args)
        except L2Error:
            raise
        except OSError as exc:
            raise L2Error(f"L2 {self.type_name or type(self).__name__}: {what} failed: {exc}") from exc

    @property
    def started(self) -> bool:
        """Whether the adapter has created its resources (the first operation does)."""
        return self._started

    def _ensure_started(self) -> None:
        if self._started and not self._closed:
            return
        with self._state_lock:
            if self._closed:
                raise RuntimeError(f"L2 adapter {self.type_name!r} is closed")
            if not self._started:
                self._start()
                self._started = True

    def close(self) -> None:
        """Release resources; idempotent. Later operations raise ``RuntimeError``."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if started:
            self._close()

    def __enter__(self) -> L2Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, L2Adapter):
            return NotImplemented
        return type(self) is type(other) and canonical_json(self.config) == canonical_json(other.config)

    def __hash__(self) -> int:
        return hash((type(self).__qualname__, canonical_json(self.config)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({canonical_json(self.config)})"


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")


def _same_length(keys: Sequence[str], other: Sequence[Any], what: str) -> None:
    if len(keys) != len(other):
        raise ValueError(f"batch has {len(keys)} keys but {len(other)} {what}")


def total_length(buffers: Sequence[Buffer]) -> int:
    """Bytes in a sequence of buffers."""
    return sum(memoryview(b).nbytes for b in buffers)


def scatter(data: Buffer, dsts: Sequence[Buffer]) -> None:
    """Copy ``data`` into ``dsts`` in order, as far as they reach (for backends that fetch a record whole)."""
    src = memoryview(data).cast("B")
    off = 0
    for dst in dsts:
        mv = memoryview(dst).cast("B")
        n = min(len(mv), len(src) - off)
        if n <= 0:
            break
        mv[:n] = src[off : off + n]
        off += n
