"""KV events: what a Store stores, evicts and purges, per chunk key, for routers that route by prefix.

A router that sends each request to the server already holding the longest prefix of its prompt needs to know
which server holds which chunk. kvtier tells it: the Store emits one :class:`KVEvent` per chunk key and tier
when it stores, evicts or purges, and ``kvtier server --events-port N`` publishes them on a ZeroMQ PUB socket.
This module is the whole contract and imports neither torch nor the store, so a router imports it (or copies the
few structs below) without pulling in the rest.

Wire format (schema version :data:`SCHEMA_VERSION`), close to vLLM's KV events so that a router that already
reads those recognises it: each ZeroMQ message has three frames::

    frame 0  topic           b"kvtier.kv" (:data:`TOPIC`); subscribe to it, or to b"" for everything
    frame 1  sequence        the seq of the batch's first event, 8 bytes big-endian (vLLM's second frame)
    frame 2  payload         msgpack of one :class:`EventBatch` (a map; see the README for every field)

``EventBatch`` names its publisher (``publisher``: random, new each time a Store starts publishing, with
``started``), so a restarted server is told apart from a gap. Every event carries ``seq``: per publisher,
starting at 0, one more for every event the Store emits. The Store never waits for its listeners: events go
into a bounded queue; when it is full, events are dropped and counted, and their numbers are missing from the
stream. A subscriber that keeps up therefore sees ``seq`` go up by exactly one; a jump of ``n`` means ``n``
events lost (a queue overflow, or this subscriber's own ZeroMQ queue full); a new ``publisher`` means a restart
(the old server's events no longer describe anything; start over). See :class:`GapDetector`.

Event kinds (``kind``):

* ``stored``: the chunk is now in ``tier`` (``"l1"``, or an L2 tier's label: ``fs``, ``redis+fp8``, ...).
  Emitted when a store lands in L1, when an L2 load brings it back into L1, and when an L2 write completes.
* ``evicted``: kvtier removed the chunk from ``tier`` to make room (L1's policy or quota, an L2 adapter's own
  capacity index). Evictions a backend performs on its own (Redis ``maxmemory``, bucket lifecycle rules,
  another server sharing the store) are invisible to kvtier and never reported.
* ``purged``: the chunk was deleted or purged by an operator (``Store.delete / purge``).
* ``cleared``: every chunk of ``tier`` is gone at once (``clear_l1`` or ``Store.clear``); the key fields are
  empty. vLLM's ``AllBlocksCleared``.

Order. Events are numbered in the order they are emitted. A chunk's ``stored`` in L1 is emitted before the object
becomes visible, so its eviction always comes after it; replaying a stream with no gap gives exactly what L1
holds. One race is left: while a thread stores a new copy of a key, another may evict the old copy, and the
two events may then come in either order (a router may forget a chunk L1 holds: a missed hit, never wrong KV).
L2 ``stored`` events follow the completed write and are as exact as the backend (see ``evicted``).

The parent chunk hash (``parent``) is the hash of the chunk before this one in the same prompt, ``None`` for
the first chunk of a prompt and whenever the Store does not know it. The Store knows it (a) for keys it
computed itself in ``Store.keys_for_tokens`` (a bounded memory of the recent chains), else (b) from the order of
one ``store()`` call: a key's parent is the key before it in the call when both have the same model, rank and
salt. kvtier's integrations (HF transformers, vLLM) store consecutive chunks of one prompt per call, in order;
a caller that stores unrelated keys in one call gets wrong parents, never wrong hashes. Only ``stored`` events
carry parents. Routers need not use it: a chunk hash is a prefix hash (it covers every token before the chunk's
end), so the hashes computed from a prompt (:func:`chunk_hashes`) are all a router needs to match prefixes.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Literal

import blake3
import msgspec
import zmq

from kvtier.errors import ConfigError

log = logging.getLogger(__name__)

#: Version of the event schema: the ``v`` field of every batch. Fields may be added within a version (a
#: decoder ignores unknown fields); a change that renames, removes or retypes a field bumps it.
SCHEMA_VERSION: Final = 1
#: The topic frame of every published message.
TOPIC: Final = b"kvtier.kv"
#: The L1 tier's name in events.
L1_TIER: Final = "l1"
#: Events one published message holds at most (a burst is split into several messages).
MAX_BATCH_EVENTS: Final = 256
#: Events a Store queues for its listeners at most; beyond it they are dropped (and their seq numbers missed).
DEFAULT_QUEUE_EVENTS: Final = 65536

Kind = Literal["stored", "evicted", "purged", "cleared"]
KINDS: Final = ("stored", "evicted", "purged", "cleared")


class KVEvent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """One change of one chunk key in one tier (see the module docstring for the kinds)."""

    seq: int  #: per-publisher sequence number: 0, 1, 2, ... (a jump is a gap)
    kind: Kind
    model: str  #: model name of the key ("" for ``cleared``)
    salt: str  #: the salt's keyed digest (32 hex digits; "" for no salt); never the salt itself
    rank: int  #: kv_rank of the key (tensor-parallel rank)
    hash: str  #: chunk hash, lower-case hex ("" for ``cleared``)
    parent: str | None = None  #: the previous chunk's hash when known (``stored`` only)
    tier: str  #: ``"l1"`` or the L2 tier's label
    size: int | None = None  #: bytes of KV the chunk holds (``None`` when not known, e.g. evictions)
    ts: float  #: wall-clock time of the change, seconds since the epoch


class EventBatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """One published message: events of one publisher, in ``seq`` order."""

    v: int = SCHEMA_VERSION  #: schema version
    publisher: str  #: random id (32 hex digits), new every time a Store starts publishing
    started: float  #: when this publisher started, seconds since the epoch
    ts: float  #: when this batch was sent
    dropped: int = 0  #: events this publisher dropped so far (queue overflow, slow subscribers), cumulative
    events: list[KVEvent]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventBatch)


class SchemaError(ValueError):
    """A message that is not a kvtier event batch of a schema version this module reads."""


def encode_batch(batch: EventBatch) -> bytes:
    """The payload frame of ``batch``."""
    return _encoder.encode(batch)


def decode_batch(payload: bytes | memoryview) -> EventBatch:
    """Parse a payload frame; :class:`SchemaError` when it is not a batch of :data:`SCHEMA_VERSION`."""
    try:
        batch = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise SchemaError(f"not a kvtier event batch: {exc}") from exc
    if batch.v != SCHEMA_VERSION:
        raise SchemaError(f"event schema version {batch.v}; this reader knows {SCHEMA_VERSION}")
    return batch


def message_frames(batch: EventBatch) -> list[bytes]:
    """The three frames of a published message (topic, first seq, payload)."""
    first = batch.events[0].seq if batch.events else 0
    return [TOPIC, first.to_bytes(8, "big"), encode_batch(batch)]


def chunk_hashes(token_ids: Iterable[int], chunk_size: int) -> list[str]:
    """The chunk hashes kvtier computes for ``token_ids`` (what ``stored`` events carry in ``hash``).

    The same rolling blake3 prefix hash as :func:`kvtier.storage.keys.chunk_hashes`, written without torch or
    numpy for routers: ``h_{-1} = blake3("kvtier-chunk-v1:<chunk_size>")[:16]``, ``h_i = blake3(h_{i-1} ||
    tokens of chunk i as little-endian int64)[:16]``, hex. The partial tail chunk has no hash. The event's
    ``model``, ``rank`` and ``salt`` fields complete the key.
    """
    tokens = list(token_ids)
    prev = blake3.blake3(f"kvtier-chunk-v1:{chunk_size}".encode()).digest(length=16)
    out = []
    for start in range(0, len(tokens) - chunk_size + 1, chunk_size):
        data = b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens[start : start + chunk_size])
        prev = blake3.blake3(prev + data).digest(length=16)
        out.append(prev.hex())
    return out


class GapDetector:
    """Follows one publisher's ``seq`` numbers: :meth:`feed` returns how many events were lost before a batch."""

    def __init__(self) -> None:
        self.publisher: str | None = None
        self.next_seq = 0
        self.lost = 0
        self.restarts = 0

    def feed(self, batch: EventBatch) -> int:
        """Events missed before ``batch`` (0 when contiguous); a new publisher resets the count (a restart)."""
        if batch.publisher != self.publisher:
            if self.publisher is not None:
                self.restarts += 1
            self.publisher = batch.publisher
            self.next_seq = batch.events[0].seq if batch.events else 0
        missed = 0
        for event in batch.events:
            if event.seq > self.next_seq:
                missed += event.seq - self.next_seq
            self.next_seq = max(self.next_seq, event.seq + 1)
        self.lost += missed
        return missed


