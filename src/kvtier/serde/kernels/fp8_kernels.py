# numba types the kernels itself; numpy scalar arithmetic here is int64 throughout, which mypy reads as
# np.signedinteger rather than int.
# mypy: disable-error-code="arg-type,return-value,no-any-return"
"""fp8 encode / decode kernels (numba ``nogil``), written against raw bit patterns.

Inputs are read as bits (bf16 and fp16 as ``uint16``, fp32 as ``uint32``) so that one kernel serves every
source dtype without a torch cast. The float32 -> fp8 rounding below is round-to-nearest-even on the bits,
the same rule torch uses; e4m3fn saturates to +-448 and e5m2 overflows to +-inf, as torch 2.13 does, so
``"scale": "none"`` is bit-identical to ``tensor.to(float8_*)`` (the tests check every bf16 and fp16 pattern).

A tensor is seen as ``[B, T, C]``: one group per ``(b, c)`` (a KV channel, amax over the tokens ``T``), or for a
flat tensor ``C = 1`` and ``T`` = the block length. Each group has a power-of-two scale ``2**e`` (one ``int8``
exponent, as in OCP MXFP8), so scaling is exact arithmetic on the exponent field both ways.

Every kernel is branch-free arithmetic (no table, no data-dependent branch) with each format's constants frozen
in as numpy int32 / uint16 / float32 scalars and every intermediate cast back to its width, so that LLVM keeps
narrow SIMD lanes (numba widens Python ints to int64, which halves or quarters the lanes): encoders in 32-bit
lanes (bf16 on its own bits, fp16 widened to float32 bits, fp32 as is), decoders to bf16 / fp16 in 16-bit lanes,
to fp32 in 32-bit lanes. The scaled encoders work block by block (amax, exponents, codes while the block is in
cache). Every kernel is ``nogil``: the serde processor runs slices of one tensor on several threads.

Compilation is cached on disk (``cache=True``) in a named directory, ``$KVTIER_CACHE_DIR/numba`` (default
``~/.cache/kvtier/numba``), so it works when site-packages is read-only and only the first process on a machine
pays the compile. ``NUMBA_CACHE_DIR``, when set, wins; when the kvtier directory is not writable either, numba
falls back to its own locations (next to this file, then its per-user directory).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import njit


def cache_dir() -> Path | None:
    """Where the compiled kernels are cached: ``$KVTIER_CACHE_DIR/numba`` or ``~/.cache/kvtier/numba``."""
    env = os.environ.get("KVTIER_CACHE_DIR")
    try:
        root = Path(env).expanduser() if env else Path.home() / ".cache" / "kvtier"
    except RuntimeError:  # no home directory to expand
        return None
    return root / "numba"


@contextlib.contextmanager
def _kvtier_cache_dir() -> Iterator[None]:
    # numba picks a function's cache directory when it is decorated, from numba.config.CACHE_DIR (the documented
    # NUMBA_CACHE_DIR setting); set it for our kernels only, and put back what was there.
    config: Any = numba.config  # its settings are set at run time; mypy cannot see them
    previous = config.CACHE_DIR
    path = cache_dir()
    if previous or path is None:
        yield
        return
    config.CACHE_DIR = str(path)
    try:
        yield
    finally:
        config.CACHE_DIR = previous


def _kernel(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(nogil=True, cache=True, **options)`` with the cache in :func:`cache_dir`."""

    def wrap(fn: Callable[..., Any]) -> Any:
        with _kvtier_cache_dir():
            return njit(nogil=True, cache=True, **options)(fn)

    return wrap


@_kernel()
def exponents_from_amax(  # noqa: PLR0917 (numba kernels take positional scalars)
    amax: np.ndarray,
    fp8_max: float,
    out_max: float,
    lo: int,
    exps: np.ndarray,
    caps: np.ndarray,
    lut_f64: np.ndarray,
    maxcode: int,
) -> None:
    """Per-group exponent ``e`` with ``amax * 2**-e <= fp8_max``, clamped to ``[lo, 127]``; ``caps[g]`` is the
    largest code whose decoded value stays <= ``out_max``. ``amax`` holds float32 magnitude bits."""
    for g in range(amax.size):
        m = np.float64(np.uint32(amax[g]).view(np.float32))
        e = lo if lo > 0 else 0
        if m > 0.0:
            frac, k = math.frexp(m / fp8_max)
            e = k - 1 if frac == 0.5 else k
            e = max(lo, min(127, e))
        exps[g] = e
        cap = maxcode
        while cap > 0 and lut_f64[cap] * 2.0**e > out_max:
            cap -= 1
        caps[g] = cap


