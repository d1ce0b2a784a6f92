"""The kvtier wire protocol: msgspec messages over ZeroMQ multipart messages, versioned.

A request is one ZeroMQ multipart message from a client ``DEALER`` to the server's ``ROUTER``::

    frame 0       msgpack Envelope(v=PROTOCOL_VERSION, id=request id, body=<one Request struct>)
    frames 1..n   raw tensor bytes, only when the request carries data "inline" (no shared memory)

A reply has the same shape, ``body`` being one Reply struct (:class:`ErrorReply` on failure) and the frames the
tensors a retrieve answers inline. The envelope is decoded first, with ``body`` left raw, so that a message of
another protocol version is answered with a ``version`` error instead of a decode failure of fields that
changed. Every struct is ``array_like`` (positional msgpack arrays): compact and cheap to decode.

Tensor data travels one of two ways:

* **shared memory** (same host): the client registers memory regions it created with ``memfd_create``
  (:class:`Register`); the server maps them through ``/proc/<pid>/fd/<fd>``. A :class:`Loc` then names
  ``(region, offset, nbytes)`` and the bytes never cross the socket. A client on another host cannot be mapped
  (the registration fails its token check) and falls back to frames.
* **frames**: the bytes are extra message frames, sent and received with pyzmq ``copy=False``.

Rules a server enforces (each violation is an :class:`ErrorReply`, never a crash): the header frame is at most
``MAX_HEADER_BYTES``, the whole message at most the server's ``max_message_bytes``, frame counts and sizes match
the metadata, every ``Loc`` lies inside a registered region and is aligned for its dtype, keys and dtypes are
valid.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import torch

from kvtier.errors import KVTierError
from kvtier.types import DTYPE_CODES, ObjectKey, dtype_name, parse_dtype

#: Bump on any incompatible change of the envelope or of a message; clients and servers refuse other versions.
PROTOCOL_VERSION = 1
#: The largest header frame a server decodes (token ids of a 1M-token prompt fit with room to spare).
MAX_HEADER_BYTES = 16 << 20
#: Tensors have at most this many dimensions (torch allows 64; KV chunks have 4).
MAX_DIMS = 16
#: Data in shared memory is placed at offsets that are multiples of this (every dtype's itemsize divides it).
ALIGN = 64


class WireKey(msgspec.Struct, array_like=True, frozen=True):
    """An :class:`~kvtier.types.ObjectKey` on the wire; validated again by the server."""

    model_name: str
    chunk_hash: str
    kv_rank: int = 0
    cache_salt: str = ""

    @classmethod
    def of(cls, key: ObjectKey) -> WireKey:
        return cls(key.model_name, key.chunk_hash, key.kv_rank, key.cache_salt)

    def to_key(self) -> ObjectKey:
        return ObjectKey(self.model_name, self.chunk_hash, self.kv_rank, self.cache_salt)


class Meta(msgspec.Struct, array_like=True, frozen=True):
    """Shape and dtype (canonical name, e.g. ``bfloat16``) of one tensor."""

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Meta:
        return cls(tuple(tensor.shape), dtype_name(tensor.dtype))

    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, "meta.dtype")

    def nbytes(self) -> int:
        if len(self.shape) > MAX_DIMS:
            raise ProtocolError(f"meta.shape: at most {MAX_DIMS} dimensions, got {len(self.shape)}")
        if any(d < 0 for d in self.shape):
            raise ProtocolError(f"meta.shape: dimensions must be >= 0, got {list(self.shape)}")
        dtype = self.torch_dtype()
        if dtype not in DTYPE_CODES:
            raise ProtocolError(f"meta.dtype: unsupported dtype {self.dtype!r}")
        return math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()


class Loc(msgspec.Struct, array_like=True, frozen=True):
    """``nbytes`` bytes at ``offset`` in the registered shared-memory region ``region``."""

    region: int
    offset: int
    nbytes: int


# -- requests -----------------------------------------------------------------------------------------------
class Hello(msgspec.Struct, tag="hello", array_like=True):
    """First request of a client: answers the server's chunk size and limits (:class:`HelloReply`)."""

    client: str = ""


class Register(msgspec.Struct, tag="register", array_like=True):
    """Map the client's memfd ``fd`` of process ``pid`` (``size`` bytes); its first 16 bytes hold ``token``."""

    pid: int
    fd: int
    size: int
    token: bytes


class Unregister(msgspec.Struct, tag="unregister", array_like=True):
    """Unmap regions the client no longer uses."""

    regions: list[int]


