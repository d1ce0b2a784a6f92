"""fp8 serde: conformance, bit-identity with torch's cast, non-finite input, outlier accuracy."""

import pytest
import torch

from kvtier import BatchError, ConfigError, IntegrityError, SerdeError
from kvtier.bench.data import synthetic_kv
from kvtier.serde import LayoutDesc, create_serde_processor
from kvtier.serde.fp8 import Fp8Deserializer, Fp8Serializer
from kvtier.testing import SerdeTests

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SOURCES = (torch.bfloat16, torch.float16, torch.float32)


class TestFp8Scaled(SerdeTests):
    config = {"type": "fp8"}
    lossless = False
    max_rel_error = 0.07  # e4m3: 3 mantissa bits, half an ulp is 1/16 of the group's absmax at worst


class TestFp8E5m2Scaled(SerdeTests):
    config = {"type": "fp8", "fp8_dtype": "float8_e5m2", "block": 64}
    lossless = False
    max_rel_error = 0.13


class TestFp8Unscaled(SerdeTests):
    config = {"type": "fp8", "scale": "none"}
    lossless = False
    max_rel_error = 0.07  # Gaussian test data stays far below 448


def _all_finite_patterns(dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[torch.isfinite(x)].contiguous()


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    vals = [0.0, -0.0, info.tiny, info.tiny / 2, info.smallest_normal, 2**-9, 2**-10, 1.5 * 2**-10, 2**-16, 2**-17]
    vals += [447.0, 448.0, 449.0, 464.0, 465.0, 479.0, 480.0, 1e4, 57344.0, 61439.0, 61440.0, 65504.0, info.max]
    t = torch.tensor(vals, dtype=torch.float64)
    return torch.cat([t, -t]).to(dtype)


def _encode(fp8: torch.dtype, src: torch.Tensor, scaled: bool = False) -> torch.Tensor:
    ser = Fp8Serializer(fp8, scaled)
    dst = torch.empty(ser.estimate_serialized_size(LayoutDesc.of(src)), dtype=torch.uint8)
    return dst[: ser.serialize(src, dst)]


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_none_is_torch_cast_for_every_16_bit_pattern(fp8: torch.dtype, dtype: torch.dtype) -> None:
    src = _all_finite_patterns(dtype)
    payload = _encode(fp8, src)
    assert torch.equal(payload, src.to(fp8).view(torch.uint8))
    out = torch.empty_like(src)
    Fp8Deserializer(fp8, False).deserialize(payload, out)
    assert torch.equal(out.view(torch.uint8), payload.view(fp8).to(dtype).view(torch.uint8))


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", SOURCES)
def test_scale_none_is_torch_cast_on_edge_and_random_values(fp8: torch.dtype, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(200_000, generator=gen, dtype=torch.float64) * torch.exp(
        torch.randn(200_000, generator=gen, dtype=torch.float64) * 8
    )
    src = torch.cat([_edge_values(dtype), wide.to(dtype)])
    src = src[torch.isfinite(src)].contiguous()
    assert torch.equal(_encode(fp8, src), src.to(fp8).view(torch.uint8))


@pytest.mark.parametrize("scale", ["none", "group"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_fails_the_item(scale: str, bad: float) -> None:
    processor = create_serde_processor({"type": "fp8", "scale": scale})
    src = synthetic_kv((2, 2, 8, 16))
    src[1, 1, 3, 5] = bad
    dst = torch.empty(processor.estimate_serialized_size(LayoutDesc.of(src)), dtype=torch.uint8)
    with pytest.raises(BatchError) as err:
        processor.serialize_batch([src], [dst])
    assert isinstance(err.value.errors[0], SerdeError) and "non-finite" in str(err.value.errors[0])


@pytest.mark.parametrize("dtype", SOURCES)
def test_outliers_survive_scaling(dtype: torch.dtype) -> None:
    src = synthetic_kv((2, 2, 64, 256), dtype, outlier_channels=4)
    big = src.float().abs() > 448
    assert big.any()
    result = {}
    for scaled in (False, True):
        payload = _encode(torch.float8_e4m3fn, src, scaled)
        out = torch.empty_like(src)
        Fp8Deserializer(torch.float8_e4m3fn, scaled).deserialize(payload, out)
        rel = (out.float() - src.float()).abs() / src.float().abs().clamp_min(1e-6)
        result[scaled] = float((rel[big] > 0.1).float().mean())
        assert torch.isfinite(out.float()).all()
    assert result[False] > 0.5 and result[True] == 0.0


@pytest.mark.parametrize("dtype", SOURCES)
@pytest.mark.parametrize("fp8", FP8)
def test_extremes_round_trip_finite(dtype: torch.dtype, fp8: torch.dtype) -> None:
    """Values at the dtype's max and its smallest subnormals decode finite, without exponent wrap-around."""
    info = torch.finfo(dtype)
    src = torch.tensor([[info.max, -info.max, 1.0], [info.tiny, 0.0, -info.smallest_normal]], dtype=dtype)
    payload = _encode(fp8, src, scaled=True)
    out = torch.empty_like(src)
    Fp8Deserializer(fp8, True).deserialize(payload, out)
    assert torch.isfinite(out.float()).all()
    assert torch.allclose(out[0].double(), src[0].double(), rtol=0.13)
    assert (out[1].double().abs() <= info.smallest_normal * 2).all()


def test_sizes_and_scales_in_payload() -> None:
    processor = create_serde_processor({"type": "fp8"})
    kv = LayoutDesc.kv_chunk(4, 256, 1024)
    assert processor.estimate_serialized_size(kv) == kv.numel + 2 * 4 * 1024
    flat = LayoutDesc((1000,), torch.bfloat16)
    assert processor.estimate_serialized_size(flat) == 1000 + 8  # 128-element blocks, the last one partial
    unscaled = create_serde_processor({"type": "fp8", "scale": "none"})
    assert unscaled.estimate_serialized_size(kv) == kv.numel


def test_corrupt_payloads_are_rejected() -> None:
    src = synthetic_kv((2, 2, 8, 16))
    payload = _encode(torch.float8_e4m3fn, src, scaled=True).clone()
    out = torch.empty_like(src)
    deser = Fp8Deserializer(torch.float8_e4m3fn, True)
    with pytest.raises(IntegrityError, match="expected"):
        deser.deserialize(payload[:-1], out)
    payload[-1] = 0x80  # exponent -128: below anything the encoder writes
    with pytest.raises(IntegrityError, match="exponent"):
        deser.deserialize(payload, out)
    with pytest.raises(SerdeError, match="bfloat16, float16 or float32"):
        Fp8Serializer(torch.float8_e4m3fn, True).serialize(torch.zeros(4, dtype=torch.int32), payload)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"fp8_dtype: expected one of"):
        create_serde_processor({"type": "fp8", "fp8_dtype": "float8_e4m3"})
    with pytest.raises(ConfigError, match=r"scale: expected a string"):
        create_serde_processor({"type": "fp8", "scale": 2.0})
    with pytest.raises(ConfigError, match=r"block: expected a value >= 1"):
        create_serde_processor({"type": "fp8", "block": 0})