# Constants of the bf16 kernels, one set per fp8 format, as int32 numpy scalars: numba freezes globals into the
# compiled code, so LLVM sees literals (measured faster than the same values as arguments), and int32 operands
# keep the lanes 32 bits wide where Python ints would widen every operation to int64 (half the SIMD lanes).
_I0 = np.int32(0)
_I1 = np.int32(1)
_I7 = np.int32(7)
_I8 = np.int32(8)
_I16 = np.int32(16)
_I23 = np.int32(23)
_I127 = np.int32(127)
_SIGN16 = np.int32(0x8000)
_SIGN8 = np.int32(0x80)
_MAG16 = np.int32(0x7FFF)
_INF16 = np.int32(0x7F80)
_ROW = 1024  # elements per inner loop of the flat kernels (measured faster than longer rows here)
_MAGIC = np.float32(8388608.0)  # 2**23: adding it rounds a float32 in [0, 2**23) to an integer, ties to even
# e4m3fn: 3 mantissa bits, bias 7, largest finite code 0x7E (448); torch saturates to it
_E4_SHIFT = np.int32(7 - 3)
_E4_HALF = np.int32((1 << (7 - 3 - 1)) - 1)
_E4_REBIAS = np.int32((127 - 7) << 3)
_E4_MIN_FIELD = np.int32(128 - 7)
_E4_SUB_MUL = np.float32(2.0 ** (7 - 1 + 3))
_E4_MAX = np.int32(0x7E)
_E4_OVER = np.int32(0x7E)
# e5m2: 2 mantissa bits, bias 15, largest finite code 0x7B (57344); torch rounds past it to inf (0x7C)
_E5_SHIFT = np.int32(7 - 2)
_E5_HALF = np.int32((1 << (7 - 2 - 1)) - 1)
_E5_REBIAS = np.int32((127 - 15) << 2)
_E5_MIN_FIELD = np.int32(128 - 15)
_E5_SUB_MUL = np.float32(2.0 ** (15 - 1 + 2))
_E5_MAX = np.int32(0x7B)
_E5_OVER = np.int32(0x7C)


_BF16_MIN_NORMAL = np.int32(0x80)
_F32_MIN_NORMAL = np.int32(0x800000)


@_kernel(inline="always", error_model="numpy")
def _subnormal_factor(e: int) -> float:
    """``2**-e`` as float32 for a group exponent ``e < 0``, else 0: a subnormal source's scaled value is a float
    multiply (exact: a power of two, a normal result); for ``e >= 0`` it stays below float32's normals, so 0."""
    if e < 0:
        return np.int32(np.int32(_I127 - e) << _I23).view(np.float32)
    return np.float32(0.0)


@_kernel(inline="always", error_model="numpy")
def _bf16_code(p: int, shift: int, half: int, rebias: int, min_field: int, sub_mul: float) -> int:  # noqa: PLR0917
    """fp8 magnitude code of the finite bf16 magnitude pattern ``p`` (int32), round to nearest even, as torch
    casts it; not clamped (a code past the format's largest is the caller's to clamp).

    Both results are computed and one selected, so the loop has no data-dependent branch and vectorizes. Normal:
    rounding on the bits (add half an ulp minus one, plus the kept lsb, then shift). Subnormal (unbiased exponent
    below ``1 - bias``): the value in units of the smallest subnormal, rounded by float32's own ties-to-even add
    of ``2**23``; float32 holds every bf16 value exactly, so there is one rounding, the same as torch's.
    """
    r = (p + half + ((p >> shift) & _I1)) >> shift
    normal = r - rebias
    v = np.uint32(p << _I16).view(np.float32) * sub_mul
    sub = np.int32((v + _MAGIC) - _MAGIC)
    return normal if (p >> _I7) >= min_field else sub


@_kernel(inline="always", error_model="numpy")
def _encode_block_bf16(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    b: int,
    T: int,
    C: int,
    e_row: np.ndarray,
    c_row: np.ndarray,
    subs: np.ndarray,
    thrs: np.ndarray,
    cap32: np.ndarray,
    fmt: tuple[Any, ...],
) -> None:
    """Encode block ``b`` (``T x C`` elements) with its groups' exponents ``e_row`` and caps ``c_row``;
    ``subs`` / ``thrs`` / ``cap32`` are ``C``-long int32 scratch rows."""
    # per group, as int32 lanes: the exponent-field subtract, the smallest magnitude that stays a bf16 normal
    # after it (below it the code is 0; at least 1, so that zero is 0 too), and the cap
    muls = np.empty(C, dtype=np.float32)
    for c in range(C):
        e = np.int32(e_row[c])
        subs[c] = e << _I7
        thrs[c] = max((e + _I1) << _I7, _I1)
        cap32[c] = np.int32(c_row[c])
        muls[c] = _subnormal_factor(e)
    # A subnormal source has no exponent field to subtract the scale from: it takes a float multiply instead.
    # KV rarely holds one, so a block without any (one pass over the block, in cache after the amax) runs the
    # loop without that path (14.8 against 16.9 ms for a 32 MiB chunk, measured here).
    low = np.full(C, 0xFFFF, dtype=np.uint16)
    for t in range(T):
        base = (b * T + t) * C
        s_row = src[base : base + C]
        for c in range(C):
            low[c] = min(low[c], np.uint16(np.uint16(s_row[c] & np.uint16(0x7FFF)) - np.uint16(1)))
    if low.min() < np.uint16(0x7F):
        _encode_rows_bf16(src, dst, b, T, C, subs, thrs, cap32, muls, fmt, True)
    else:
        _encode_rows_bf16(src, dst, b, T, C, subs, thrs, cap32, muls, fmt, False)


