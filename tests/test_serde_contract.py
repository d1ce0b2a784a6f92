"""The serde contract: registry, processor batches, chains, raw and fast serde."""

import json

import pytest
import torch

from kvtier import BatchError, ConfigError, SerdeError
from kvtier.serde import (
    AsyncSerdeProcessor,
    BytesDeserializer,
    BytesSerializer,
    Deserializer,
    FastDeserializer,
    FastSerializer,
    LayoutDesc,
    Serializer,
    create_serde_processor,
    register_serde_factory,
    registered_serdes,
    unregister_serde_factory,
)
from kvtier.serde.raw import RawDeserializer, RawSerializer
from kvtier.testing import SerdeTests
from kvtier.testing.serde import kv_like


class TestRawSerde(SerdeTests):
    config = {"type": "raw"}
    dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.int32, torch.bool)


# A user's own serde, written exactly as the README shows: XOR every byte with a key byte.
class XorSerializer(BytesSerializer):
    def __init__(self, key: int) -> None:
        self.key = key

    def serialize(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        n = src.numel()
        torch.bitwise_xor(src, self.key, out=dst[:n])
        return n

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return layout_desc.nbytes


class XorDeserializer(BytesDeserializer):
    def __init__(self, key: int) -> None:
        self.key = key

    def decoded_size(self, src: torch.Tensor) -> int:
        return src.numel()

    def deserialize(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        torch.bitwise_xor(src, self.key, out=dst)


@pytest.fixture
def xor_serde():
    register_serde_factory(
        "xor_test",
        lambda cfg: AsyncSerdeProcessor(XorSerializer(cfg.get("key", 0x5A)), XorDeserializer(cfg.get("key", 0x5A))),
    )
    yield "xor_test"
    unregister_serde_factory("xor_test")


def test_registry_lists_builtins() -> None:
    assert "raw" in registered_serdes()


def test_unknown_type_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown serde 'nope'.*raw"):
        create_serde_processor({"type": "nope"})


def test_missing_type_and_bad_shapes_of_config() -> None:
    with pytest.raises(ConfigError, match=r"serde\.type: required"):
        create_serde_processor({})
    with pytest.raises(ConfigError, match="expected an object or a list"):
        create_serde_processor("raw")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown field"):
        create_serde_processor({"type": "raw", "levle": 3})
    with pytest.raises(ConfigError, match="max_workers"):
        create_serde_processor({"type": "raw", "max_workers": 0})


def test_duplicate_registration_is_an_error(xor_serde: str) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_serde_factory(xor_serde, lambda cfg: AsyncSerdeProcessor(RawSerializer(), RawDeserializer()))


def test_factory_must_return_a_processor() -> None:
    register_serde_factory("bad_factory", lambda cfg: object())  # type: ignore[arg-type,return-value]
    try:
        with pytest.raises(ConfigError, match="AsyncSerdeProcessor"):
            create_serde_processor({"type": "bad_factory"})
    finally:
        unregister_serde_factory("bad_factory")


def test_max_workers_is_applied() -> None:
    assert create_serde_processor({"type": "raw", "max_workers": 4}).max_workers == 4


def test_user_bytes_stage_in_a_chain(xor_serde: str) -> None:
    processor = create_serde_processor([{"type": "raw"}, {"type": xor_serde, "key": 7}])
    assert processor.identity.name == f"raw+{xor_serde}"
    src = kv_like((2, 4, 8, 16), torch.bfloat16)
    dst = torch.empty(processor.estimate_serialized_size(LayoutDesc.of(src)), dtype=torch.uint8)
    (n,) = processor.serialize_batch([src], [dst])
    assert not torch.equal(dst[:n], src.view(-1).view(torch.uint8))  # the xor stage ran
    out = torch.empty_like(src)
    processor.deserialize_batch([dst[:n]], [out])
    assert torch.equal(out, src)
    # a chain of only bytes stages gets an implicit raw first stage
    implicit = create_serde_processor([{"type": xor_serde}])
    (m,) = implicit.serialize_batch([src], [dst])
    assert m == n


def test_chain_order_is_checked_when_built(xor_serde: str) -> None:
    with pytest.raises(ConfigError, match=r"serde\[1\]: 'raw' takes a tensor"):
        create_serde_processor([{"type": "raw"}, {"type": "raw"}])
    with pytest.raises(ConfigError, match=r"serde\[1\]: 'raw' takes a tensor.*before every bytes stage"):
        create_serde_processor([{"type": xor_serde}, {"type": "raw"}])
    with pytest.raises(ConfigError, match="at least one stage"):
        create_serde_processor([])


def test_identity_depends_on_config(xor_serde: str) -> None:
    a = create_serde_processor([{"type": xor_serde, "key": 1}])
    b = create_serde_processor([{"type": xor_serde, "key": 2}])
    assert a.identity.name == b.identity.name and a.identity != b.identity and a != b


def test_failed_deserialize_fails_the_batch() -> None:
    processor = create_serde_processor({"type": "raw"})
    src = kv_like((4, 4), torch.float32)
    outs = [torch.empty_like(src), torch.empty_like(src)]
    good = src.view(-1).view(torch.uint8)
    with pytest.raises(BatchError, match=r"1 item\(s\) failed, first #1") as err:
        processor.deserialize_batch([good, good[:-1]], outs)
    assert isinstance(err.value.errors[1], SerdeError)


def test_batch_length_mismatch_and_closed_processor() -> None:
    processor = create_serde_processor({"type": "raw"})
    with pytest.raises(ValueError, match="destinations"):
        processor.submit_serialize([torch.zeros(1)], [])
    processor.close()
    with pytest.raises(RuntimeError, match="closed"):
        processor.serialize_batch([torch.zeros(1)], [torch.empty(4, dtype=torch.uint8)])


def test_processor_rejects_non_serde_objects() -> None:
    with pytest.raises(ConfigError, match="serializer"):
        AsyncSerdeProcessor(object(), RawDeserializer())  # type: ignore[arg-type]


def test_abstract_methods_must_be_implemented() -> None:
    class Half(Serializer):
        def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
            return 0

    with pytest.raises(TypeError):
        Half()  # type: ignore[abstract]
    assert issubclass(BytesDeserializer, Deserializer)


def test_raw_rejects_non_contiguous_and_small_dst() -> None:
    ser = RawSerializer()
    with pytest.raises(SerdeError, match="contiguous"):
        ser.serialize(torch.zeros(4, 4).t(), torch.empty(64, dtype=torch.uint8))
    with pytest.raises(SerdeError, match="needed"):
        ser.serialize(torch.zeros(4), torch.empty(8, dtype=torch.uint8))


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bfloat16,
        torch.float16,
        torch.float32,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int64,
        torch.uint8,
    ],
)
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (2, 2, 4, 8)])
def test_fast_serde_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    src = kv_like(shape, torch.float32).to(dtype) if dtype.is_floating_point else kv_like(shape, dtype)
    data = FastSerializer().to_bytes(src)
    assert isinstance(data, bytes) and len(data) == src.numel() * src.element_size()
    for out in (FastDeserializer(dtype).from_bytes(data), FastDeserializer(dtype).from_bytes_normal(data)):
        assert out.dim() == 1 and out.dtype == dtype
        assert torch.equal(out.view(torch.uint8), src.reshape(-1).view(torch.uint8))


