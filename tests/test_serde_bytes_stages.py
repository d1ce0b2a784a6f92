"""lz4, zstd, checksum and aesgcm stages: conformance, damage detection, keys and salts, chain orders."""

import json
import os
from pathlib import Path

import pytest
import torch

from kvtier import BatchError, ConfigError, IntegrityError
from kvtier.errors import ForeignRecordError
from kvtier.serde import LayoutDesc, create_serde_processor
from kvtier.serde.base import RecordContext
from kvtier.serde.compress import shuffle_into, unshuffle_into
from kvtier.testing import SerdeTests
from kvtier.testing.serde import kv_like

KEY_HEX = "00112233445566778899aabbccddeeff" * 2
os.environ.setdefault("KVTIER_TEST_KEY", KEY_HEX)


class TestLz4(SerdeTests):
    config = {"type": "lz4"}


class TestLz4HighShuffle(SerdeTests):
    config = [{"type": "raw"}, {"type": "lz4", "level": 9, "shuffle": True}]


class TestZstd(SerdeTests):
    config = {"type": "zstd", "level": 3}


class TestZstdShuffle(SerdeTests):
    config = [{"type": "zstd", "level": 1, "shuffle": True}]


class TestChecksum(SerdeTests):
    config = {"type": "checksum"}


class TestAesGcm(SerdeTests):
    config = {"type": "aesgcm", "key_env": "KVTIER_TEST_KEY"}


class TestFullChain(SerdeTests):
    config = [
        {"type": "fp8"},
        {"type": "zstd", "level": 1, "shuffle": False},
        {"type": "checksum"},
        {"type": "aesgcm", "key_env": "KVTIER_TEST_KEY"},
    ]
    lossless = False
    max_rel_error = 0.07


def _encode(processor, src):  # type: ignore[no-untyped-def]
    dst = torch.empty(processor.estimate_serialized_size(LayoutDesc.of(src)), dtype=torch.uint8)
    (n,) = processor.serialize_batch([src], [dst])
    return dst[:n].clone()


def _decode_fails(processor, payload, like, error=IntegrityError):  # type: ignore[no-untyped-def]
    out = torch.full_like(like, 7)
    with pytest.raises(BatchError) as err:
        processor.deserialize_batch([payload], [out])
    assert isinstance(err.value.errors[0], error), err.value.errors[0]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 4097])