@_kernel(inline="always", error_model="numpy")
def _encode_rows_bf16(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    b: int,
    T: int,
    C: int,
    subs: np.ndarray,
    thrs: np.ndarray,
    cap32: np.ndarray,
    muls: np.ndarray,
    fmt: tuple[Any, ...],
    subnormals: bool,
) -> None:
    shift, half, rebias, min_field, sub_mul = fmt[0], fmt[1], fmt[2], fmt[3], fmt[4]
    for t in range(T):
        base = (b * T + t) * C
        s_row = src[base : base + C]
        d_row = dst[base : base + C]
        for c in range(C):
            x = np.int32(s_row[c])
            a = x & _MAG16
            p = np.int32(a - subs[c])  # scaled: a subtract from the exponent field
            if subnormals:  # a subnormal times 2**-e (exact: a power of two, a normal result)
                sub = np.int32(np.float32(np.int32(a << _I16).view(np.float32) * muls[c]).view(np.int32) >> _I16)
                p = p if a >= _BF16_MIN_NORMAL else sub
            code = _bf16_code(p, shift, half, rebias, min_field, sub_mul)
            cap = cap32[c]
            code = cap if code > cap else code  # caps <= the largest finite code: clamps overflow too
            d_row[c] = np.uint8(((x >> _I8) & _SIGN8) | (code if a >= thrs[c] else _I0))


@_kernel(inline="always", error_model="numpy")
def _with_exponents_bf16(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray, caps: np.ndarray, fmt: tuple[Any, ...]
) -> None:
    subs = np.zeros(C, dtype=np.int32)
    thrs = np.zeros(C, dtype=np.int32)
    cap32 = np.zeros(C, dtype=np.int32)
    for b in range(B):
        e_row = exps[b * C : (b + 1) * C]
        c_row = caps[b * C : (b + 1) * C]
        _encode_block_bf16(src, dst, b, T, C, e_row, c_row, subs, thrs, cap32, fmt)


@_kernel(error_model="numpy")
def encode_bf16_with_exponents_e4m3(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray, caps: np.ndarray
) -> None:
    """The encode step of :func:`encode_scaled_bf16_e4m3` with given exponents and caps (what the exhaustive
    tests drive at every exponent)."""
    _with_exponents_bf16(src, dst, B, T, C, exps, caps, (_E4_SHIFT, _E4_HALF, _E4_REBIAS, _E4_MIN_FIELD, _E4_SUB_MUL))


@_kernel(error_model="numpy")
def encode_bf16_with_exponents_e5m2(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray, caps: np.ndarray
) -> None:
    """:func:`encode_bf16_with_exponents_e4m3` for e5m2."""
    _with_exponents_bf16(src, dst, B, T, C, exps, caps, (_E5_SHIFT, _E5_HALF, _E5_REBIAS, _E5_MIN_FIELD, _E5_SUB_MUL))


@_kernel(inline="always", error_model="numpy")
def _scaled_bf16(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    B: int,
    T: int,
    C: int,
    exps: np.ndarray,
    caps: np.ndarray,
    fp8_max: float,
    out_max: float,
    lo: int,
    lut_f64: np.ndarray,
    fmt: tuple[Any, ...],
) -> int:
    maxcode = fmt[5]
    amax16 = np.zeros(C, dtype=np.uint16)
    amax = np.zeros(C, dtype=np.uint32)
    subs = np.zeros(C, dtype=np.int32)
    thrs = np.zeros(C, dtype=np.int32)
    cap32 = np.zeros(C, dtype=np.int32)
    # One block of T x C elements at a time (512 KiB for a KV chunk): its amax, its exponents, then its encode
    # while the block is still in cache, instead of two passes over the whole tensor from memory.
    for b in range(B):
        amax16[:] = 0
        for t in range(T):
            base = (b * T + t) * C
            s_row = src[base : base + C]
            for c in range(C):
                amax16[c] = max(amax16[c], s_row[c] & np.uint16(0x7FFF))
        for c in range(C):
            if amax16[c] >= np.uint16(0x7F80):
                return b * C + c
            amax[c] = np.uint32(amax16[c]) << np.uint32(16)
        e_row = exps[b * C : (b + 1) * C]
        c_row = caps[b * C : (b + 1) * C]
        exponents_from_amax(amax, fp8_max, out_max, lo, e_row, c_row, lut_f64, maxcode)
        _encode_block_bf16(src, dst, b, T, C, e_row, c_row, subs, thrs, cap32, fmt)
    return -1


@_kernel(error_model="numpy")
def encode_scaled_bf16_e4m3(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    B: int,
    T: int,
    C: int,
    exps: np.ndarray,
    caps: np.ndarray,
    out_max: float,
    lo: int,
    lut_f64: np.ndarray,
) -> int:
    """The whole scaled encode of bfloat16 to e4m3fn: per-group amax, exponents and caps (as
    :func:`exponents_from_amax`) into ``exps`` / ``caps`` (``uint8``), and the codes, branch-free in int32 SIMD
    lanes. Returns the first group holding a non-finite value, or -1 (then nothing is to be trusted in ``dst``).

    Scaling subtracts ``e`` from the bf16 exponent field, as the generic kernel does on float32 bits, then
    :func:`_bf16_code` rounds as torch's cast does (checked against torch's cast of every bf16 magnitude at every
    exponent). 1.95x the table-based serialize it replaces (amax, exponents, codes), in CPU time on one thread here.
    """
    return _scaled_bf16(
        src,
        dst,
        B,
        T,
        C,
        exps,
        caps,
        448.0,
        out_max,
        lo,
        lut_f64,
        (_E4_SHIFT, _E4_HALF, _E4_REBIAS, _E4_MIN_FIELD, _E4_SUB_MUL, _E4_MAX),
    )


