"""The L2 record: a serialized payload framed so that it describes and checks itself.

Every object an L2 adapter stores is one record. Reading a record checks everything that could make it wrong
KV: a record from another serde pipeline, another layout or another key, a truncated or padded file, one
flipped bit anywhere. Physical damage raises :class:`~kvtier.errors.IntegrityError` (the tier removes such a
record); an intact record that is not ours raises its subclass :class:`~kvtier.errors.ForeignRecordError` (the
tier leaves it in place). Either is a miss, never wrong KV. :func:`associated_data` gives the header fields an
authenticated stage binds its output to.

Format version 1, little-endian (frozen: golden files in ``tests/fixtures/records`` must keep decoding)::

    offset size  field
    0      4     magic b"KVTR"
    4      2     format version (1)
    6      2     header_len: bytes before the payload, a multiple of 64 (the payload stays aligned)
    8      8     payload_len
    16     8     checksum: xxh3-64 of bytes [0, 16) + [24, header_len + payload_len)
    24     16    serde config hash (blake3 of the pipeline's canonical JSON config)
    40     1     dtype code (kvtier.types.DTYPE_CODES) of the original tensor
    41     1     ndim
    42     1     serde name length
    43     1     flags: bit 0 = KV layout [2, layers, tokens, hidden]
    44     2     key length
    46     2     reserved, 0
    48     8*ndim shape of the original tensor, u64 each
    ...          serde name (utf-8, e.g. "fp8+zstd"), then the object key (utf-8, ObjectKey.to_str())
    ...          zero padding up to header_len
    header_len   payload_len bytes of serde output

The payload follows the header in the same buffer, so a writer reserves :func:`header_size` bytes, lets the
serializer write straight after them and then calls :func:`write_header`: the payload is never copied.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from kvtier.errors import ForeignRecordError, IntegrityError
from kvtier.serde.processor import SerdeIdentity
from kvtier.types import DTYPE_CODES, DTYPES_BY_CODE, KVFormat, LayoutDesc

MAGIC = b"KVTR"
FORMAT_VERSION = 1
ALIGN = 64
_FIXED = struct.Struct("<4sHHQQ16sBBBBHH")
FIXED_SIZE = _FIXED.size  # 48
_CHECKSUM_AT = 16
MAX_NDIM = 16
MAX_KEY_LEN = 1024
#: a reader that fetches this many bytes has every header (fs index rebuild reads just this much)
MAX_HEADER_SIZE = FIXED_SIZE + 8 * MAX_NDIM + 255 + MAX_KEY_LEN + ALIGN
_FLAG_KV_LAYOUT = 1

Buffer = Any  # bytes, bytearray, memoryview, numpy array or 1-D uint8 torch tensor


@dataclass(frozen=True)
class RecordMeta:
    """What a record says about its payload: who wrote it (serde), what it decodes to (layout), for which key."""

    serde: SerdeIdentity
    layout: LayoutDesc
    key: str = ""


def _memoryview(buf: Buffer) -> memoryview:
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise TypeError("a record buffer tensor must be 1-D torch.uint8")
        buf = buf.numpy()
    mv = memoryview(buf)
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _encoded(meta: RecordMeta) -> tuple[bytes, bytes]:
    name = meta.serde.name.encode()
    key = meta.key.encode()
    if len(name) > 255:
        raise ValueError(f"serde name too long for a record: {meta.serde.name!r}")
    if len(key) > MAX_KEY_LEN:
        raise ValueError(f"object key too long for a record ({len(key)} bytes)")
    if len(meta.layout.shape) > MAX_NDIM:
        raise ValueError(f"a record holds at most {MAX_NDIM} dimensions, got {len(meta.layout.shape)}")
    if len(meta.serde.config_hash) != 16:
        raise ValueError("serde config hash must be 16 bytes")
    return name, key


def header_size(meta: RecordMeta) -> int:
    """Bytes the header of ``meta`` takes; the payload starts at this offset."""
    name, key = _encoded(meta)
    raw = FIXED_SIZE + 8 * len(meta.layout.shape) + len(name) + len(key)
    return -(-raw // ALIGN) * ALIGN


def write_header(buf: Buffer, meta: RecordMeta, payload_len: int) -> int:
    """Write the header into ``buf[:header_size(meta)]`` and seal the record; return its total length.

    The payload must already sit at ``buf[header_size(meta):][:payload_len]``.
    """
    mv = _memoryview(buf)
    hlen = header_size(meta)
    total = hlen + payload_len
    if len(mv) < total:
        raise ValueError(f"record buffer holds {len(mv)} bytes, {total} needed")
    return write_header_parts(mv[:hlen], meta, mv[hlen:total])


def write_header_parts(header: Buffer, meta: RecordMeta, payload: Buffer) -> int:
    """Seal a record whose payload lives in another buffer (a scatter write: header and payload are written out
    as two segments, so a raw tensor is never copied). ``header`` is exactly :func:`header_size` bytes."""
    hmv = _memoryview(header)
    pmv = _memoryview(payload)
    name, key = _encoded(meta)
    hlen = header_size(meta)
    if len(hmv) != hlen:
        raise ValueError(f"header buffer holds {len(hmv)} bytes, {hlen} needed")
    flags = _FLAG_KV_LAYOUT if meta.layout.kv_format is KVFormat.KV_LAYER_TOKEN_HIDDEN else 0
    ndim = len(meta.layout.shape)
    _FIXED.pack_into(
        hmv, 0, MAGIC, FORMAT_VERSION, hlen, len(pmv), 0, meta.serde.config_hash,
        DTYPE_CODES[meta.layout.dtype], ndim, len(name), flags, len(key), 0,
    )  # fmt: skip
    off = FIXED_SIZE
    struct.pack_into(f"<{ndim}Q", hmv, off, *meta.layout.shape)
    off += 8 * ndim
    hmv[off : off + len(name)] = name
    off += len(name)
    hmv[off : off + len(key)] = key
    off += len(key)
    hmv[off:hlen] = bytes(hlen - off)
    struct.pack_into("<Q", hmv, _CHECKSUM_AT, _checksum_parts(hmv, pmv))
    return hlen + len(pmv)


def read_record_parts(
    header: Buffer,
    payload: Buffer,
    *,
    serde: SerdeIdentity | None = None,
    key: str | None = None,
    layout: LayoutDesc | None = None,
) -> RecordMeta:
    """:func:`read_record` for a record read into two buffers: the header (exactly ``header_len`` bytes) and the
    payload (exactly ``payload_len`` bytes, e.g. the destination tensor's own memory). Same checks."""
    hmv = _memoryview(header)
    pmv = _memoryview(payload)
    meta, hlen, plen = parse_header(hmv)
    if hlen != len(hmv) or plen != len(pmv):
        raise IntegrityError(f"record is {hlen}+{plen} bytes, {len(hmv)}+{len(pmv)} were read (truncated or padded)")
    (stored,) = struct.unpack_from("<Q", hmv, _CHECKSUM_AT)
    if stored != _checksum_parts(hmv, pmv):
        raise IntegrityError("record checksum mismatch (damaged data)")
    _check_expected(meta, serde, key, layout)
    return meta


def _checksum_parts(hmv: memoryview, pmv: memoryview) -> int:
    # The same digest as _checksum over the contiguous record: xxh3 streams, so splitting the input is free.
    h = xxhash.xxh3_64()
    h.update(hmv[:_CHECKSUM_AT])
    h.update(hmv[_CHECKSUM_AT + 8 :])
    h.update(pmv)
    return int(h.intdigest())


def pack_record(meta: RecordMeta, payload: Buffer) -> bytes:
    """Header and payload as one new ``bytes`` (allocates: for tests and small records)."""
    pmv = _memoryview(payload)
    hlen = header_size(meta)
    out = bytearray(hlen + len(pmv))
    out[hlen:] = pmv
    write_header(out, meta, len(pmv))
    return bytes(out)


def _checksum(mv: memoryview, total: int) -> int:
    h = xxhash.xxh3_64()
    h.update(mv[:_CHECKSUM_AT])
    h.update(mv[_CHECKSUM_AT + 8 : total])
    return int(h.intdigest())


def parse_header(buf: Buffer, total_size: int | None = None) -> tuple[RecordMeta, int, int]:
    """Decode a header without checking the payload: ``(meta, header_len, payload_len)``.

    ``buf`` needs only the first ``header_len`` bytes (at most :data:`MAX_HEADER_SIZE`). When ``total_size`` is
    given (a file's size), a record that is not exactly ``header_len + payload_len`` long is rejected.
    """
    mv = _memoryview(buf)
    if len(mv) < FIXED_SIZE:
        raise IntegrityError(f"record too short for a header ({len(mv)} bytes)")
    (magic, version, hlen, plen, _crc, shash, dcode, ndim, nlen, flags, klen, reserved) = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise IntegrityError(f"not a kvtier record (magic {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        raise IntegrityError(f"record format version {version} is not supported (this kvtier reads {FORMAT_VERSION})")
    need = FIXED_SIZE + 8 * ndim + nlen + klen
    if ndim > MAX_NDIM or reserved or flags & ~_FLAG_KV_LAYOUT or hlen % ALIGN or hlen < need:
        raise IntegrityError("record header is malformed")
    if len(mv) < need:
        raise IntegrityError(f"record header truncated ({len(mv)} of {need} bytes)")
    if total_size is not None and total_size != hlen + plen:
        raise IntegrityError(f"record is {total_size} bytes, its header says {hlen + plen} (truncated or padded)")
    dtype = DTYPES_BY_CODE.get(dcode)
    if dtype is None:
        raise IntegrityError(f"record has an unknown dtype code {dcode}")
    off = FIXED_SIZE
    shape = struct.unpack_from(f"<{ndim}Q", mv, off)
    off += 8 * ndim
    try:
        name = bytes(mv[off : off + nlen]).decode()
        key = bytes(mv[off + nlen : off + nlen + klen]).decode()
        kv_format = KVFormat.KV_LAYER_TOKEN_HIDDEN if flags & _FLAG_KV_LAYOUT else KVFormat.FLAT
        layout = LayoutDesc(tuple(shape), dtype, kv_format)
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"record header is malformed: {exc}") from exc
    return RecordMeta(SerdeIdentity(name, bytes(shash)), layout, key), hlen, plen


def read_record(
    buf: Buffer,
    *,
    serde: SerdeIdentity | None = None,
    key: str | None = None,
    layout: LayoutDesc | None = None,
) -> tuple[RecordMeta, memoryview]:
    """Check a whole record and return ``(meta, payload)``; ``payload`` is a view into ``buf``.

    Raises :class:`IntegrityError` if the record is damaged (magic, version, length, checksum) or was written
    by another ``serde`` pipeline, for another ``key`` or another ``layout`` than the caller expects.
    """
    mv = _memoryview(buf)
    meta, hlen, plen = parse_header(mv, total_size=len(mv))
    (stored,) = struct.unpack_from("<Q", mv, _CHECKSUM_AT)
    if stored != _checksum(mv, hlen + plen):
        raise IntegrityError("record checksum mismatch (damaged data)")
    _check_expected(meta, serde, key, layout)
    return meta, mv[hlen : hlen + plen]


def _check_expected(meta: RecordMeta, serde: SerdeIdentity | None, key: str | None, layout: LayoutDesc | None) -> None:
    check_ours(meta, serde, key)
    if layout is not None and (meta.layout.shape != layout.shape or meta.layout.dtype != layout.dtype):
        raise IntegrityError(
            f"record holds {list(meta.layout.shape)} {meta.layout.dtype}, expected {list(layout.shape)} {layout.dtype}"
        )


def check_ours(meta: RecordMeta, serde: SerdeIdentity | None, key: str | None) -> None:
    """Raise :class:`~kvtier.errors.ForeignRecordError` if an (intact) record was written by another serde
    pipeline or for another key than expected: not ours, so a miss that is left in place."""
    if serde is not None and meta.serde != serde:
        raise ForeignRecordError(
            f"record was written by serde {meta.serde.name!r} with another config, expected {serde.name!r}"
        )
    if key is not None and meta.key != key:
        raise ForeignRecordError(f"record belongs to key {meta.key!r}, expected {key!r}")


_AD_MAGIC = b"KVTR-AD1"


def associated_data(meta: RecordMeta) -> bytes:
    """The header fields fixed before encoding, as the associated data of an authenticated stage: the serde
    identity (name and config hash), the layout (dtype, KV format, shape) and the object key (which carries the
    salt's digest). A record moved under another key, relabelled with another layout or read by another
    pipeline then fails authentication, even when its (unkeyed) checksum was recomputed."""
    name, key = _encoded(meta)
    flags = _FLAG_KV_LAYOUT if meta.layout.kv_format is KVFormat.KV_LAYER_TOKEN_HIDDEN else 0
    shape = meta.layout.shape
    return b"".join(
        [
            _AD_MAGIC,
            meta.serde.config_hash,
            struct.pack("<B", len(name)),
            name,
            struct.pack("<BBB", DTYPE_CODES[meta.layout.dtype], flags, len(shape)),
            struct.pack(f"<{len(shape)}Q", *shape),
            struct.pack("<H", len(key)),
            key,
        ]
    )