def test_shuffle_is_invertible(n: int) -> None:
    src = torch.randint(0, 256, (n,), dtype=torch.uint8).numpy()
    mid, back = src.copy(), src.copy()
    shuffle_into(src, mid)
    unshuffle_into(mid, back)
    assert (back == src).all()
    if n >= 4:
        assert (mid[: n // 2] == src[0 : 2 * (n // 2) : 2]).all()


def test_shuffle_helps_zstd_on_bf16_like_data() -> None:
    # smooth values share their high bytes, as real KV does; the byte-plane split lets zstd see that
    src = (torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    plain = _encode(create_serde_processor({"type": "zstd", "level": 1}), src).numel()
    shuffled = _encode(create_serde_processor({"type": "zstd", "level": 1, "shuffle": True}), src).numel()
    assert shuffled < plain < src.numel() * 2 + 16


def test_incompressible_data_is_stored() -> None:
    src = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    for name in ("lz4", "zstd"):
        processor = create_serde_processor({"type": name})
        payload = _encode(processor, src)
        assert payload.numel() == 5000 + 16 and payload[0].item() == 2  # the stored flag
        out = torch.empty_like(src)
        processor.deserialize_batch([payload], [out])
        assert torch.equal(out, src)


@pytest.mark.parametrize("name", ["lz4", "zstd"])
def test_damaged_compressed_payloads_are_a_miss(name: str) -> None:
    processor = create_serde_processor({"type": name, "shuffle": True})
    src = torch.zeros(4096, dtype=torch.bfloat16)
    payload = _encode(processor, src)
    _decode_fails(processor, payload[:8], src)  # shorter than the header
    bad_flags = payload.clone()
    bad_flags[0] = 0x80
    _decode_fails(processor, bad_flags, src)
    truncated = payload[:-3]
    _decode_fails(processor, truncated, src)


def test_checksum_detects_any_flipped_bit() -> None:
    processor = create_serde_processor({"type": "checksum"})
    src = kv_like((2, 2, 8, 16), torch.bfloat16)
    payload = _encode(processor, src)
    for pos in (0, payload.numel() // 2, payload.numel() - 1):
        bad = payload.clone()
        bad[pos] ^= 0x10
        _decode_fails(processor, bad, src)
    _decode_fails(processor, payload[:4], src)


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "key"
    path.write_text(KEY_HEX[:32] + "\n")
    return str(path)


def test_aesgcm_tamper_is_a_miss() -> None:
    processor = create_serde_processor({"type": "aesgcm", "key_env": "KVTIER_TEST_KEY"})
    src = kv_like((2, 2, 8, 16), torch.bfloat16)
    payload = _encode(processor, src)
    assert payload.numel() == src.numel() * 2 + 28
    for pos in (0, 11, 12, payload.numel() // 2, payload.numel() - 1):  # nonce, ciphertext, tag
        bad = payload.clone()
        bad[pos] ^= 1
        _decode_fails(processor, bad, src)
    _decode_fails(processor, payload[:-1], src)
    _decode_fails(processor, payload[:20], src)


def _encode_ctx(processor, src, context):  # type: ignore[no-untyped-def]
    dst = torch.empty(processor.estimate_serialized_size(LayoutDesc.of(src)), dtype=torch.uint8)
    (n,) = processor.serialize_batch([src], [dst], [context])
    return dst[:n].clone()


def _foreign(processor, payload, like, context):  # type: ignore[no-untyped-def]
    out = torch.full_like(like, 7)
    with pytest.raises(BatchError) as err:
        processor.deserialize_batch([payload], [out], None if context is None else [context])
    assert isinstance(err.value.errors[0], ForeignRecordError), err.value.errors[0]
    untouched = torch.equal(out, torch.full_like(like, 7))
    assert untouched or not out.view(torch.uint8).any(), "unauthenticated bytes must not reach the destination"


def test_aesgcm_wrong_key_other_salt_and_other_header_are_foreign(
    key_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defects 3 and 5 (serde side): the key of the record's salt, its header as associated data; a failed tag
    is ForeignRecordError (left in place by the tier), never a plain damaged-record error."""
    src = kv_like((2, 2, 8, 16), torch.float16)
    a = create_serde_processor({"type": "aesgcm", "key_file": key_file})
    monkeypatch.setenv("KVTIER_OTHER_KEY", "ff" * 16)
    b = create_serde_processor({"type": "aesgcm", "key_env": "KVTIER_OTHER_KEY", "key_bits": 128})
    _foreign(b, _encode(a, src), src, None)  # another deployment's key
    ctx = RecordContext("tenant-a", b"key=k1|layout=2LTH|serde=aesgcm")
    payload = _encode_ctx(a, src, ctx)
    _foreign(a, payload, src, None)  # the empty salt's key
    _foreign(a, payload, src, RecordContext("tenant-b", ctx.associated_data))  # another salt's key
    _foreign(a, payload, src, RecordContext("tenant-a", b"key=k2|layout=2LTH|serde=aesgcm"))  # relabelled
    _foreign(b, payload, src, ctx)
    out = torch.empty_like(src)
    a.deserialize_batch([payload], [out], [RecordContext("tenant-a", ctx.associated_data)])
    assert torch.equal(out, src)


def test_aesgcm_context_in_a_chain() -> None:
    chain = create_serde_processor([{"type": "fp8"}, {"type": "aesgcm", "key_env": "KVTIER_TEST_KEY"}])
    src = kv_like((2, 2, 8, 16), torch.bfloat16)
    ctx = RecordContext("t1", b"header")
    payload = _encode_ctx(chain, src, ctx)
    _foreign(chain, payload, src, None)
    _foreign(chain, payload, src, RecordContext("t1", b"other header"))
    out = torch.empty_like(src)
    chain.deserialize_batch([payload], [out], [ctx])
    assert (out.float() - src.float()).abs().max() <= 0.07 * src.float().abs().max()


def test_aesgcm_key_config_errors(key_file: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must not be written in the config"):
        create_serde_processor({"type": "aesgcm", "key": KEY_HEX, "key_env": "KVTIER_TEST_KEY"})
    with pytest.raises(ConfigError, match="exactly one of key_file or key_env"):
        create_serde_processor({"type": "aesgcm"})
    with pytest.raises(ConfigError, match="exactly one of key_file or key_env"):
        create_serde_processor({"type": "aesgcm", "key_file": key_file, "key_env": "KVTIER_TEST_KEY"})
    with pytest.raises(ConfigError, match=r"key_env: environment variable 'KVTIER_NOPE' is not set"):
        create_serde_processor({"type": "aesgcm", "key_env": "KVTIER_NOPE"})
    with pytest.raises(ConfigError, match="key_file: cannot read") as err:
        create_serde_processor({"type": "aesgcm", "key_file": str(tmp_path / "missing")})
    assert str(tmp_path) not in str(err.value) and err.value.__cause__ is None  # never where the key lives
    short = tmp_path / "short"
    short.write_text("abcd")
    with pytest.raises(ConfigError, match="128- or 256-bit key"):
        create_serde_processor({"type": "aesgcm", "key_file": str(short)})
    with pytest.raises(ConfigError, match="key_bits: 256 given, but the key has 128 bits"):
        create_serde_processor({"type": "aesgcm", "key_file": key_file, "key_bits": 256})
    raw = tmp_path / "raw"
    raw.write_bytes(bytes(range(32)))
    assert create_serde_processor({"type": "aesgcm", "key_file": str(raw), "key_bits": 256})


def test_compress_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"level: expected a value <= 22"):
        create_serde_processor({"type": "zstd", "level": 23})
    with pytest.raises(ConfigError, match=r"shuffle: expected true or false"):
        create_serde_processor({"type": "lz4", "shuffle": 1})
    with pytest.raises(ConfigError, match=r"algorithm: expected one of"):
        create_serde_processor({"type": "checksum", "algorithm": "md5"})


AES = {"type": "aesgcm", "key_env": "KVTIER_TEST_KEY"}


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        ([{"type": "zstd"}, {"type": "fp8"}], r"serde\[1\]: 'fp8' takes a tensor.*before every bytes stage"),
        ([AES, {"type": "fp8"}], r"serde\[1\]: 'fp8' takes a tensor.*before every bytes stage"),
        ([{"type": "fp8"}, {"type": "fp8"}], r"serde\[1\]: 'fp8' takes a tensor, but 'fp8' already turned"),
        ([{"type": "fp8"}, {"type": "raw"}], r"serde\[1\]: 'raw' takes a tensor, but 'fp8' already turned"),
        ([{"type": "raw"}, {"type": "fp8"}], r"serde\[1\]: 'fp8' takes a tensor, but 'raw' already turned"),
        ([{"type": "fp8"}, {"type": "lz4"}, {"type": "fp8"}], r"serde\[2\]: 'fp8' takes a tensor"),
        ([{"type": "checksum"}, {"type": "lz4"}, {"type": "raw"}], r"serde\[2\]: 'raw' takes a tensor"),
    ],
)
def test_every_chain_order_error(chain: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_serde_processor(json.loads(json.dumps(chain)))


def test_stage_config_errors_name_the_position() -> None:
    with pytest.raises(ConfigError, match=r"serde 'zstd'.*unknown field"):
        create_serde_processor([{"type": "fp8"}, {"type": "zstd", "levl": 1}])


def test_fp8_zstd_chain_shrinks_real_size() -> None:
    processor = create_serde_processor([{"type": "fp8"}, {"type": "zstd", "level": 1}])
    src = (torch.randn(2, 2, 64, 128) * 0.01).to(torch.bfloat16)
    payload = _encode(processor, src)
    assert payload.numel() < src.numel()  # below one byte per element