@_kernel(error_model="numpy")
def encode_scaled_bf16_e5m2(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    B: int,
    T: int,
    C: int,
    exps: np.ndarray,
    caps: np.ndarray,
    out_max: float,
    lo: int,
    lut_f64: np.ndarray,
) -> int:
    """:func:`encode_scaled_bf16_e4m3` for e5m2."""
    return _scaled_bf16(
        src,
        dst,
        B,
        T,
        C,
        exps,
        caps,
        57344.0,
        out_max,
        lo,
        lut_f64,
        (_E5_SHIFT, _E5_HALF, _E5_REBIAS, _E5_MIN_FIELD, _E5_SUB_MUL, _E5_MAX),
    )


@_kernel(inline="always", error_model="numpy")
def _plain_bf16(src: np.ndarray, dst: np.ndarray, fmt: tuple[Any, ...]) -> int:
    shift, half, rebias, min_field, sub_mul, maxcode, over = fmt
    n = src.size
    # The non-finite check is an elementwise max into a row of maxima, in its own loop over the row just encoded
    # (still in L1): a scalar reduction inside the encode loop kept it to 256-bit lanes at half the speed.
    tops = np.zeros(_ROW, dtype=np.uint16)
    for start in range(0, n, _ROW):
        s_row = src[start : start + _ROW]
        d_row = dst[start : start + _ROW]
        for i in range(s_row.size):
            x = np.int32(s_row[i])
            a = x & _MAG16
            code = _bf16_code(a, shift, half, rebias, min_field, sub_mul)
            code = over if code > maxcode else code
            d_row[i] = np.uint8(((x >> _I8) & _SIGN8) | code)
        for i in range(s_row.size):
            tops[i] = max(tops[i], s_row[i] & np.uint16(0x7FFF))
    if tops.max() >= _INF16:  # a non-finite input: find the first one (the item fails; off the fast path)
        for i in range(n):
            if (np.int32(src[i]) & _MAG16) >= _INF16:
                return i
    return -1


@_kernel(error_model="numpy")
def encode_plain_bf16_e4m3(src: np.ndarray, dst: np.ndarray) -> int:
    """:func:`encode_plain` for bfloat16 to e4m3fn (saturating, as torch does), branch-free in SIMD lanes."""
    return _plain_bf16(src, dst, (_E4_SHIFT, _E4_HALF, _E4_REBIAS, _E4_MIN_FIELD, _E4_SUB_MUL, _E4_MAX, _E4_OVER))


@_kernel(error_model="numpy")
def encode_plain_bf16_e5m2(src: np.ndarray, dst: np.ndarray) -> int:
    """:func:`encode_plain` for bfloat16 to e5m2 (past the largest finite value to inf, as torch does)."""
    return _plain_bf16(src, dst, (_E5_SHIFT, _E5_HALF, _E5_REBIAS, _E5_MIN_FIELD, _E5_SUB_MUL, _E5_MAX, _E5_OVER))


# -- fp16 and fp32 sources: the same branch-free design on float32 magnitude bits ---------------------------------
# fp16 bits are widened to float32 bits first (normal: a shift and a rebias add; subnormal: an exact int -> float
# conversion times 2**-24), so one rounding routine serves both; every operation is written on int32 / float32
# scalars so that LLVM keeps 32-bit lanes.
_I13 = np.int32(13)
_I24 = np.int32(24)
_F16_MAG = np.int32(0x7FFF)
_F16_INF = np.int32(0x7C00)
_F16_MIN_NORMAL = np.int32(0x0400)
_F16_REBIAS32 = np.int32((127 - 15) << 23)
_F16_SUB_MUL = np.float32(2.0**-24)
_F32_MAG = np.int32(0x7FFFFFFF)
_F32_INF = np.int32(0x7F800000)
# per fp8 format on float32 bits: shift, half an ulp minus one, rebias, smallest normal exponent field, subnormal
# multiplier, largest finite code, code past it
_E4_F32 = (
    np.int32(23 - 3),
    np.int32((1 << (23 - 3 - 1)) - 1),
    np.int32((127 - 7) << 3),
    np.int32(128 - 7),
    np.float32(2.0 ** (7 - 1 + 3)),
    _E4_MAX,
    _E4_OVER,
)
_E5_F32 = (
    np.int32(23 - 2),
    np.int32((1 << (23 - 2 - 1)) - 1),
    np.int32((127 - 15) << 2),
    np.int32(128 - 15),
    np.float32(2.0 ** (15 - 1 + 2)),
    _E5_MAX,
    _E5_OVER,
)


@_kernel(inline="always", error_model="numpy")
def _f16_mag_to_f32(h: int) -> int:
    """float32 bits of the finite fp16 magnitude pattern ``h`` (int32), exactly, without a branch."""
    normal = np.int32(np.int32(h << _I13) + _F16_REBIAS32)
    sub = np.int32(np.float32(np.float32(h) * _F16_SUB_MUL).view(np.int32))
    return normal if h >= _F16_MIN_NORMAL else sub


@_kernel(inline="always", error_model="numpy")
def _f32_code(p: int, shift: int, half: int, rebias: int, min_field: int, sub_mul: float) -> int:  # noqa: PLR0917
    """:func:`_bf16_code` on float32 magnitude bits ``p`` (int32): torch's round to nearest even, not clamped."""
    r = np.int32(np.int32(np.int32(p + half) + np.int32((p >> shift) & _I1)) >> shift)
    normal = np.int32(r - rebias)
    v = np.float32(np.int32(p).view(np.float32) * sub_mul)
    sub = np.int32((v + _MAGIC) - _MAGIC)
    return normal if np.int32(p >> _I23) >= min_field else sub