class Store(msgspec.Struct, tag="store", array_like=True):
    """Store ``keys[i]`` -> tensor ``metas[i]``; bytes at ``locs[i]`` or, when ``locs`` is None, in frame i+1."""

    keys: list[WireKey]
    metas: list[Meta]
    locs: list[Loc] | None = None


class Lookup(msgspec.Struct, tag="lookup", array_like=True):
    """Number of leading ``keys`` held in any tier (:class:`CountReply`)."""

    keys: list[WireKey]


class LookupTokens(msgspec.Struct, tag="lookup_tokens", array_like=True):
    """Number of leading tokens of ``token_ids`` held in any tier, a multiple of the chunk size."""

    model_name: str
    token_ids: list[int]
    kv_rank: int = 0
    cache_salt: str = ""


class KeysForTokens(msgspec.Struct, tag="keys_for_tokens", array_like=True):
    """The chunk keys of ``token_ids`` as the server's Store computes them (:class:`KeysReply`)."""

    model_name: str
    token_ids: list[int]
    kv_rank: int = 0
    cache_salt: str = ""


class Retrieve(msgspec.Struct, tag="retrieve", array_like=True):
    """Retrieve ``keys``.

    With ``metas`` and ``locs`` (same-host ``retrieve_into``) the server fills those regions in place and answers a
    :class:`CountReply`. Otherwise it answers a :class:`TensorsReply`: into ``staging`` (a region of this client)
    when the leading hits fit there, else as frames.
    """

    keys: list[WireKey]
    metas: list[Meta] | None = None
    locs: list[Loc] | None = None
    staging: Loc | None = None


class ClearL1(msgspec.Struct, tag="clear_l1", array_like=True):
    """Drop every object of the L1 pool (L2 tiers keep theirs)."""


class Invalidate(msgspec.Struct, tag="invalidate", array_like=True):
    """Start an invalidation (:class:`JobReply`): ``op`` ``purge`` (by ``model_name`` and/or ``cache_salt``;
    ``None``: any), ``delete`` (``keys``) or ``clear`` (``l1`` / ``l2``). It runs on its own server thread, off the
    request loop; the reply comes when it is done or after ``wait_s``, whichever is first, and the client polls
    :class:`JobStatus` until done. ``cache_salt`` is a secret: the server logs and reports only its digest."""

    op: str
    model_name: str | None = None
    cache_salt: str | None = None
    keys: list[WireKey] = msgspec.field(default_factory=list)
    l1: bool = True
    l2: bool = False
    wait_s: float = 1.0


class JobStatus(msgspec.Struct, tag="job_status", array_like=True):
    """The state of invalidation ``job`` (:class:`JobReply`), answered when it is done or after ``wait_s``."""

    job: int
    wait_s: float = 1.0


class Describe(msgspec.Struct, tag="describe", array_like=True):
    """The operator's summary (:class:`StatsReply`): tiers, capacity, usage, hit rates, top models and salt
    digests by bytes, invalidations running."""


class Stats(msgspec.Struct, tag="stats", array_like=True):
    """The Store's and the server's statistics as JSON (:class:`StatsReply`)."""


class Health(msgspec.Struct, tag="health", array_like=True):
    """Liveness probe (:class:`StatsReply` with a small document)."""


Request = (
    Hello
    | Register
    | Unregister
    | Store
    | Lookup
    | LookupTokens
    | KeysForTokens
    | Retrieve
    | ClearL1
    | Stats
    | Health
    | Invalidate
    | JobStatus
    | Describe
)


# -- replies ------------------------------------------------------------------------------------------------
class HelloReply(msgspec.Struct, tag="hello", array_like=True):
    server_version: str
    chunk_size: int
    max_message_bytes: int
    pid: int


class RegisterReply(msgspec.Struct, tag="register", array_like=True):
    """``region`` is the id to use in :class:`Loc`; ``-1`` with ``reason`` when the server could not map it."""

    region: int
    reason: str = ""


class OkReply(msgspec.Struct, tag="ok", array_like=True):
    pass


class CountReply(msgspec.Struct, tag="count", array_like=True):
    count: int


class KeysReply(msgspec.Struct, tag="keys", array_like=True):
    keys: list[WireKey]


class TensorsReply(msgspec.Struct, tag="tensors", array_like=True):
    """The leading hits: ``metas[i]`` at ``locs[i]`` in the staging region, or in frame i+1 when ``locs`` is None."""

    metas: list[Meta]
    locs: list[Loc] | None = None


