"""The fp8 serde: KV quantized to float8 (e4m3fn or e5m2), unscaled or with power-of-two group scales.

``{"type": "fp8", "fp8_dtype": "float8_e4m3fn" | "float8_e5m2", "scale": "group" | "none", "block": 128}``

* ``"scale": "none"``: the payload is ``tensor.to(fp8_dtype)`` bit for bit (e4m3fn saturates at +-448, e5m2
  overflows to inf, as torch 2.13 does): a drop-in for the reference's fp8.
* ``"scale": "group"`` (default): one power-of-two scale per group, stored as an ``int8`` exponent after the fp8
  bytes. A tensor with ``ndim >= 2`` is grouped per channel (amax over axis -2, the tokens of a KV chunk
  ``[2, layers, tokens, hidden]``; outliers sit in channels), a 0-/1-D tensor per ``block`` consecutive elements.
  Values far above 448 round-trip with fp8's relative error instead of being clipped.

Payload: ``numel`` fp8 bytes, then (scaled only) one ``int8`` exponent per group. The shape and dtype come from
the destination (the L2 record stores them), so the payload carries nothing else. Decoding writes the original
dtype (bf16, fp16 or fp32). Non-finite input (NaN, inf) fails the item with :class:`SerdeError`.
"""

from __future__ import annotations

import atexit
import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvtier.config import ConfigReader
from kvtier.errors import ConfigError, IntegrityError, SerdeError
from kvtier.serde.base import TensorBytesStage, as_byte_view, check_dst_capacity
from kvtier.serde.processor import AsyncSerdeProcessor
from kvtier.types import LayoutDesc

FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
SCALE_MODES = ("group", "none")
DEFAULT_BLOCK = 128


@dataclass(frozen=True)
class _Format:
    """Bit layout of one fp8 format as the kernels need it."""

    mbits: int
    bias: int
    maxcode: int  # largest finite magnitude code
    saturate: bool  # torch saturates e4m3fn (no inf) and overflows e5m2 to inf
    max_value: float
    min_exp: int  # exponent of the smallest subnormal


_FORMATS = {
    torch.float8_e4m3fn: _Format(3, 7, 0x7E, True, 448.0, -9),
    torch.float8_e5m2: _Format(2, 15, 0x7B, False, 57344.0, -16),
}
# source dtype -> (kernel kind, integer view dtype, exponent shift of the output bits, min normal exponent)
_SOURCES = {
    torch.bfloat16: (0, torch.int16, 7, -126),
    torch.float16: (1, torch.int16, 10, -14),
    torch.float32: (2, torch.int32, 23, -126),
}


def _kernels() -> Any:
    # Imported on first use: numba and the compiled kernels cost nothing to a process that never uses fp8.
    from kvtier.serde.kernels import fp8_kernels

    return fp8_kernels


def _groups(shape: tuple[int, ...], block: int) -> list[tuple[int, int, int, int]]:
    """``(offset, B, T, C)`` views covering the tensor: per channel for ndim >= 2, per block otherwise."""
    n = math.prod(shape)
    if n == 0:
        return []
    if len(shape) >= 2:
        return [(0, math.prod(shape[:-2]), shape[-2], shape[-1])]
    full, rest = divmod(n, block)
    views = [(0, full, block, 1)] if full else []
    if rest:
        views.append((full * block, 1, rest, 1))
    return views


def _group_count(shape: tuple[int, ...], block: int) -> int:
    return sum(b * c for _, b, _, c in _groups(shape, block))


def _min_exponent(fp8: torch.dtype, dtype: torch.dtype) -> int:
    """Smallest group exponent: a subnormal fp8 code times ``2**e`` must stay a normal number of ``dtype``,
    so that decoding is an exact integer add to the exponent field."""
    return _SOURCES[dtype][3] - _FORMATS[fp8].min_exp


class _Tables:
    """Per fp8 dtype: every code's value (float64, for the caps) and, for the tests' references, every code's
    output bits per dtype (torch's cast) and torch's code of every bf16 magnitude."""

    def __init__(self, fp8: torch.dtype) -> None:
        codes = torch.arange(256, dtype=torch.uint8).view(fp8)
        self.f64 = codes.to(torch.float64).numpy().copy()
        self.lut: dict[torch.dtype, np.ndarray] = {}
        for dtype, (_, int_dtype, _, _) in _SOURCES.items():
            np_int = np.uint16 if int_dtype == torch.int16 else np.uint32
            self.lut[dtype] = codes.to(dtype).view(int_dtype).numpy().astype(np_int)
        # fp8 magnitude code of every bf16 magnitude pattern: torch's own cast, the reference the arithmetic bf16
        # encoders are checked against at every group exponent (tests/test_fp8_kernels.py).
        magnitudes = torch.arange(0x8000, dtype=torch.int16).view(torch.bfloat16)
        self.encode_bf16 = magnitudes.to(fp8).view(torch.uint8).numpy().copy()