@_kernel(inline="always", error_model="numpy")
def _wide_mag(x: int, fp16: bool) -> int:
    """float32 magnitude bits of a finite fp16 (``fp16``) or fp32 pattern ``x`` (int32)."""
    if fp16:
        return _f16_mag_to_f32(np.int32(x & _F16_MAG))
    return np.int32(x & _F32_MAG)


@_kernel(inline="always", error_model="numpy")
def _wide_sign(x: int, fp16: bool) -> int:
    """The sign of an fp16 / fp32 pattern ``x`` (int32) as the fp8 sign bit."""
    if fp16:
        return np.int32(np.int32(x >> _I8) & _SIGN8)
    return np.int32(np.int32(x >> _I24) & _SIGN8)


@_kernel(inline="always", error_model="numpy")
def _plain_wide(src: np.ndarray, dst: np.ndarray, fmt: tuple[Any, ...], fp16: bool) -> int:
    shift, half, rebias, min_field, sub_mul, maxcode, over = fmt
    n = src.size
    mag_mask = _F16_MAG if fp16 else _F32_MAG
    inf = _F16_INF if fp16 else _F32_INF
    tops = np.zeros(_ROW, dtype=np.int32)  # as in _plain_bf16: the non-finite check in its own loop per row
    for start in range(0, n, _ROW):
        s_row = src[start : start + _ROW]
        d_row = dst[start : start + _ROW]
        for i in range(s_row.size):
            x = np.int32(s_row[i])
            code = _f32_code(_wide_mag(x, fp16), shift, half, rebias, min_field, sub_mul)
            code = over if code > maxcode else code
            d_row[i] = np.uint8(_wide_sign(x, fp16) | code)
        for i in range(s_row.size):
            tops[i] = max(tops[i], np.int32(np.int32(s_row[i]) & mag_mask))
    if tops.max() >= inf:
        for i in range(n):
            if np.int32(np.int32(src[i]) & mag_mask) >= inf:
                return i
    return -1


# One entry per format (and below per output dtype): numba compiles what a process uses, one small kernel at a time
# (a kernel holding every variant took 10-17 s to compile on a loaded 2-core machine).
@_kernel(error_model="numpy")
def encode_plain_wide_e4m3(src: np.ndarray, dst: np.ndarray) -> int:
    """The unscaled cast of fp16 (``src`` as ``uint16``) or fp32 (``uint32``) to e4m3fn (saturating), as torch
    casts; returns the first non-finite element, or -1."""
    return _plain_wide(src, dst, _E4_F32, src.itemsize == 2)


@_kernel(error_model="numpy")
def encode_plain_wide_e5m2(src: np.ndarray, dst: np.ndarray) -> int:
    """:func:`encode_plain_wide_e4m3` to e5m2 (past the largest finite value to inf, as torch does)."""
    return _plain_wide(src, dst, _E5_F32, src.itemsize == 2)


@_kernel(inline="always", error_model="numpy")
def _scaled_wide(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    B: int,
    T: int,
    C: int,
    exps: np.ndarray,
    caps: np.ndarray,
    fp8_max: float,
    out_max: float,
    lo: int,
    lut_f64: np.ndarray,
    fmt: tuple[Any, ...],
    fp16: bool,
) -> int:
    maxcode = fmt[5]
    mag_mask = _F16_MAG if fp16 else _F32_MAG
    inf = _F16_INF if fp16 else _F32_INF
    top = np.zeros(C, dtype=np.int32)
    amax = np.zeros(C, dtype=np.uint32)
    subs = np.zeros(C, dtype=np.int32)
    thrs = np.zeros(C, dtype=np.int32)
    cap32 = np.zeros(C, dtype=np.int32)
    # block by block, as _scaled_bf16: amax on the source patterns (monotonic in magnitude), exponents, codes
    for b in range(B):
        top[:] = 0
        for t in range(T):
            base = (b * T + t) * C
            s_row = src[base : base + C]
            for c in range(C):
                top[c] = max(top[c], np.int32(np.int32(s_row[c]) & mag_mask))
        for c in range(C):
            if top[c] >= inf:
                return b * C + c
            amax[c] = np.uint32(_wide_mag(top[c], fp16))
        e_row = exps[b * C : (b + 1) * C]
        c_row = caps[b * C : (b + 1) * C]
        exponents_from_amax(amax, fp8_max, out_max, lo, e_row, c_row, lut_f64, maxcode)
        _encode_block_wide(src, dst, b, T, C, e_row, c_row, subs, thrs, cap32, fmt, fp16)
    return -1


