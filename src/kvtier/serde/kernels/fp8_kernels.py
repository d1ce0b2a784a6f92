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
exponent, as in OCP MXFP8), so decoding is a 256-entry table lookup plus an integer add to the exponent field
(for 16-bit outputs two codes at a time: a 65536-entry table of code pairs and one 32-bit add).

The bf16 encoders (the hot path: KV is bf16) are branch-free arithmetic with each fp8 format's constants frozen
in as int32 scalars, so that LLVM keeps 32-bit SIMD lanes (numba widens Python ints to int64); the scaled one
works block by block (amax, exponents, codes while the block is in cache).

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


# source kinds
BF16 = 0
FP16 = 1
FP32 = 2


@_kernel(inline="always")
def _f32_bits_of(x: int, kind: int) -> int:
    """float32 bit pattern of a bf16 / fp16 bit pattern (fp16 subnormals handled exactly)."""
    if kind == BF16:
        return x << 16
    sign = (x & 0x8000) << 16
    exp = (x >> 10) & 0x1F
    mant = x & 0x3FF
    if exp == 0x1F:
        return sign | 0x7F800000 | (mant << 13)
    if exp == 0:
        if mant == 0:
            return sign
        # normalise the subnormal: shift until the implicit bit appears
        e = 113
        while (mant & 0x400) == 0:
            mant <<= 1
            e -= 1
        return sign | (e << 23) | ((mant & 0x3FF) << 13)
    return sign | ((exp + 112) << 23) | (mant << 13)