def test_fast_deserializer_shares_or_copies() -> None:
    buf = bytearray(FastSerializer().to_bytes(torch.arange(4, dtype=torch.int32)))
    shared = FastDeserializer(torch.int32).from_bytes(buf)
    copied = FastDeserializer("int32").from_bytes_normal(buf)
    buf[0] = 9
    assert shared[0].item() == 9 and copied[0].item() == 0
    with pytest.raises(SerdeError, match="whole number"):
        FastDeserializer(torch.float32).from_bytes(b"abc")


def test_processor_config_is_json() -> None:
    processor = create_serde_processor({"type": "raw", "max_workers": 2})
    assert json.loads(json.dumps(processor.config)) == {"type": "raw", "max_workers": 2}


def test_identity_ignores_max_workers() -> None:
    """The thread count changes no byte of output: records written with 1 worker stay readable with 4."""
    one = create_serde_processor({"type": "raw"})
    four = create_serde_processor({"type": "raw", "max_workers": 4})
    assert one.identity == four.identity
    assert (
        create_serde_processor([{"type": "raw", "max_workers": 2}]).identity
        == create_serde_processor([{"type": "raw"}]).identity
    )


def test_processor_counts_busy_time_items_and_failures() -> None:
    processor = create_serde_processor({"type": "raw"})
    src = kv_like((4, 64), torch.float32)
    dst = torch.empty(src.numel() * 4, dtype=torch.uint8)
    processor.serialize_batch([src, src], [dst, dst.clone()])
    with pytest.raises(BatchError):
        processor.deserialize_batch([dst[:-1]], [torch.empty_like(src)])
    stats = processor.stats()
    assert stats["serialize_items_total"] == 2 and stats["serialize_failures_total"] == 0
    assert stats["deserialize_items_total"] == 1 and stats["deserialize_failures_total"] == 1
    assert stats["serialize_seconds_total"] > 0.0
