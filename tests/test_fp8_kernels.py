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
SCALED_BF16 = {
    torch.float8_e4m3fn: K.encode_bf16_with_exponents_e4m3,
    torch.float8_e5m2: K.encode_bf16_with_exponents_e5m2,
}
PLAIN_BF16 = {torch.float8_e4m3fn: K.encode_plain_bf16_e4m3, torch.float8_e5m2: K.encode_plain_bf16_e5m2}


def _caps(fp8: torch.dtype, dtype: torch.dtype, exps: np.ndarray) -> np.ndarray:
    """Largest code per exponent whose decoded value stays finite in ``dtype`` (what the encoder clamps to)."""
    values = _TABLES[fp8].f64[: _FORMATS[fp8].maxcode + 1]
    out_max = float(torch.finfo(dtype).max)
    return np.array([int(np.nonzero(values * 2.0 ** int(e) <= out_max)[0][-1]) for e in exps], dtype=np.uint8)


@pytest.mark.parametrize("fp8", FP8)
def test_scaled_bf16_encode_is_torch_rounding_at_every_exponent(fp8: torch.dtype) -> None:
    """Every finite bf16 pattern (both signs) x every exponent in [lo, 127]: the code is torch's cast of the
    pattern scaled by ``2**-e`` (through the 32768-entry table of torch's casts), clamped to the group's cap;
    0 where the scaled value falls below bf16's normal range."""
    lo = _min_exponent(fp8, torch.bfloat16)
    exps = np.arange(lo, 128, dtype=np.int8)
    caps = _caps(fp8, torch.bfloat16, exps)
    mags = np.arange(0x7F80, dtype=np.int32)
    patterns = np.concatenate([mags, mags | 0x8000]).astype(np.uint16)
    T, C = patterns.size, exps.size
    src = np.ascontiguousarray(np.broadcast_to(patterns[:, None], (T, C)))
    out = np.full((T, C), 0xAA, dtype=np.uint8)
    SCALED_BF16[fp8](src.reshape(-1), out.reshape(-1), 1, T, C, exps, caps)

    a = (patterns.astype(np.int32) & 0x7FFF)[:, None]
    e = exps.astype(np.int32)[None, :]
    p = a - (e << 7)
    ok = (a != 0) & ((a >> 7) - e >= 1)
    table = _TABLES[fp8].encode_bf16.astype(np.int32)  # torch's cast of every bf16 magnitude
    # an exponent below what the data needs scales past bf16's range: torch would saturate (or overflow to inf),
    # and either clamps to the cap, as the largest finite pattern does
    code = np.minimum(table[np.clip(p, 0, 0x7F7F)], caps.astype(np.int32)[None, :])
    expected = (((patterns.astype(np.int32) >> 8) & 0x80)[:, None] | np.where(ok, code, 0)).astype(np.uint8)
    bad = np.argwhere(out != expected)
    assert bad.size == 0, (
        f"{len(bad)} mismatches, first (pattern, exponent) {[(patterns[i], exps[j]) for i, j in bad[:3]]}"
    )


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
    shift = _SOURCES[dtype][2]
    lut = _TABLES[fp8].lut_scaled[dtype]
    codes = np.arange(256, dtype=np.uint8)
    T, C = codes.size, exps.size
    src = np.ascontiguousarray(np.broadcast_to(codes[:, None], (T, C)))
    out = np.zeros((T, C), dtype=lut.dtype)
    adds = ((exps.astype(np.int64) - lo) << shift).astype(lut.dtype)
    K.decode_scaled(src.reshape(-1), out.reshape(-1), 1, T, C, adds, lut)

    values = torch.arange(256, dtype=torch.uint8).view(fp8).to(torch.float64)
    expected = (values[:, None] * torch.pow(2.0, torch.from_numpy(exps.astype(np.float64)))[None, :]).to(dtype)
    expected_bits = expected.view(_SOURCES[dtype][1]).numpy().view(lut.dtype)
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
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_scaled_bf16_names_the_first_group_holding_a_non_finite_value(fp8: torch.dtype, bad: float) -> None:
    """The fused kernel checks each block's amax before encoding it: a value in a later block, or two in
    different blocks, fail the item naming the first group (block-major, as the exponents are stored)."""
    x = torch.randn(3, 2, 16, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    stage = Fp8Stage(fp8, True)
    buf = torch.empty(x.numel() + 6 * 8, dtype=torch.uint8)
    for spots, group in ((((2, 1, 15, 7),), 5 * 8 + 7), (((1, 0, 3, 2), (2, 1, 0, 0)), 2 * 8 + 2)):
        y = x.clone()
        for spot in spots:
            y[spot] = bad
        with pytest.raises(SerdeError, match=f"group {group};"):
            stage.serialize(y, buf)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quad_decode_is_the_single_decode_for_every_code_pair(fp8: torch.dtype, dtype: torch.dtype) -> None:
    """Every pair of codes (65536, as one little-endian uint16) in both halves of a quad, with exponents
    ``(first + j, last - j)`` in columns 2j and 2j+1: the quad kernel writes what the single-code kernel (checked
    exhaustively above) writes, wherever both codes of the pair are writable at their exponent."""
    lo = _min_exponent(fp8, dtype)
    e_lo = np.arange(lo, 128, dtype=np.int8)
    e_lo = e_lo[_caps(fp8, dtype, e_lo) > 0]  # the exponents the encoder can write for this dtype
    e_lo = e_lo[: e_lo.size // 2 * 2]  # columns in whole quads
    exps = np.stack([e_lo, e_lo[::-1]], axis=1).reshape(-1)  # column pairs (first + j, last - j)
    caps = _caps(fp8, dtype, exps)
    shift = _SOURCES[dtype][2]
    tables = _TABLES[fp8]
    lut = tables.lut_scaled[dtype]
    adds = ((exps.astype(np.int64) - lo) << shift).astype(np.uint16)
    T, C = 65536, exps.size
    pairs = np.ascontiguousarray(np.broadcast_to(np.arange(T, dtype=np.uint16)[:, None], (T, C // 2)))
    codes = pairs.view(np.uint8).reshape(-1)
    single = np.zeros(T * C, dtype=np.uint16)
    K.decode_scaled(codes, single, 1, T, C, adds, lut)
    quads = np.zeros(T * C, dtype=np.uint16)
    K.decode_scaled_quads(
        pairs.reshape(-1).view(np.uint32),
        quads.view(np.uint64),
        1,
        T,
        C // 4,
        adds.view(np.uint64),
        tables.pairs_scaled(dtype),
    )
    both = ((codes.reshape(T, C) & 0x7F) <= caps[None, :]).reshape(T, C // 2, 2).all(axis=2)
    writable = np.repeat(both, 2, axis=1).reshape(-1)
    assert writable.sum() > T * 4
    assert np.array_equal(quads[writable], single[writable])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (2, 3, 5, 6), (2, 3, 5, 7), (4, 12), (301,)])
def test_stage_decode_takes_pairs_or_single_codes_alike(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Rows of a multiple of 4 of a 16-bit output go through the quad kernel, other rows, fp32 and 1-D blocks
    through the single one; either way the stage decodes each code exactly (at an odd byte offset too)."""
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