@_kernel(inline="always", error_model="numpy")
def _encode_block_wide(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    b: int,
    T: int,
    C: int,
    e_row: np.ndarray,
    c_row: np.ndarray,
    subs: np.ndarray,
    thrs: np.ndarray,
    cap32: np.ndarray,
    fmt: tuple[Any, ...],
    fp16: bool,
) -> None:
    """:func:`_encode_block_bf16` for fp16 / fp32 sources, on float32 magnitude bits."""
    shift, half, rebias, min_field, sub_mul = fmt[0], fmt[1], fmt[2], fmt[3], fmt[4]
    muls = np.empty(C, dtype=np.float32)
    for c in range(C):
        e = np.int32(e_row[c])
        subs[c] = np.int32(e << _I23)  # the scale: a subtract from the float32 exponent field
        thrs[c] = max(np.int32(np.int32(e + _I1) << _I23), _I1)  # below it the scaled value is no normal: 0
        cap32[c] = np.int32(c_row[c])
        muls[c] = _subnormal_factor(e)
    for t in range(T):
        base = (b * T + t) * C
        s_row = src[base : base + C]
        d_row = dst[base : base + C]
        for c in range(C):
            x = np.int32(s_row[c])
            a = _wide_mag(x, fp16)
            if fp16:  # every fp16 value is a float32 normal
                p = np.int32(a - subs[c])
            else:  # an fp32 subnormal has no exponent to subtract from: times 2**-e
                sub = np.int32(np.float32(np.int32(a).view(np.float32) * muls[c]).view(np.int32))
                p = np.int32(a - subs[c]) if a >= _F32_MIN_NORMAL else sub
            code = _f32_code(p, shift, half, rebias, min_field, sub_mul)
            cap = cap32[c]
            code = cap if code > cap else code
            d_row[c] = np.uint8(_wide_sign(x, fp16) | (code if a >= thrs[c] else _I0))


@_kernel(error_model="numpy")
def encode_wide_with_exponents(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray, caps: np.ndarray, e4m3: bool
) -> None:
    """The encode step of :func:`encode_scaled_wide` with given exponents and caps (what the tests drive at every
    exponent), for fp16 (``src`` as ``uint16``) or fp32 (``uint32``)."""
    fp16 = src.itemsize == 2
    subs = np.zeros(C, dtype=np.int32)
    thrs = np.zeros(C, dtype=np.int32)
    cap32 = np.zeros(C, dtype=np.int32)
    for b in range(B):
        e_row, c_row = exps[b * C : (b + 1) * C], caps[b * C : (b + 1) * C]
        if e4m3:
            _encode_block_wide(src, dst, b, T, C, e_row, c_row, subs, thrs, cap32, _E4_F32, fp16)
        else:
            _encode_block_wide(src, dst, b, T, C, e_row, c_row, subs, thrs, cap32, _E5_F32, fp16)


@_kernel(error_model="numpy")
def encode_scaled_wide_e4m3(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    B: int,
    T: int,
    C: int,
    exps: np.ndarray,
    caps: np.ndarray,
    out_max: float,
    lo: int,
    lut_f64: np.ndarray,
) -> int:
    """:func:`encode_scaled_bf16_e4m3` for fp16 (``src`` as ``uint16``) and fp32 (``uint32``) sources: the scale
    subtracts ``e`` from the float32 exponent field, :func:`_f32_code` rounds as torch does. Returns the first
    group holding a non-finite value, or -1."""
    return _scaled_wide(src, dst, B, T, C, exps, caps, 448.0, out_max, lo, lut_f64, _E4_F32, src.itemsize == 2)


@_kernel(error_model="numpy")
def encode_scaled_wide_e5m2(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    B: int,
    T: int,
    C: int,
    exps: np.ndarray,
    caps: np.ndarray,
    out_max: float,
    lo: int,
    lut_f64: np.ndarray,
) -> int:
    """:func:`encode_scaled_wide_e4m3` for e5m2."""
    return _scaled_wide(src, dst, B, T, C, exps, caps, 57344.0, out_max, lo, lut_f64, _E5_F32, src.itemsize == 2)


# -- decode: arithmetic, no table ------------------------------------------------------------------------------
# A nonzero fp8 magnitude ``mag`` is a normal (mag >= 2**mbits) or a subnormal. Normal: the output's bits are
# ``(mag << (out_mbits - mbits)) + rebias``, and a scale 2**e adds ``e << out_mbits``: one add of a per-group
# constant. Subnormal ``m = mag`` (1 .. 2**mbits - 1): ``m * 2**(1 - bias - mbits + e)``, which the encoder's lowest
# exponent keeps a normal number of the output dtype. One select picks the path: no table, no gather.
# * 16-bit outputs (bf16, fp16), in 16-bit lanes: with ``k = floor(log2 m)`` the subnormal's bits are
#   ``(k << out_m) + (m << (out_m - k))`` plus a per-group constant (the exponent of ``2**(1 - bias - mbits + e)``,
#   less one, in the exponent field); ``k`` is at most 2 (e4m3) or 1 (e5m2), so two or one selects. Zero is a third.
# * fp32: ``float32(m) * 2**(1 - bias - mbits + e)``, exact (at most 3 significant bits, a power-of-two factor, a
#   normal result); zero comes out of the same multiply.
_U0 = np.uint16(0)
_U1 = np.uint16(1)
_U2 = np.uint16(2)
_U4 = np.uint16(4)
_U8 = np.uint16(8)
_UMAG8 = np.uint16(0x7F)
_USIGN8 = np.uint16(0x80)
_MAG8 = np.int32(0x7F)
# per fp8 format: mantissa bits, bias, magnitude mask, smallest normal code, largest finite code
_E4_DEC = (np.int32(3), 7, np.int32(7), np.int32(8), np.int32(0x7E))
_E5_DEC = (np.int32(2), 15, np.int32(3), np.int32(4), np.int32(0x7B))
# per 16-bit output: mantissa bits, exponent bias, inf
_BF16_OUT = (np.uint16(7), 127, np.uint16(0x7F80))
_FP16_OUT = (np.uint16(10), 15, np.uint16(0x7C00))