class StatsReply(msgspec.Struct, tag="stats", array_like=True):
    data: dict[str, Any]


class JobReply(msgspec.Struct, tag="job", array_like=True):
    """An invalidation job: ``done`` with its ``result`` (counts per tier, ``errors``), or its ``progress`` so far."""

    job: int
    done: bool
    progress: dict[str, Any]
    result: dict[str, Any] | None = None


class ErrorReply(msgspec.Struct, tag="error", array_like=True):
    """A failed request. ``kind`` picks the client-side exception (see :data:`ERROR_KINDS`)."""

    kind: str
    message: str


Reply = (
    HelloReply | RegisterReply | OkReply | CountReply | KeysReply | TensorsReply | StatsReply | JobReply | ErrorReply
)


class Envelope(msgspec.Struct, array_like=True):
    """Frame 0 of every message. ``body`` stays raw until ``v`` has been checked."""

    v: int
    id: int
    body: msgspec.Raw


# -- errors -------------------------------------------------------------------------------------------------
class ServerError(KVTierError, RuntimeError):
    """The server answered a request with an error (or could not be reached: :class:`ServerUnavailableError`)."""

    kind = "internal"


class ServerUnavailableError(ServerError, ConnectionError):
    """No reply from the server within the client's timeout: it is down, unreachable or wedged."""

    kind = "unavailable"


class ProtocolError(ServerError):
    """A message was malformed, truncated, oversized, of another protocol version or inconsistent."""

    kind = "protocol"


#: Error kinds a server sends, and the exception a client raises for each (ConfigError etc. by name below).
ERROR_KINDS = (
    "protocol",
    "version",
    "too_large",
    "region",
    "invalid",
    "capacity",
    "not_found",
    "internal",
    "shutting_down",
)

# What a decoder raises on hostile input: malformed or ill-typed data, and nesting deeper than the interpreter's
# recursion limit (msgspec raises RecursionError for ``[[[[...]]]]`` a few hundred levels deep, even inside a Raw).
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)

_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(request_id: int, body: Any) -> bytes:
    """Frame 0 for ``body`` (a Request or Reply struct)."""
    return _encoder.encode(Envelope(PROTOCOL_VERSION, request_id, msgspec.Raw(_encoder.encode(body))))


def _decode_problem(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def decode_envelope(frame: bytes | memoryview) -> Envelope:
    """Decode frame 0; raises :class:`ProtocolError` (``kind`` ``protocol`` or ``version``)."""
    try:
        env = _envelope_decoder.decode(frame)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed envelope: {_decode_problem(exc)}") from None
    if env.v != PROTOCOL_VERSION:
        err = ProtocolError(f"protocol version {env.v} is not supported; this side speaks version {PROTOCOL_VERSION}")
        err.kind = "version"
        raise err
    return env


def decode_request(env: Envelope) -> Any:
    """The Request struct of an envelope; raises :class:`ProtocolError`."""
    try:
        return _request_decoder.decode(env.body)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed request: {_decode_problem(exc)}") from None


def decode_reply(env: Envelope) -> Any:
    """The Reply struct of an envelope; raises :class:`ProtocolError`."""
    try:
        return _reply_decoder.decode(env.body)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed reply: {_decode_problem(exc)}") from None


def error_kind(exc: BaseException) -> str:
    """The wire ``kind`` of an exception raised while serving a request."""
    from kvtier.errors import CapacityError, ConfigError, NotFoundError

    if isinstance(exc, ServerError):
        return exc.kind
    if isinstance(exc, ConfigError | ValueError | TypeError):
        return "invalid"
    if isinstance(exc, CapacityError):
        return "capacity"
    if isinstance(exc, NotFoundError):
        return "not_found"
    return "internal"


def raise_error(reply: ErrorReply) -> None:
    """Raise the client-side exception of an :class:`ErrorReply`."""
    from kvtier.errors import CapacityError, ConfigError, NotFoundError

    message = f"server: {reply.message}"
    if reply.kind == "invalid":
        raise ConfigError(message)
    if reply.kind == "capacity":
        raise CapacityError(message)
    if reply.kind == "not_found":
        raise NotFoundError(message)
    if reply.kind == "shutting_down":
        raise ServerUnavailableError(f"{message} (retry against another server or after the restart)")
    if reply.kind in ("protocol", "version", "too_large", "region"):
        err = ProtocolError(message)
        err.kind = reply.kind
        raise err
    raise ServerError(message)
