"""lz4 and zstd: lossless bytes->bytes stages, with an optional byte-plane shuffle of 16-bit data.

``{"type": "zstd", "level": 1, "shuffle": true}``, ``{"type": "lz4", "level": 0, "shuffle": true}``

bf16 KV compresses poorly as is (zstd-1: 1.29 on real KV) because the high byte of every element (sign and
exponent) is interleaved with a near-random low byte. ``shuffle`` splits the payload into its even and odd byte
planes first (as Blosc's shuffle filter does), which lifts zstd-1 to about 1.46 on the same KV.

Framing (16 bytes, then the codec's output)::

    0  1  flags: bit 0 = byte planes shuffled, bit 1 = stored uncompressed (the codec did not shrink it)
    1  7  reserved, 0
    8  8  decoded size, u64 little-endian

Buffers: zstd compresses and decompresses straight into the caller's buffers (``stream_reader(...).readinto``).
The ``lz4`` package has no into-buffer API: ``lz4.block.compress`` / ``decompress`` return a new ``bytes``, which
is copied into ``dst``; that allocation per chunk is the library's, and it is why lz4 is the slower stage here.
``estimate_serialized_size`` is the input plus the header: output that would not be smaller than the input is
stored uncompressed (flag bit 1), so a compressor never needs its worst-case bound and incompressible data (lz4
on raw bf16) decodes at memcpy speed. The shuffle uses a per-thread scratch buffer that grows once and is reused.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import numpy as np
import torch

from kvtier.config import ConfigReader
from kvtier.errors import IntegrityError
from kvtier.serde.base import BytesBytesStage, as_byte_view, check_dst_capacity
from kvtier.serde.processor import AsyncSerdeProcessor
from kvtier.types import LayoutDesc

_HEADER = struct.Struct("<B7xQ")
HEADER_SIZE = _HEADER.size
_SHUFFLED = 1
_STORED = 2


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buf = np.empty(0, dtype=np.uint8)

    def get(self, n: int) -> np.ndarray:
        if self.buf.size < n:
            self.buf = np.empty(n + (n >> 3), dtype=np.uint8)
        return self.buf[:n]


def shuffle_into(src: np.ndarray, out: np.ndarray) -> None:
    """Even bytes, then odd bytes (an odd trailing byte last): the byte planes of 16-bit elements."""
    half = src.size // 2
    out[:half] = src[0 : 2 * half : 2]
    out[half : 2 * half] = src[1 : 2 * half : 2]
    out[2 * half :] = src[2 * half :]


def unshuffle_into(src: np.ndarray, out: np.ndarray) -> None:
    """The inverse of :func:`shuffle_into`."""
    half = src.size // 2
    out[0 : 2 * half : 2] = src[:half]
    out[1 : 2 * half : 2] = src[half : 2 * half]
    out[2 * half :] = src[2 * half :]


def _read_header(src: torch.Tensor, name: str) -> tuple[int, int]:
    if src.numel() < HEADER_SIZE:
        raise IntegrityError(f"{name} payload of {src.numel()} bytes is shorter than its {HEADER_SIZE}-byte header")
    flags, size = _HEADER.unpack(bytes(src[:HEADER_SIZE].numpy()))
    if flags & ~(_SHUFFLED | _STORED):
        raise IntegrityError(f"{name} payload has unknown flags {flags:#x}")
    if flags & _STORED and src.numel() - HEADER_SIZE != size:
        raise IntegrityError(f"{name} stored payload has {src.numel() - HEADER_SIZE} bytes, header says {size}")
    return flags, size


class _Codec:
    """What differs between lz4 and zstd: the bound and the two calls."""

    name = ""

    def __init__(self, level: int) -> None:
        self.level = level

    def bound(self, n: int) -> int:
        raise NotImplementedError

    def compress_into(self, data: np.ndarray, out: np.ndarray) -> int:
        raise NotImplementedError

    def decompress_into(self, data: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError


class Lz4Codec(_Codec):
    """``lz4.block``; ``level`` 0 is the fast mode, 1-16 the high-compression mode at that level."""

    name = "lz4"

    def __init__(self, level: int) -> None:
        import lz4.block

        super().__init__(level)
        self._block = lz4.block

    def bound(self, n: int) -> int:
        return n + n // 255 + 16  # LZ4_compressBound

    def compress_into(self, data: np.ndarray, out: np.ndarray) -> int:
        if self.level == 0:
            comp = self._block.compress(data.data, mode="default", store_size=False)
        else:
            comp = self._block.compress(data.data, mode="high_compression", compression=self.level, store_size=False)
        n = len(comp)
        if n > out.size:
            return -1
        out[:n] = np.frombuffer(comp, dtype=np.uint8)
        return n

    def decompress_into(self, data: np.ndarray, out: np.ndarray) -> None:
        try:
            raw = self._block.decompress(data.data, uncompressed_size=out.size)
        except self._block.LZ4BlockError as exc:
            raise IntegrityError(f"lz4 payload does not decompress: {exc}") from exc
        if len(raw) != out.size:
            raise IntegrityError(f"lz4 payload decompressed to {len(raw)} bytes, header says {out.size}")
        out[:] = np.frombuffer(raw, dtype=np.uint8)


class _ZstdContexts(threading.local):
    """zstd contexts are not safe to share between threads; each thread keeps its own pair."""

    def __init__(self, level: int) -> None:
        import zstandard

        self.cctx = zstandard.ZstdCompressor(level=level)
        self.dctx = zstandard.ZstdDecompressor()


class ZstdCodec(_Codec):
    """``zstandard``, compressing and decompressing with ``readinto`` the caller's buffers (no allocation)."""

    name = "zstd"

    def __init__(self, level: int) -> None:
        import zstandard

        super().__init__(level)
        self._zstd = zstandard
        self._ctx = _ZstdContexts(level)

    def bound(self, n: int) -> int:
        # ZSTD_compressBound, plus room for the frame header the streaming API writes
        small = ((128 << 10) - n) >> 11 if n < (128 << 10) else 0
        return n + (n >> 8) + small + 64

    @staticmethod
    def _fill(reader: Any, out: np.ndarray) -> int:
        view = out.data
        k = 0
        while k < out.size:
            got = reader.readinto(view[k:])
            if not got:
                break
            k += got
        return k

    def compress_into(self, data: np.ndarray, out: np.ndarray) -> int:
        reader = self._ctx.cctx.stream_reader(data.data, size=data.size)
        n = self._fill(reader, out)
        if reader.read(1):  # did not fit: the caller stores the data uncompressed instead
            return -1
        return n

    def decompress_into(self, data: np.ndarray, out: np.ndarray) -> None:
        try:
            reader = self._ctx.dctx.stream_reader(data.data, read_across_frames=False)
            n = self._fill(reader, out)
            extra = reader.read(1)
        except self._zstd.ZstdError as exc:
            raise IntegrityError(f"zstd payload does not decompress: {exc}") from exc
        if n != out.size or extra:
            raise IntegrityError(f"zstd payload decompressed to a size other than the {out.size} bytes its header says")