@_kernel(inline="always", error_model="numpy")
def _decode16(mag: int, add: int, sub_add: int, nshift: int, out_m: int, e4m3: bool) -> int:  # noqa: PLR0917
    """16-bit output bits (no sign) of the fp8 magnitude ``mag`` (uint16) in a group with ``add`` / ``sub_add``."""
    normal = np.uint16(np.uint16(mag << nshift) + add)
    one = np.uint16(_U1 << out_m)
    t0 = np.uint16(mag << out_m)
    t1 = np.uint16(np.uint16(mag << np.uint16(out_m - _U1)) + one)
    if e4m3:  # m in 1 .. 7: k = 0, 1, 2
        t2 = np.uint16(np.uint16(mag << np.uint16(out_m - _U2)) + np.uint16(one + one))
        term = t2 if mag >= _U4 else (t1 if mag >= _U2 else t0)
        min_code = _U8
    else:  # m in 1 .. 3: k = 0, 1
        term = t1 if mag >= _U2 else t0
        min_code = _U4
    v = normal if mag >= min_code else np.uint16(term + sub_add)
    return v if mag != _U0 else _U0


@_kernel(inline="always", error_model="numpy")
def _decode32(mag: int, add: int, mult: float, nshift: int, min_code: int) -> int:
    """fp32 output bits (no sign) of the fp8 magnitude ``mag`` (int32) in a group with ``add`` / ``mult``."""
    normal = np.int32(np.int32(mag << nshift) + add)
    sub = np.int32(np.float32(np.float32(mag) * mult).view(np.int32))
    return normal if mag >= min_code else sub


@_kernel(inline="always", error_model="numpy")
def _scale_row16(exps: np.ndarray, adds: np.ndarray, sub_adds: np.ndarray, fmt: tuple[Any, ...], out: Any) -> None:
    """Per group of a row, for 16-bit outputs: the normal path's add (rebias plus ``e`` in the exponent field) and
    the subnormal path's (the exponent of ``2**(1 - bias - mbits + e)``, less one, in the exponent field)."""
    mbits, bias = fmt[0], fmt[1]
    out_m, out_bias = out[0], out[1]
    for c in range(exps.size):
        e = np.int32(exps[c])
        adds[c] = np.uint16(np.int32(np.int32(out_bias - bias) + e) << out_m)
        sub_adds[c] = np.uint16(np.int32(np.int32(out_bias - bias - mbits) + e) << out_m)


@_kernel(inline="always", error_model="numpy")
def _decode_scaled16(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray, fmt: tuple[Any, ...], out: Any
) -> None:
    e4m3 = fmt[0] == np.int32(3)
    out_m = out[0]
    nshift = np.uint16(out_m - np.uint16(fmt[0]))
    adds = np.zeros(C, dtype=np.uint16)
    sub_adds = np.zeros(C, dtype=np.uint16)
    for b in range(B):
        _scale_row16(exps[b * C : (b + 1) * C], adds, sub_adds, fmt, out)
        if C == 1:  # a flat tensor's blocks: one group per block, the loop runs along the block instead
            add, sub_add = adds[0], sub_adds[0]
            s_row = src[b * T : (b + 1) * T]
            d_row = dst[b * T : (b + 1) * T]
            for t in range(T):
                x = np.uint16(s_row[t])
                v = _decode16(np.uint16(x & _UMAG8), add, sub_add, nshift, out_m, e4m3)
                d_row[t] = np.uint16(np.uint16(np.uint16(x & _USIGN8) << _U8) | v)
            continue
        for t in range(T):
            base = (b * T + t) * C
            s_row = src[base : base + C]
            d_row = dst[base : base + C]
            for c in range(C):
                x = np.uint16(s_row[c])
                v = _decode16(np.uint16(x & _UMAG8), adds[c], sub_adds[c], nshift, out_m, e4m3)
                d_row[c] = np.uint16(np.uint16(np.uint16(x & _USIGN8) << _U8) | v)


@_kernel(inline="always", error_model="numpy")
def _decode_scaled32(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray, fmt: tuple[Any, ...]
) -> None:
    mbits, bias, min_code = fmt[0], fmt[1], fmt[3]
    nshift = np.int32(_I23 - mbits)
    adds = np.zeros(C, dtype=np.int32)
    mults = np.zeros(C, dtype=np.float32)
    for b in range(B):
        for c in range(C):
            e = np.int32(exps[b * C + c])
            adds[c] = np.int32(np.int32(np.int32(127 - bias) + e) << _I23)
            mults[c] = np.int32(np.int32(np.int32(127 + 1 - bias) - mbits + e) << _I23).view(np.float32)
        for t in range(T):
            base = (b * T + t) * C
            s_row = src[base : base + C]
            d_row = dst[base : base + C]
            for c in range(C):
                x = np.int32(s_row[c])
                v = _decode32(np.int32(x & _MAG8), adds[c], mults[c], nshift, min_code)
                d_row[c] = np.uint32(np.int32(np.int32(x & _SIGN8) << _I24) | v)


@_kernel(error_model="numpy")
def decode_scaled_bf16_e4m3(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray
) -> None:
    """Decode the codes of a ``[B, T, C]`` view with the group exponents ``exps`` (``int8``, one per ``(b, c)``,
    each >= the encoder's lowest for this output) into ``dst``, the output's bits (``uint16``; ``uint32`` for
    fp32): ``value(code) * 2**e`` exactly."""
    _decode_scaled16(src, dst, B, T, C, exps, _E4_DEC, _BF16_OUT)