Listener = Callable[[Sequence[KVEvent]], None]


class EventHub:
    """A Store's event source: numbers events, queues them (bounded) and hands them to listeners on one thread.

    :meth:`emit` never blocks and never raises: it is called on the Store's hot paths (and from the L1 pool's
    and adapters' eviction callbacks). Events beyond ``capacity`` queued are dropped and counted; their seq
    numbers are spent, so subscribers see the gap. One daemon thread calls each listener with batches of up to
    :data:`MAX_BATCH_EVENTS` events, in seq order; a listener that raises is logged (once a minute) and counted,
    and keeps receiving. A slow listener makes the queue overflow, never the Store wait.
    """

    def __init__(self, capacity: int = DEFAULT_QUEUE_EVENTS) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity: expected an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self.publisher = secrets.token_hex(16)
        self.started = time.time()
        self._cond = threading.Condition()
        self._queue: list[KVEvent] = []
        self._listeners: list[Listener] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy = False  # the thread is delivering a batch it took off the queue
        self._last_error_log = 0.0
        self.counts = {"emitted": 0, "dropped": 0, "delivered": 0, "listener_errors": 0}

    # -- producers ----------------------------------------------------------------------------------------------
    def emit(
        self,
        kind: Kind,
        keys: Sequence[Any],
        tier: str,
        sizes: Sequence[int | None] | None = None,
        parents: Sequence[str | None] | None = None,
    ) -> None:
        """One event per key (an :class:`~kvtier.types.ObjectKey`, or a tuple ``(model, rank, salt digest,
        hash)``) of ``kind`` in ``tier``. Never blocks; what does not fit in the queue is dropped."""
        if not keys or self._closed:
            return
        now = time.time()
        with self._cond:
            first = self._seq
            self._seq += len(keys)
            room = max(0, self.capacity - len(self._queue))
            self.counts["emitted"] += len(keys)
            if room < len(keys):
                self.counts["dropped"] += len(keys) - room
            for i, key in enumerate(keys[:room]):
                if isinstance(key, tuple):
                    model, rank, salt, chunk_hash = key
                else:
                    model, rank, salt, chunk_hash = key.model_name, key.kv_rank, key.salt_digest, key.chunk_hash
                self._queue.append(
                    KVEvent(
                        seq=first + i,
                        kind=kind,
                        model=model,
                        salt=salt,
                        rank=rank,
                        hash=chunk_hash,
                        parent=parents[i] if parents is not None else None,
                        tier=tier,
                        size=sizes[i] if sizes is not None else None,
                        ts=now,
                    )
                )
            if room:
                self._cond.notify()

    def emit_cleared(self, tier: str) -> None:
        """One ``cleared`` event: every chunk of ``tier`` is gone."""
        self.emit("cleared", [("", 0, "", "")], tier)

    # -- listeners ----------------------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(events)`` with every batch emitted from now on (on the hub's thread)."""
        if not callable(listener):
            raise TypeError(f"listener: expected a callable, got {type(listener).__name__}")
        with self._cond:
            if self._closed:
                raise RuntimeError("the event hub is closed")
            self._listeners.append(listener)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvtier-events", daemon=True)
                self._thread.start()

    def remove_listener(self, listener: Listener) -> None:
        with self._cond:
            self._listeners = [fn for fn in self._listeners if fn is not listener]

    @property
    def has_listeners(self) -> bool:
        return bool(self._listeners)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:  # closed and drained
                    self._cond.notify_all()
                    return
                batch = self._queue[:MAX_BATCH_EVENTS]
                del self._queue[:MAX_BATCH_EVENTS]
                listeners = list(self._listeners)
                self._busy = True
            try:
                for listener in listeners:
                    try:
                        listener(batch)
                    except Exception:  # a listener must never stop the others or the thread
                        self._listener_failed()
            finally:
                with self._cond:
                    self._busy = False
                    self.counts["delivered"] += len(batch)
                    self._cond.notify_all()

    def _listener_failed(self) -> None:
        with self._cond:
            self.counts["listener_errors"] += 1
            now = time.monotonic()
            quiet = now - self._last_error_log < 60.0
            if not quiet:
                self._last_error_log = now
        if not quiet:
            log.warning("kvtier events: a listener raised; it keeps receiving events", exc_info=True)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued event was handed to the listeners; False on timeout."""
        with self._cond:
            if self._thread is None:
                return True
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds), then stop the thread. Idempotent."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        """Counters (JSON-able): ``emitted``, ``dropped`` (queue overflow), ``delivered``, ``listener_errors``,
        ``queued``, ``next_seq``, ``publisher``."""
        with self._cond:
            return {
                **self.counts,
                "queued": len(self._queue),
                "next_seq": self._seq,
                "listeners": len(self._listeners),
                "publisher": self.publisher,
            }


#: Messages a subscriber may have queued on the server (ZeroMQ SNDHWM) before batches are dropped for it.
DEFAULT_SNDHWM: Final = 1024


class EventPublisher:
    """Publishes a hub's events on a ZeroMQ PUB socket (XPUB, so that subscribers can be counted): a listener.

    Never blocks: every send is non-blocking. Each subscriber has its own queue of ``hwm`` messages in ZeroMQ
    (plus the kernel's socket buffers). While every subscriber has room, a batch goes to all of them. When one
    is full (a slow or stopped reader), the batch is still sent to every subscriber with room and dropped for the
    full ones: it is counted in ``dropped_events`` (events that missed at least one subscriber), and the full
    subscriber sees the gap in ``seq``. A slow subscriber therefore costs the others nothing, and the server
    nothing but the two socket options flipped per such batch (ZeroMQ's PUB alone would drop silently, uncounted).

    ``address``: a ZeroMQ endpoint to bind (``tcp://HOST:PORT``); a bind failure is a ConfigError naming
    ``events_port``. Call :meth:`close` once no hub calls it any more (or it drops what comes after).
    """

    def __init__(self, address: str, hub: EventHub, *, hwm: int = DEFAULT_SNDHWM) -> None:
        self.address = address
        self.hub = hub
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscribe reaches us: subscribers are counted
        self._sock.setsockopt(zmq.XPUB_NODROP, 1)  # a full subscriber makes send raise Again (so we can count)
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise ConfigError(
                f"events_port: cannot publish events on {address} ({exc.strerror}); expected a free TCP port"
            ) from exc
        self._lock = threading.Lock()  # send vs close: the hub's thread sends, the server's closes
        self._closed = False
        self.subscribers = 0
        self.counts = {"published_events": 0, "published_batches": 0, "dropped_events": 0}

    def __call__(self, events: Sequence[KVEvent]) -> None:
        with self._lock:
            if self._closed:
                return
            self._read_subscriptions()
            batch = EventBatch(
                publisher=self.hub.publisher,
                started=self.hub.started,
                ts=time.time(),
                dropped=self.hub.counts["dropped"] + self.counts["dropped_events"],
                events=list(events),
            )
            frames = message_frames(batch)
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                # Some subscriber's queue is full: count the loss, then send to everyone else (lossy mode drops
                # the message for full queues only and never raises Again).
                self.counts["dropped_events"] += len(events)
                self._sock.setsockopt(zmq.XPUB_NODROP, 0)
                try:
                    self._sock.send_multipart(frames, zmq.NOBLOCK)
                finally:
                    self._sock.setsockopt(zmq.XPUB_NODROP, 1)
            self.counts["published_events"] += len(events)
            self.counts["published_batches"] += 1

    def _read_subscriptions(self) -> None:
        """Count subscribers from XPUB's (un)subscribe messages (``\\x01topic`` / ``\\x00topic``)."""
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self.subscribers += 1
            elif msg[:1] == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)

    def stats(self) -> dict[str, Any]:
        """``published_events``, ``published_batches``, ``dropped_events`` (missed by a full subscriber),
        ``subscribers`` (subscriptions seen when the last batch was sent), ``address``, ``publisher``."""
        with self._lock:
            return {
                **self.counts,
                "subscribers": self.subscribers,
                "address": self.address,
                "publisher": self.hub.publisher,
            }

    def close(self) -> None:
        """Close the socket (idempotent); later calls publish nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close(linger=0)
            self._ctx.term()