class CompressStage(BytesBytesStage):
    """Frames, optionally shuffles, and compresses; stores the data as is when compression does not shrink it.
    The way back decompresses (and unshuffles) into ``dst``; a damaged payload raises IntegrityError."""

    def __init__(self, codec: _Codec, shuffle: bool = False) -> None:
        self.codec = codec
        self.name = codec.name  # lz4 and zstd share this framing
        self.shuffle = shuffle
        # one per thread, used by one call at a time: the shuffled planes on the way in, or on the way out
        self._scratch = _Scratch()

    def get_config(self) -> dict[str, Any]:
        return {"type": self.codec.name, "level": self.codec.level, "shuffle": self.shuffle}

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        # The codec may write at most n bytes of body: whatever would not shrink is stored as is, so the
        # bound is the input plus the header, tighter than the codec's own worst case (``codec.bound``).
        return HEADER_SIZE + layout_desc.nbytes

    def serialize(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        data = as_byte_view(src).numpy()
        n = data.size
        check_dst_capacity(dst, HEADER_SIZE + n)
        out = dst.numpy()
        body = data
        flags = 0
        if self.shuffle and n > 1:
            body = self._scratch.get(n)
            shuffle_into(data, body)
            flags |= _SHUFFLED
        written = self.codec.compress_into(body, out[HEADER_SIZE : HEADER_SIZE + n]) if n else 0
        if written < 0 or written >= n:
            out[HEADER_SIZE : HEADER_SIZE + n] = data  # the original order: nothing to undo on decode
            flags, written = _STORED, n
        out[:HEADER_SIZE] = np.frombuffer(_HEADER.pack(flags, n), dtype=np.uint8)
        return HEADER_SIZE + written

    def decoded_size(self, src: torch.Tensor) -> int:
        return _read_header(src, self.codec.name)[1]

    def deserialize(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        flags, size = _read_header(src, self.codec.name)
        out = as_byte_view(dst).numpy()
        if out.size != size:
            raise IntegrityError(f"{self.codec.name} payload decodes to {size} bytes, the destination holds {out.size}")
        body = src[HEADER_SIZE:].numpy()
        if flags & _STORED:
            out[:] = body
        elif flags & _SHUFFLED:
            planes = self._scratch.get(size)
            self.codec.decompress_into(body, planes)
            unshuffle_into(planes, out)
        else:
            self.codec.decompress_into(body, out)


def _factory(codec_cls: type[_Codec], name: str, default_level: int, levels: tuple[int, int]) -> Any:
    def factory(config: dict[str, Any]) -> AsyncSerdeProcessor:
        reader = ConfigReader(config, f"serde {name!r}")
        level = reader.integer("level", default_level, min=levels[0], max=levels[1])
        shuffle = reader.boolean("shuffle", False)
        reader.finish()
        stage = CompressStage(codec_cls(level), shuffle)
        return AsyncSerdeProcessor(stage, stage)

    factory.__doc__ = f'``{{"type": "{name}", "level": {default_level}, "shuffle": false}}``'
    return factory


lz4_factory = _factory(Lz4Codec, "lz4", 0, (0, 16))
zstd_factory = _factory(ZstdCodec, "zstd", 1, (-7, 22))