@_kernel(error_model="numpy")
def decode_scaled_fp16_e4m3(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray
) -> None:
    """decode_scaled_bf16_e4m3 from e4m3 to fp16."""
    _decode_scaled16(src, dst, B, T, C, exps, _E4_DEC, _FP16_OUT)


@_kernel(error_model="numpy")
def decode_scaled_fp32_e4m3(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray
) -> None:
    """decode_scaled_bf16_e4m3 from e4m3 to fp32."""
    _decode_scaled32(src, dst, B, T, C, exps, _E4_DEC)


@_kernel(error_model="numpy")
def decode_scaled_bf16_e5m2(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray
) -> None:
    """decode_scaled_bf16_e4m3 from e5m2 to bf16."""
    _decode_scaled16(src, dst, B, T, C, exps, _E5_DEC, _BF16_OUT)


@_kernel(error_model="numpy")
def decode_scaled_fp16_e5m2(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray
) -> None:
    """decode_scaled_bf16_e4m3 from e5m2 to fp16."""
    _decode_scaled16(src, dst, B, T, C, exps, _E5_DEC, _FP16_OUT)


@_kernel(error_model="numpy")
def decode_scaled_fp32_e5m2(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, B: int, T: int, C: int, exps: np.ndarray
) -> None:
    """decode_scaled_bf16_e4m3 from e5m2 to fp32."""
    _decode_scaled32(src, dst, B, T, C, exps, _E5_DEC)


@_kernel(inline="always", error_model="numpy")
def _decode_plain16(src: np.ndarray, dst: np.ndarray, fmt: tuple[Any, ...], out: Any) -> None:
    mbits, bias, mmask, maxcode = fmt[0], fmt[1], fmt[2], fmt[4]
    e4m3 = mbits == np.int32(3)
    out_m, out_bias, inf = out
    nshift = np.uint16(out_m - np.uint16(mbits))
    add = np.uint16((out_bias - bias) << out_m)
    sub_add = np.uint16(np.int32(out_bias - bias - mbits) << out_m)
    umask, umax = np.uint16(mmask), np.uint16(maxcode)
    for i in range(src.size):
        x = np.uint16(src[i])
        mag = np.uint16(x & _UMAG8)
        v = _decode16(mag, add, sub_add, nshift, out_m, e4m3)
        # inf and NaN codes (e5m2's overflow to inf; NaN is never written): the output's inf / NaN
        special = np.uint16(inf | np.uint16(np.uint16(mag & umask) << nshift))
        v = special if mag > umax else v
        dst[i] = np.uint16(np.uint16(np.uint16(x & _USIGN8) << _U8) | v)


@_kernel(inline="always", error_model="numpy")
def _decode_plain32(src: np.ndarray, dst: np.ndarray, fmt: tuple[Any, ...]) -> None:
    mbits, bias, mmask, min_code, maxcode = fmt
    nshift = np.int32(_I23 - mbits)
    add = np.int32((127 - bias) << 23)
    mult = np.int32(np.int32(127 + 1 - bias - mbits) << _I23).view(np.float32)
    for i in range(src.size):
        x = np.int32(src[i])
        mag = np.int32(x & _MAG8)
        v = _decode32(mag, add, mult, nshift, min_code)
        special = np.int32(_F32_INF | np.int32(np.int32(mag & mmask) << nshift))
        v = special if mag > maxcode else v
        dst[i] = np.uint32(np.int32(np.int32(x & _SIGN8) << _I24) | v)


@_kernel(error_model="numpy")
def decode_plain_bf16_e4m3(src: np.ndarray, dst: np.ndarray) -> None:
    """The unscaled decode: every code's value in the output's bits, as torch casts it (NaN codes: a NaN)."""
    _decode_plain16(src, dst, _E4_DEC, _BF16_OUT)


@_kernel(error_model="numpy")
def decode_plain_fp16_e4m3(src: np.ndarray, dst: np.ndarray) -> None:
    """decode_plain_bf16_e4m3 from e4m3 to fp16."""
    _decode_plain16(src, dst, _E4_DEC, _FP16_OUT)


@_kernel(error_model="numpy")
def decode_plain_fp32_e4m3(src: np.ndarray, dst: np.ndarray) -> None:
    """decode_plain_bf16_e4m3 from e4m3 to fp32."""
    _decode_plain32(src, dst, _E4_DEC)


@_kernel(error_model="numpy")
def decode_plain_bf16_e5m2(src: np.ndarray, dst: np.ndarray) -> None:
    """decode_plain_bf16_e4m3 from e5m2 to bf16."""
    _decode_plain16(src, dst, _E5_DEC, _BF16_OUT)


@_kernel(error_model="numpy")
def decode_plain_fp16_e5m2(src: np.ndarray, dst: np.ndarray) -> None:
    """decode_plain_bf16_e4m3 from e5m2 to fp16."""
    # e5m2 is the high byte of fp16 (its subnormals are fp16 subnormals, which the arithmetic path does not
    # produce): a shift is the exact cast of every code
    for i in range(src.size):
        dst[i] = np.uint16(np.uint16(src[i]) << _U8)


@_kernel(error_model="numpy")
def decode_plain_fp32_e5m2(src: np.ndarray, dst: np.ndarray) -> None:
    """decode_plain_bf16_e4m3 from e5m2 to fp32."""
    _decode_plain32(src, dst, _E5_DEC)
