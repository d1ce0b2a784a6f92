"""fp8 kernels, exhaustively: the branch-free bf16 encoders and the one-gather decoder against torch's arithmetic,
for every bf16 magnitude (encode) or every fp8 code (decode) at every group exponent the encoder can write."""

import math

import numpy as np
import pytest
import torch

from kvtier.errors import SerdeError
from kvtier.serde.fp8 import _FORMATS, _SOURCES, _TABLES, Fp8Stage, _groups, _min_exponent
from kvtier.serde.kernels import fp8_kernels as K
from kvtier.types import LayoutDesc

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_NAME = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
SCALED_BF16 = {
    torch.float8_e4m3fn: K.encode_bf16_with_exponents_e4m3,
    torch.float8_e5m2: K.encode_bf16_with_exponents_e5m2,
}
PLAIN_WIDE = {torch.float8_e4m3fn: K.encode_plain_wide_e4m3, torch.float8_e5m2: K.encode_plain_wide_e5m2}
PLAIN_BF16 = {torch.float8_e4m3fn: K.encode_plain_bf16_e4m3, torch.float8_e5m2: K.encode_plain_bf16_e5m2}


def _decode_scaled(  # noqa: PLR0917
    codes: np.ndarray, out: np.ndarray, B: int, T: int, C: int, exps: np.ndarray, dtype: torch.dtype, fp8: torch.dtype
) -> None:
    out_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    getattr(K, f"decode_scaled_{out_name}_{FP8_NAME[fp8]}")(codes, out, B, T, C, exps)


def _caps(fp8: torch.dtype, dtype: torch.dtype, exps: np.ndarray) -> np.ndarray:
    """Largest code per exponent whose decoded value stays finite in ``dtype`` (what the encoder clamps to)."""
    values = _TABLES[fp8].f64[: _FORMATS[fp8].maxcode + 1]
    out_max = float(torch.finfo(dtype).max)
    return np.array([int(np.nonzero(values * 2.0 ** int(e) <= out_max)[0][-1]) for e in exps], dtype=np.uint8)


@pytest.mark.parametrize("fp8", FP8)
def test_plain_bf16_encode_is_torch_cast_and_finds_the_first_non_finite(fp8: torch.dtype) -> None:
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = x[torch.isfinite(x)].contiguous()
    bits = finite.view(torch.int16).numpy().view(np.uint16)
    out = np.empty(bits.size, dtype=np.uint8)
    assert PLAIN_BF16[fp8](bits, out) == -1
    assert np.array_equal(out, finite.to(fp8).view(torch.uint8).numpy())
    for bad in (0x7F80, 0xFF80, 0x7FC1, 0xFFFF):  # +inf, -inf, NaNs
        for where in (0, 17, bits.size - 1):
            damaged = bits.copy()
            damaged[where] = bad
            damaged[-1 if where == 0 else 0] = bad  # a second one later (or earlier): the first is reported
            assert PLAIN_BF16[fp8](damaged, out) == min(where, bits.size - 1 if where == 0 else 0)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_decode_is_exact_for_every_code_at_every_exponent(fp8: torch.dtype, dtype: torch.dtype) -> None:
    """Every code x every exponent in [lo, 127]: the decoded bits are ``value(code) * 2**e`` in ``dtype`` exactly,
    for each code the encoder can write at that exponent (up to the cap, both signs, both zeros)."""
    lo = _min_exponent(fp8, dtype)
    exps = np.arange(lo, 128, dtype=np.int8)
    caps = _caps(fp8, dtype, exps)
    codes = np.arange(256, dtype=np.uint8)
    T, C = codes.size, exps.size
    src = np.ascontiguousarray(np.broadcast_to(codes[:, None], (T, C)))
    out_dtype = np.uint32 if dtype == torch.float32 else np.uint16
    out = np.zeros((T, C), dtype=out_dtype)
    _decode_scaled(src.reshape(-1), out.reshape(-1), 1, T, C, exps, dtype, fp8)

    values = torch.arange(256, dtype=torch.uint8).view(fp8).to(torch.float64)
    expected = (values[:, None] * torch.pow(2.0, torch.from_numpy(exps.astype(np.float64)))[None, :]).to(dtype)
    expected_bits = expected.view(_SOURCES[dtype][1]).numpy().view(out_dtype)
    mag = (codes & 0x7F).astype(np.int32)[:, None]
    writable = mag <= caps.astype(np.int32)[None, :]
    assert writable[:, 0].sum() >= 2 * 116  # at lo nearly every code is writable (e5m2 -> fp16: up to 2**-2 max)
    bad = np.argwhere(writable & (out != expected_bits))
    assert bad.size == 0, f"{len(bad)} mismatches, first (code, exponent) {[(codes[i], exps[j]) for i, j in bad[:3]]}"


