"""fp8 serde: conformance, bit-identity with torch's cast, non-finite input, outlier accuracy."""

import math
import threading
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import BatchError, ConfigError, IntegrityError, SerdeError
from kvtier.bench.data import synthetic_kv
from kvtier.serde import AsyncSerdeProcessor, LayoutDesc, create_serde_processor
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


# -- one tensor on several workers ---------------------------------------------------------------------------------
SPLIT_SHAPES = [(2, 3, 40, 24), (4, 1, 7, 5), (301,), (2, 1, 1, 8), (64,)]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([*SPLIT_SHAPES, (2, 2, 3, 3), (1000,), (129,)]),
    parts=st.integers(1, 9),
    scaled=st.booleans(),
    block=st.sampled_from([1, 7, 64, 128]),
)
def test_pieces_cover_every_element_and_group_once_in_order(
    shape: tuple[int, ...], parts: int, scaled: bool, block: int
) -> None:
    stage = Fp8Serializer(torch.float8_e4m3fn, scaled, block)
    pieces = stage._pieces(shape, parts)
    assert 1 <= len(pieces) <= parts
    flat = [piece for part in pieces for piece in part]
    elements, groups = 0, 0
    for offset, b, t, c, g0, _ in flat:
        assert offset == elements  # contiguous, in tensor order
        if scaled:
            assert g0 == groups
            groups += b * c
        elements += b * t * c
    assert elements == math.prod(shape)
    if scaled:
        assert groups == stage.estimate_serialized_size(LayoutDesc.of(torch.empty(shape))) - math.prod(shape)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", SOURCES)