_TABLES = {fp8: _Tables(fp8) for fp8 in _FORMATS}
_OUT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's elements as unsigned integer bits in a flat numpy view (no copy)."""
    _, int_dtype, _, _ = _SOURCES[tensor.dtype]
    flat = tensor.reshape(-1).view(int_dtype).numpy()
    return flat.view(np.uint16 if int_dtype == torch.int16 else np.uint32)


def _check_source(tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype not in _SOURCES:
        raise SerdeError(f"fp8 {what} must be bfloat16, float16 or float32, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise SerdeError(f"fp8 {what} must be contiguous")


class Fp8Stage(TensorBytesStage):
    """Quantizes a bf16 / fp16 / fp32 tensor to fp8 bytes (plus group exponents when scaled), and decodes them
    into the destination's dtype with branch-free arithmetic on the bits (no table; the scale is an exponent add).

    :meth:`split_serialize` / :meth:`split_deserialize` cut one tensor's work into slices of whole groups, which the
    serde processor runs on several workers (the kernels release the GIL)."""

    name = "fp8"

    def __init__(self, fp8_dtype: torch.dtype, scaled: bool, block: int = DEFAULT_BLOCK) -> None:
        if fp8_dtype not in _FORMATS:
            raise ConfigError(f"fp8_dtype: expected one of {sorted(FP8_DTYPES)}, got {fp8_dtype}")
        self.fp8 = fp8_dtype
        self.fmt = _FORMATS[fp8_dtype]
        self.scaled = scaled
        self.block = block

    def get_config(self) -> dict[str, Any]:
        fp8_name = next(name for name, dtype in FP8_DTYPES.items() if dtype == self.fp8)
        return {
            "type": self.name,
            "fp8_dtype": fp8_name,
            "scale": "group" if self.scaled else "none",
            "block": self.block,
        }

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        extra = _group_count(layout_desc.shape, self.block) if self.scaled else 0
        return layout_desc.numel + extra

    def serialize(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        written, parts = self.split_serialize(src, dst, 1)
        for part in parts:
            part()
        return written

    def deserialize(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for part in self.split_deserialize(src, dst, 1):
            part()

    # -- slices: what lets the serde processor run one large tensor on several workers --------------------------
    def _pieces(self, shape: tuple[int, ...], parts: int) -> list[list[tuple[int, int, int, int, int, int]]]:
        """The tensor's ``[B, T, C]`` views cut along ``B`` into at most ``parts`` lists of pieces
        ``(offset, B, T, C, g0, b0)`` (a piece is blocks ``b0 .. b0 + B`` of the view at element ``offset`` whose
        first group is ``g0``), each list about ``numel / parts`` elements, in tensor order. Every group lies in
        one piece, so pieces encode and decode independently and their bytes are the whole tensor's."""
        views = _groups(shape, self.block)
        if not self.scaled:  # unscaled: one flat view, cut anywhere (at 64 elements: whole cache lines)
            n = math.prod(shape)
            views = [(0, n, 1, 1)] if n else []
        total = sum(b * t * c for _, b, t, c in views)
        target = max(1, -(-total // max(1, parts)))
        if not self.scaled:
            target = -(-target // 64) * 64
        out: list[list[tuple[int, int, int, int, int, int]]] = [[]]
        filled, g0 = 0, 0
        for offset, b, t, c in views:
            per_block = t * c
            b0 = 0
            while b0 < b:
                if filled >= target and len(out) < parts:
                    out.append([])
                    filled = 0
                take = min(b - b0, max(1, -(-(target - filled) // per_block)))
                out[-1].append((offset + b0 * per_block, take, t, c, g0 + b0 * c, b0))
                filled += take * per_block
                b0 += take
            g0 += b * c
        return [pieces for pieces in out if pieces]

    def split_serialize(self, src: torch.Tensor, dst: torch.Tensor, parts: int) -> tuple[int, list[Callable[[], None]]]:
        """Check ``src`` and ``dst`` and return the payload's size and up to ``parts`` callables that each encode
        a slice of the tensor (whole groups) into its place in ``dst``; run all of them, in any order or on any
        threads, and ``dst`` holds what :meth:`serialize` writes. A callable raises :class:`SerdeError` for a
        non-finite value in its slice; the lowest-numbered failing one names the tensor's first bad group."""
        _check_source(src, "input")
        shape = tuple(src.shape)
        n = src.numel()
        ngroups = _group_count(shape, self.block) if self.scaled else 0
        check_dst_capacity(dst, n + ngroups)
        if n == 0:
            return 0, []
        k = _kernels()
        bits = _bits(src)
        out = dst[:n].numpy()
        e4m3 = self.fp8 == torch.float8_e4m3fn
        pieces = self._pieces(shape, parts)
        if not self.scaled:
            if src.dtype == torch.bfloat16:
                plain: Any = k.encode_plain_bf16_e4m3 if e4m3 else k.encode_plain_bf16_e5m2
            else:
                plain = k.encode_plain_wide_e4m3 if e4m3 else k.encode_plain_wide_e5m2

            def run_plain(part: list[tuple[int, int, int, int, int, int]]) -> None:
                for offset, count, _, _, _, _ in part:
                    bad = plain(bits[offset : offset + count], out[offset : offset + count])
                    if bad >= 0:
                        raise SerdeError(f"fp8: non-finite input at element {offset + bad}; the item is not stored")

            return n, [functools.partial(run_plain, part) for part in pieces]
        # The smallest decodable magnitude (a subnormal code times 2**e) must stay a normal number of the
        # output dtype, so that decoding is exact arithmetic on the exponent field: that bounds e below.
        lo = _min_exponent(self.fp8, src.dtype)
        out_max = float(torch.finfo(src.dtype).max)
        exps = dst[n : n + ngroups].numpy().view(np.int8)
        lut_f64 = _TABLES[self.fp8].f64
        caps = np.empty(ngroups, dtype=np.uint8)  # codes (<= 0x7E): uint8 keeps the kernels' loads narrow
        if src.dtype == torch.bfloat16:
            scaled: Any = k.encode_scaled_bf16_e4m3 if e4m3 else k.encode_scaled_bf16_e5m2
        else:
            scaled = k.encode_scaled_wide_e4m3 if e4m3 else k.encode_scaled_wide_e5m2

        def run_scaled(part: list[tuple[int, int, int, int, int, int]]) -> None:
            for offset, b, t, c, g0, _ in part:
                end = offset + b * t * c
                e, cap = exps[g0 : g0 + b * c], caps[g0 : g0 + b * c]
                # amax, exponents and codes in one kernel, block by block (see encode_scaled_bf16_e4m3)
                bad = scaled(bits[offset:end], out[offset:end], b, t, c, e, cap, out_max, lo, lut_f64)
                if bad >= 0:
                    raise SerdeError(f"fp8: non-finite input in group {g0 + bad}; the item is not stored")

        return n + ngroups, [functools.partial(run_scaled, part) for part in pieces]

    def split_deserialize(self, src: torch.Tensor, dst: torch.Tensor, parts: int) -> list[Callable[[], None]]:
        """Check the payload ``src`` against ``dst`` and return up to ``parts`` callables that each decode a slice
        (whole groups) into ``dst``; all of them together write what :meth:`deserialize` writes."""
        _check_source(dst, "destination")
        shape = tuple(dst.shape)
        n = dst.numel()
        ngroups = _group_count(shape, self.block) if self.scaled else 0
        data = as_byte_view(src)
        if data.numel() != n + ngroups:
            raise IntegrityError(f"fp8 payload has {data.numel()} bytes, {n + ngroups} expected for {list(shape)}")
        if n == 0:
            return []
        k = _kernels()
        out = _bits(dst)
        codes = data[:n].numpy()
        e4m3 = self.fp8 == torch.float8_e4m3fn
        suffix = f"{_OUT_NAMES[dst.dtype]}_{'e4m3' if e4m3 else 'e5m2'}"
        decode_plain, decode_scaled = getattr(k, f"decode_plain_{suffix}"), getattr(k, f"decode_scaled_{suffix}")
        pieces = self._pieces(shape, parts)
        if not self.scaled:

            def run_plain(part: list[tuple[int, int, int, int, int, int]]) -> None:
                for offset, count, _, _, _, _ in part:
                    decode_plain(codes[offset : offset + count], out[offset : offset + count])

            return [functools.partial(run_plain, part) for part in pieces]
        exps = data[n:].numpy().view(np.int8)
        lo = _min_exponent(self.fp8, dst.dtype)
        # An exponent below what the encoder writes would take a value out of the output's normal range, where the
        # exponent-field arithmetic is no longer exact.
        if int(exps.min()) < lo:
            raise IntegrityError(f"fp8 payload holds a group exponent below {lo}")

        def run_scaled(part: list[tuple[int, int, int, int, int, int]]) -> None:
            for offset, b, t, c, g0, _ in part:
                end = offset + b * t * c
                decode_scaled(codes[offset:end], out[offset:end], b, t, c, exps[g0 : g0 + b * c])

        return [functools.partial(run_scaled, part) for part in pieces]


# The names of the two halves before stages were typed: one object is both now.
Fp8Serializer = Fp8Stage
Fp8Deserializer = Fp8Stage

_warmed: set[tuple[torch.dtype, bool]] = set()
_warm_lock = threading.Lock()
_warm_threads: list[threading.Thread] = []
_warm_stop = threading.Event()  # set at interpreter exit: the warm-up stops after the kernel it is on


def _warm_up(fp8: torch.dtype, scaled: bool) -> None:
    """Run every kernel once on tiny tensors of each source dtype, so that numba loads (or, on a machine's first
    run, compiles) them before the first request instead of during it. Stops early once exit has begun."""
    for dtype in _SOURCES:
        if _warm_stop.is_set():
            return
        src = torch.ones((2, 1, 2, 4), dtype=dtype)
        ser, deser = Fp8Serializer(fp8, scaled), Fp8Deserializer(fp8, scaled)
        dst = torch.empty(ser.estimate_serialized_size(LayoutDesc.of(src)), dtype=torch.uint8)
        n = ser.serialize(src, dst)
        if _warm_stop.is_set():
            return
        deser.deserialize(dst[:n], torch.empty_like(src))


def _join_warm_ups() -> None:
    """At interpreter exit (atexit, before finalization): let a warm-up finish the kernel it is compiling.

    A daemon thread still inside numba/LLVM when the interpreter finalizes aborts the whole process
    ("terminate called without an active exception", status 134); joined here, no thread is left in numba by
    then. The wait is at most one kernel's compile (about a second; nothing on a machine with the cache)."""
    _warm_stop.set()
    with _warm_lock:
        threads = list(_warm_threads)
    for thread in threads:
        thread.join()


atexit.register(_join_warm_ups)


def start_warm_up(fp8: torch.dtype, scaled: bool) -> None:
    """Warm the kernels of one configuration in a background thread, once per process.

    Measured on the 2-core dev machine: numba's import plus loading the cached kernels takes ~2 s (~3 s when
    it compiles them the first time on a machine); done when the serde is configured, the first request only
    waits for what is left of it (numba's dispatcher lock makes a concurrent first call wait, not compile twice).
    The thread is a daemon so that it never delays a normal exit by more than :func:`_join_warm_ups` allows,
    and it is joined at exit so that it is never inside numba while the interpreter finalizes.
    """
    with _warm_lock:
        if (fp8, scaled) in _warmed or _warm_stop.is_set():
            return
        _warmed.add((fp8, scaled))
        _warm_threads[:] = [t for t in _warm_threads if t.is_alive()]
        thread = threading.Thread(target=_warm_up, args=(fp8, scaled), name="kvtier-fp8-warm-up", daemon=True)
        _warm_threads.append(thread)
        thread.start()


def fp8_factory(config: dict[str, Any]) -> AsyncSerdeProcessor:
    """``{"type": "fp8", "fp8_dtype": "float8_e4m3fn", "scale": "group", "block": 128}`` (all optional)."""
    reader = ConfigReader(config, "serde 'fp8'")
    fp8 = FP8_DTYPES[reader.string("fp8_dtype", "float8_e4m3fn", choices=FP8_DTYPES)]
    scaled = reader.string("scale", "group", choices=SCALE_MODES) == "group"
    block = reader.integer("block", DEFAULT_BLOCK, min=1, max=1 << 20)
    reader.finish()
    start_warm_up(fp8, scaled)
    stage = Fp8Stage(fp8, scaled, block)
    return AsyncSerdeProcessor(stage, stage)