@pytest.mark.parametrize("fp8", FP8)
def test_scaled_bf16_round_trip_through_the_stage_matches_the_reference_quantizer(fp8: torch.dtype) -> None:
    """The whole stage (amax, exponents, caps, encode) on KV-shaped data with outlier channels, zeros, tiny and
    huge values: each element decodes to torch's cast of ``x * 2**-e`` times ``2**e``."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(2, 3, 40, 24, generator=g) * torch.exp(torch.randn(1, 1, 1, 24, generator=g) * 6)
    x[..., 0] = 0.0
    x[..., 1] = 1e-38
    x[..., 2] = 3.0e38
    x[0, 0, 5, 3] = -0.0
    x = x.to(torch.bfloat16)
    stage = Fp8Stage(fp8, True)
    n = x.numel()
    buf = torch.empty(n + 2 * 3 * 24, dtype=torch.uint8)
    assert stage.serialize(x, buf) == buf.numel()
    exps = buf[n:].view(torch.int8).to(torch.float64).reshape(6, 1, 24)
    scaled = (x.to(torch.float64).reshape(6, 40, 24) * torch.pow(2.0, -exps)).to(torch.bfloat16)
    out = torch.empty_like(x)
    stage.deserialize(buf, out)
    expected = scaled.to(fp8).to(torch.float64) * torch.pow(2.0, exps)
    # the encoder flushes a scaled value below bf16's normal range to 0
    tiny = scaled.to(torch.float64).abs() < 2.0**-126
    expected = torch.where(tiny, torch.zeros_like(expected) * torch.sign(expected), expected)
    got = out.to(torch.float64).reshape(6, 40, 24)
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert math.isfinite(float(got.abs().max()))


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_scaled_names_the_first_group_holding_a_non_finite_value(
    fp8: torch.dtype, dtype: torch.dtype, bad: float
) -> None:
    """The fused kernel checks each block's amax before encoding it: a value in a later block, or two in
    different blocks, fail the item naming the first group (block-major, as the exponents are stored)."""
    x = torch.randn(3, 2, 16, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    stage = Fp8Stage(fp8, True)
    buf = torch.empty(x.numel() + 6 * 8, dtype=torch.uint8)
    for spots, group in ((((2, 1, 15, 7),), 5 * 8 + 7), (((1, 0, 3, 2), (2, 1, 0, 0)), 2 * 8 + 2)):
        y = x.clone()
        for spot in spots:
            y[spot] = bad
        with pytest.raises(SerdeError, match=f"group {group};"):
            stage.serialize(y, buf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (2, 3, 5, 6), (2, 3, 5, 7), (4, 12), (301,)])
def test_stage_decode_is_exact_for_every_row_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Rows of any length, 1-D blocks (one group per block: the kernel runs along the block) and every output
    dtype: the stage decodes each code exactly (at an odd byte offset too)."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 50).to(dtype)
    stage = Fp8Stage(torch.float8_e4m3fn, True)
    size = stage.estimate_serialized_size(LayoutDesc.of(x))
    for start in (0, 1):
        buf = torch.empty(size + start, dtype=torch.uint8)[start:]
        stage.serialize(x, buf)
        out = torch.full_like(x, 7.0)
        stage.deserialize(buf, out)
        n = x.numel()
        values = torch.from_numpy(_TABLES[torch.float8_e4m3fn].f64)[buf[:n].long()]
        exps = buf[n:].view(torch.int8).double()
        scale = torch.empty(n, dtype=torch.float64)
        g0 = 0
        for offset, b, t, c in _groups(shape, stage.block):  # group (b, c) of each element, as the stage has it
            e = exps[g0 : g0 + b * c].reshape(b, 1, c).expand(b, t, c)
            scale[offset : offset + b * t * c] = torch.pow(2.0, e).reshape(-1)
            g0 += b * c
        expected = (values * scale).to(dtype).reshape(shape)
        assert torch.equal(out, expected)
        assert torch.equal(out.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8))  # zeros' signs too
        assert ((out.double() - x.double()).abs() <= x.double().abs().amax() / 8).all()


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unscaled_decode_is_torch_cast_of_every_code(fp8: torch.dtype, dtype: torch.dtype) -> None:
    """All 256 codes, both signs: the arithmetic decode writes torch's cast bit for bit (e5m2's +-inf included);
    NaN codes, which the encoder never writes, decode to a NaN."""
    codes = torch.arange(256, dtype=torch.uint8)
    out = torch.empty(256, dtype=dtype)
    Fp8Stage(fp8, False).deserialize(codes, out)
    expected = codes.view(fp8).to(dtype)
    nan = torch.isnan(expected)
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out[~nan].view(_SOURCES[dtype][1]), expected[~nan].view(_SOURCES[dtype][1]))


NP_BITS = {torch.bfloat16: np.uint16, torch.float16: np.uint16, torch.float32: np.uint32}
NP_INT = {torch.bfloat16: np.int16, torch.float16: np.int16, torch.float32: np.int32}


def _patterns(dtype: torch.dtype) -> np.ndarray:
    """Every finite bf16 / fp16 pattern, both signs; for fp32 every exponent field with mantissas at each format's
    rounding edges (ties, one below, one above, the extremes) and random ones, both signs, subnormals included."""
    if dtype == torch.bfloat16:
        mags = np.arange(0x7F80, dtype=np.uint32)
    elif dtype == torch.float16:
        mags = np.arange(0x7C00, dtype=np.uint32)
    else:
        rng = np.random.default_rng(32)
        fields = np.arange(0, 255, dtype=np.uint32) << 23
        edges = [0x7FFFFF, 1, 2]
        for shift in (20, 21):  # e4m3 keeps 3 mantissa bits (drops 20), e5m2 keeps 2 (drops 21)
            half = 1 << (shift - 1)
            for kept in (0, 1, 2, 3):
                base = kept << shift
                edges += [base + half, base + half - 1, base + half + 1, base]
        mant = np.concatenate([np.array(sorted(set(edges)), dtype=np.uint32), rng.integers(0, 1 << 23, 24, np.uint32)])
        mags = (fields[:, None] | mant[None, :]).reshape(-1)
    sign = 0x80000000 if dtype == torch.float32 else 0x8000
    return np.concatenate([mags, mags | sign]).astype(NP_BITS[dtype])


def _values(patterns: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return torch.from_numpy(patterns.view(NP_INT[dtype])).view(dtype).to(torch.float64).numpy()


def _encode_with_exponents(  # noqa: PLR0917
    src: np.ndarray,
    out: np.ndarray,
    T: int,
    C: int,
    exps: np.ndarray,
    caps: np.ndarray,
    dtype: torch.dtype,
    fp8: torch.dtype,
) -> None:
    if dtype == torch.bfloat16:
        SCALED_BF16[fp8](src, out, 1, T, C, exps, caps)
    else:
        K.encode_wide_with_exponents(src, out, 1, T, C, exps, caps, fp8 == torch.float8_e4m3fn)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize(
    ("dtype", "normals_only"),
    [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False), (torch.float32, False)],
)
def test_scaled_encode_is_torch_rounding_at_every_exponent(
    fp8: torch.dtype, dtype: torch.dtype, normals_only: bool
) -> None:
    """bf16 and fp16 (every finite pattern) and fp32 (every exponent field, mantissas at the rounding edges) x every
    exponent in [lo, 127]: the code is torch's cast of the value times ``2**-e``, clamped to the group's cap; 0
    where the scaled value falls below float32's normals (far below fp8's smallest subnormal). Subnormal sources
    at a negative exponent included (they once had an exponent field subtracted from them: wrong codes); bf16
    blocks without one take a loop of their own, checked apart."""
    lo = _min_exponent(fp8, dtype)
    exps = np.arange(lo, 128, dtype=np.int8)
    caps = _caps(fp8, dtype, exps)
    patterns = _patterns(dtype)
    if normals_only:  # the bf16 kernel's loop for blocks without a subnormal
        patterns = patterns[(patterns & 0x7FFF) >= 0x80]
    T, C = patterns.size, exps.size
    src = np.ascontiguousarray(np.broadcast_to(patterns[:, None], (T, C)))
    out = np.full((T, C), 0xAA, dtype=np.uint8)
    _encode_with_exponents(src.reshape(-1), out.reshape(-1), T, C, exps, caps, dtype, fp8)

    x = _values(patterns, dtype)
    scaled = np.abs(x)[:, None] * np.exp2(-exps.astype(np.float64))[None, :]  # exact in float64
    f32max = float(np.finfo(np.float32).max)
    as_f32 = np.minimum(scaled, f32max).astype(np.float32)  # exact wherever the result is not flushed or capped
    code = torch.from_numpy(as_f32).to(fp8).view(torch.uint8).numpy().astype(np.int32)
    code = np.minimum(code, caps.astype(np.int32)[None, :])
    code = np.where(scaled < 2.0**-126, 0, code)
    expected = (np.where(np.signbit(x), 0x80, 0)[:, None] | code).astype(np.uint8)
    # fp32 at an exponent far below what its value needs (the encoder picks e from the group's amax, so every
    # element it encodes scales to at most the format's max) would carry the exponent field past float32's top
    reachable = scaled <= 2.0**17 if dtype == torch.float32 else np.ones_like(scaled, dtype=bool)
    bad = np.argwhere(reachable & (out != expected))
    assert bad.size == 0, (
        f"{len(bad)} mismatches, first (pattern, exponent) {[(hex(patterns[i]), exps[j]) for i, j in bad[:3]]}"
    )


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_unscaled_wide_encode_is_torch_cast_and_finds_the_first_non_finite(
    fp8: torch.dtype, dtype: torch.dtype
) -> None:
    bits = _patterns(dtype)
    out = np.empty(bits.size, dtype=np.uint8)
    assert PLAIN_WIDE[fp8](bits, out) == -1
    x = torch.from_numpy(bits.view(NP_INT[dtype])).view(dtype)
    assert np.array_equal(out, x.to(fp8).view(torch.uint8).numpy())
    inf, nan = (0x7C00, 0x7E01) if dtype == torch.float16 else (0x7F800000, 0x7FC00001)
    sign = 0x8000 if dtype == torch.float16 else 0x80000000
    for bad in (inf, inf | sign, nan, nan | sign):
        for where in (0, 1500, bits.size - 1):
            damaged = bits.copy()
            damaged[where] = bad
            damaged[-1 if where == 0 else 0] = bad
            assert PLAIN_WIDE[fp8](damaged, out) == min(where, bits.size - 1 if where == 0 else 0)