@_kernel(inline="always")
def _encode_abs(a: int, mbits: int, bias: int, maxcode: int, saturate: bool) -> int:
    """fp8 magnitude code of a finite float32 magnitude given as bits ``a`` (round to nearest even)."""
    e = (a >> 23) - 127
    if e < 1 - bias:
        # below the smallest fp8 normal: an fp8 subnormal, counted in steps of 2**(1 - bias - mbits);
        # adding 2**52 in float64 rounds to the nearest integer, ties to even.
        v = np.float64(np.uint32(a).view(np.float32))
        m = (v * 2.0 ** (bias - 1 + mbits) + 4503599627370496.0) - 4503599627370496.0
        return np.int64(m)
    shift = 23 - mbits
    r = (a + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift
    code = r - ((127 - bias) << mbits)
    if code > maxcode:
        # e4m3fn has no inf: torch saturates; e5m2 rounds past its max to inf (code maxcode + 1)
        code = maxcode if saturate else maxcode + 1
    return code


@_kernel()
def encode_plain(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray, dst: np.ndarray, kind: int, mbits: int, bias: int, maxcode: int, saturate: bool
) -> int:
    """Unscaled cast of every element; returns the index of the first non-finite input, or -1."""
    for i in range(src.size):
        bits = np.int64(src[i]) if kind == FP32 else _f32_bits_of(np.int64(src[i]), kind)
        a = bits & 0x7FFFFFFF
        if a >= 0x7F800000:
            return i
        dst[i] = np.uint8(((bits >> 24) & 0x80) | _encode_abs(a, mbits, bias, maxcode, saturate))
    return -1


@_kernel()
def group_amax(src: np.ndarray, B: int, T: int, C: int, kind: int, amax: np.ndarray) -> int:  # noqa: PLR0917
    """Per-group amax as float32 magnitude bits (monotonic for finite floats) into ``amax`` (zeroed, uint32);
    returns the index of the first non-finite input, or -1."""
    for b in range(B):
        for t in range(T):
            base = (b * T + t) * C
            for c in range(C):
                x = np.int64(src[base + c])
                a = (x if kind == FP32 else _f32_bits_of(x, kind)) & 0x7FFFFFFF
                if a >= 0x7F80_0000:
                    return base + c
                g = b * C + c
                amax[g] = max(amax[g], a)
    return -1


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


@_kernel()
def encode_scaled(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    B: int,
    T: int,
    C: int,
    kind: int,
    exps: np.ndarray,
    caps: np.ndarray,
    mbits: int,
    bias: int,
    maxcode: int,
) -> None:
    """Encode ``x * 2**-e`` per group; never writes a code above ``caps`` (see :func:`exponents_from_amax`).

    The scale is applied by subtracting ``e`` from the float32 exponent field (no float multiply): a result
    whose exponent would fall below float32's normal range is far below fp8's smallest subnormal, so it is 0.
    """
    for b in range(B):
        for t in range(T):
            base = (b * T + t) * C
            for c in range(C):
                g = b * C + c
                x = np.int64(src[base + c])
                bits = x if kind == FP32 else _f32_bits_of(x, kind)
                a = bits & 0x7FFFFFFF
                e = np.int64(exps[g])
                code = 0
                if a != 0 and (a >> 23) - e >= 1:
                    code = _encode_abs(a - (e << 23), mbits, bias, maxcode, True)
                    code = min(code, caps[g])
                dst[base + c] = np.uint8(((bits >> 24) & 0x80) | code)


# Constants of the bf16 kernels, one set per fp8 format, as int32 numpy scalars: numba freezes globals into the
# compiled code, so LLVM sees literals (measured faster than the same values as arguments), and int32 operands
# keep the lanes 32 bits wide where Python ints would widen every operation to int64 (half the SIMD lanes).
_I0 = np.int32(0)
_I1 = np.int32(1)
_I7 = np.int32(7)
_I8 = np.int32(8)
_I16 = np.int32(16)
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
    shift, half, rebias, min_field, sub_mul = fmt[0], fmt[1], fmt[2], fmt[3], fmt[4]
    # per group, as int32 lanes: the exponent-field subtract, the smallest magnitude that stays a bf16 normal
    # after it (below it the code is 0; at least 1, so that zero is 0 too), and the cap
    for c in range(C):
        e = np.int32(e_row[c])
        subs[c] = e << _I7
        thrs[c] = max((e + _I1) << _I7, _I1)
        cap32[c] = np.int32(c_row[c])
    for t in range(T):
        base = (b * T + t) * C
        s_row = src[base : base + C]
        d_row = dst[base : base + C]
        for c in range(C):
            x = np.int32(s_row[c])
            a = x & _MAG16
            code = _bf16_code(a - subs[c], shift, half, rebias, min_field, sub_mul)  # scaled: a field subtract
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


@_kernel()
def decode_plain(src: np.ndarray, dst: np.ndarray, lut: np.ndarray) -> None:
    """``dst[i] = lut[src[i]]``: the exact value of every fp8 code in the output dtype's bits."""
    for i in range(src.size):
        dst[i] = lut[src[i]]


@_kernel(error_model="numpy")
def decode_scaled(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    B: int,
    T: int,
    C: int,
    adds: np.ndarray,
    lut: np.ndarray,
) -> None:
    """``dst = lut[code] + (adds[group] if code is not +-0 else 0)``: the value times ``2**lo`` from the table,
    then ``(e - lo) << shift`` (>= 0) added to its exponent field; the two zero codes get no add.

    One table gather and a select per element (the zero test is on the code itself, not a second table), in
    rows of ``C`` so that the group's adds are a contiguous load: it vectorizes."""
    for b in range(B):
        row = adds[b * C : (b + 1) * C]
        for t in range(T):
            base = (b * T + t) * C
            s_row = src[base : base + C]
            d_row = dst[base : base + C]
            for c in range(C):
                code = s_row[c]
                add = row[c] if (code & np.uint8(0x7F)) != np.uint8(0) else 0
                d_row[c] = lut[code] + add


@_kernel(error_model="numpy")
def decode_scaled_quads(  # noqa: PLR0917 (numba kernels take positional scalars)
    src: np.ndarray,
    dst: np.ndarray,
    B: int,
    T: int,
    C4: int,
    adds: np.ndarray,
    table: np.ndarray,
) -> None:
    """:func:`decode_scaled` four codes at a time, for 16-bit outputs: ``src`` is the codes as ``uint32``,
    ``dst`` and ``adds`` the outputs and per-group adds as ``uint64`` (``C4`` = C / 4), ``table`` the ``uint64``
    entry of every pair of codes (a little-endian ``uint16``): both table values in the low 32 bits, a 0xFFFF mask
    per nonzero code in the high 32. Two gathers, one 64-bit add and one store per four codes, against four
    gathers, four selects and four stores in :func:`decode_scaled`.

    The four adds are one 64-bit add: for every code the encoder writes, each 16-bit sum fits its 16 bits (the
    bound that makes the single add exact), so no carry crosses into a neighbour."""
    low = np.uint64(0xFFFFFFFF)
    high = np.uint64(0xFFFFFFFF00000000)
    for b in range(B):
        row = adds[b * C4 : (b + 1) * C4]
        for t in range(T):
            base = (b * T + t) * C4
            s_row = src[base : base + C4]
            d_row = dst[base : base + C4]
            for c in range(C4):
                quad = s_row[c]
                first = table[quad & np.uint32(0xFFFF)]
                second = table[quad >> np.uint32(16)]
                values = (first & low) | (second << np.uint64(32))
                masks = (first >> np.uint64(32)) | (second & high)
                d_row[c] = values + (masks & row[c])