@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("shape", SPLIT_SHAPES)
def test_slices_write_the_bytes_of_the_whole_tensor(
    fp8: torch.dtype, dtype: torch.dtype, scaled: bool, shape: tuple[int, ...]
) -> None:
    """Any number of slices, run in reverse order: the payload and the decoded tensor are the one-call ones."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 30).to(dtype)
    stage = Fp8Serializer(fp8, scaled, 64)
    whole = _encode(fp8, x, scaled) if not scaled else None
    size = stage.estimate_serialized_size(LayoutDesc.of(x))
    ref = torch.empty(size, dtype=torch.uint8)
    n = stage.serialize(x, ref)
    ref_out = torch.empty_like(x)
    stage.deserialize(ref[:n], ref_out)
    if whole is not None:
        assert torch.equal(whole, ref[:n])
    for parts in (2, 3, 5, 64):
        buf = torch.full((size,), 0xAB, dtype=torch.uint8)
        written, calls = stage.split_serialize(x, buf, parts)
        assert written == n and 1 <= len(calls) <= parts
        for call in reversed(calls):
            call()
        assert torch.equal(buf[:n], ref[:n])
        out = torch.full_like(x, 3.0)
        for call in reversed(stage.split_deserialize(buf[:n], out, parts)):
            call()
        assert torch.equal(out.view(-1).view(torch.uint8), ref_out.view(-1).view(torch.uint8))


class _Spy:
    """Records each split the processor asks of a stage, into more than one part (observation only; the stage
    does the work; its own one-call path asks for one part)."""

    def __init__(self, stage: Fp8Serializer) -> None:
        self.stage = stage
        self.asked: list[int] = []
        self.split_serialize_real = stage.split_serialize
        self.split_deserialize_real = stage.split_deserialize
        stage.split_serialize = self.split_serialize  # type: ignore[method-assign]
        stage.split_deserialize = self.split_deserialize  # type: ignore[method-assign]

    def split_serialize(self, src: torch.Tensor, dst: torch.Tensor, parts: int) -> Any:
        if parts > 1:
            self.asked.append(parts)
        return self.split_serialize_real(src, dst, parts)

    def split_deserialize(self, src: torch.Tensor, dst: torch.Tensor, parts: int) -> Any:
        if parts > 1:
            self.asked.append(parts)
        return self.split_deserialize_real(src, dst, parts)


def _processor(workers: int, split_min_bytes: int = 4096) -> tuple[AsyncSerdeProcessor, _Spy]:
    stage = Fp8Serializer(torch.float8_e4m3fn, True)
    return AsyncSerdeProcessor(stage, stage, max_workers=workers, split_min_bytes=split_min_bytes), _Spy(stage)


def test_processor_splits_a_large_item_on_idle_workers_with_identical_bytes() -> None:
    x = synthetic_kv((2, 4, 64, 96), torch.bfloat16, outlier_channels=2)  # 96 KiB
    size = Fp8Serializer(torch.float8_e4m3fn, True).estimate_serialized_size(LayoutDesc.of(x))
    one, _ = _processor(1)
    ref = torch.empty(size, dtype=torch.uint8)
    one.serialize_batch([x], [ref])
    assert not one.stats()["serialize_failures_total"]
    three, spy = _processor(3)
    buf = torch.empty(size, dtype=torch.uint8)
    with three:
        assert three.serialize_batch([x], [buf]) == [size]
        assert spy.asked == [3]  # a lone item on an idle pool: every worker
        assert torch.equal(buf, ref)
        out = torch.empty_like(x)
        three.deserialize_batch([buf], [out])
        assert spy.asked == [3, 3]
        ref_out = torch.empty_like(x)
        one.deserialize_batch([ref], [ref_out])
        assert torch.equal(out, ref_out)
        stats = three.stats()
        assert stats["serialize_items_total"] == 1 and stats["deserialize_items_total"] == 1
        assert three._active == 0
    one.close()


def test_processor_does_not_split_small_items_or_full_batches() -> None:
    small = torch.randn(2, 1, 8, 16).to(torch.bfloat16)  # 512 bytes < split_min_bytes
    big = [torch.randn(2, 2, 32, 64).to(torch.bfloat16) for _ in range(2)]  # 16 KiB each
    proc, spy = _processor(2)
    with proc:
        dst = torch.empty(small.numel() * 2, dtype=torch.uint8)
        proc.serialize_batch([small], [dst])
        dsts = [torch.empty(b.numel() * 2, dtype=torch.uint8) for b in big]
        proc.serialize_batch(big, dsts)  # as many items as workers: each whole
        assert spy.asked == []
    # a batch of one big and one small item on 3 workers: the big one gets the one spare worker
    proc, spy = _processor(3)
    with proc:
        proc.serialize_batch([big[0], small], [dsts[0], dst])
        assert spy.asked == [2]


def test_split_item_names_the_first_bad_group_whichever_slice_fails_first() -> None:
    x = torch.randn(4, 2, 32, 16).to(torch.float16)
    x[3, 1, 31, 15] = float("nan")  # the last slice
    x[1, 0, 2, 5] = float("inf")  # an earlier one: the group named
    proc, spy = _processor(4, split_min_bytes=1024)
    with proc:
        dst = torch.empty(x.numel() + 8 * 16, dtype=torch.uint8)
        result = proc.submit_serialize([x], [dst]).result()
        assert spy.asked == [4]
        assert set(result.errors) == {0}
        assert isinstance(result.errors[0], SerdeError)
        assert "group 37;" in str(result.errors[0])  # block 2 (of 8: [4, 2] flattened), channel 5
        with pytest.raises(BatchError):
            proc.serialize_batch([x], [dst])
        assert proc.stats()["serialize_failures_total"] == 2
        # a payload that fails its checks before any slice runs fails that item only
        good = torch.randn(4, 2, 32, 16).to(torch.float16)
        proc.serialize_batch([good], [dst])
        result = proc.submit_deserialize([dst[:10], dst], [good, torch.empty_like(good)]).result()
        assert set(result.errors) == {0} and isinstance(result.errors[0], IntegrityError)
        assert proc._active == 0


def test_concurrent_batches_split_or_not_decode_exactly() -> None:
    """Eight threads submit mixed batches on one 2-worker processor: every payload is the one-thread payload."""
    rng = torch.Generator().manual_seed(9)
    items = [(torch.randn(2, 2, 16 * (1 + i % 3), 64, generator=rng) * 10).to(torch.bfloat16) for i in range(8)]
    stage = Fp8Serializer(torch.float8_e4m3fn, True)
    refs = []
    for x in items:
        ref = torch.empty(stage.estimate_serialized_size(LayoutDesc.of(x)), dtype=torch.uint8)
        stage.serialize(x, ref)
        refs.append(ref)
    proc, _ = _processor(2, split_min_bytes=4096)
    failures: list[str] = []

    def worker(k: int) -> None:
        for rep in range(6):
            picks = [(k + rep + j) % len(items) for j in range(1 + (k + rep) % 2)]
            dsts = [torch.empty_like(refs[i]) for i in picks]
            proc.serialize_batch([items[i] for i in picks], dsts)
            outs = [torch.empty_like(items[i]) for i in picks]
            proc.deserialize_batch(dsts, outs)
            for i, dst, out in zip(picks, dsts, outs, strict=True):
                if not torch.equal(dst, refs[i]):
                    failures.append(f"payload {i}")
                expected = torch.empty_like(items[i])
                stage.deserialize(refs[i], expected)
                if not torch.equal(out, expected):
                    failures.append(f"decode {i}")

    with proc:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert proc._active == 0
    assert failures == []


def test_split_min_bytes_is_checked() -> None:
    stage = Fp8Serializer(torch.float8_e4m3fn, True)
    for bad in (0, 1, -5, True, 2.5):
        with pytest.raises(ConfigError, match="split_min_bytes"):
            AsyncSerdeProcessor(stage, stage, split_min_bytes=bad)  # type: ignore[arg-type]
