"""Typed stages and pipeline identity (defect 4), record contexts handed to the stages that take them."""

import json
import os
import threading
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import ConfigError
from kvtier.errors import ForeignRecordError, IntegrityError
from kvtier.serde import (
    AsyncSerdeProcessor,
    BytesDeserializer,
    BytesSerializer,
    Deserializer,
    LayoutDesc,
    Serializer,
    create_serde_processor,
    register_serde_factory,
    unregister_serde_factory,
)
from kvtier.serde.aesgcm import AesGcmStage, key_fingerprint
from kvtier.serde.base import BytesBytesStage, RecordContext, TensorBytesStage
from kvtier.serde.chain import pipeline_of
from kvtier.serde.checksum import ChecksumStage
from kvtier.serde.compress import CompressStage, ZstdCodec
from kvtier.serde.fp8 import Fp8Deserializer, Fp8Serializer, Fp8Stage
from kvtier.serde.raw import RawStage
from kvtier.testing.serde import kv_like

KEY_A = "00112233445566778899aabbccddeeff"
KEY_B = "ffeeddccbbaa99887766554433221100"
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


# -- defect 4: identities of processors built directly ----------------------------------------------------------
def test_fp8_formats_built_directly_have_different_identities() -> None:
    """Defect 4: e4m3fn and e5m2 (and scaled vs unscaled, block lengths) must not accept each other's records."""
    variants = [(E4M3, True, 128), (E5M2, True, 128), (E4M3, False, 128), (E4M3, True, 64)]
    ids = [AsyncSerdeProcessor(Fp8Serializer(*v), Fp8Deserializer(*v)).identity for v in variants]
    assert len({i.config_hash for i in ids}) == len(variants)
    assert {i.name for i in ids} == {"fp8"}
    # built twice the same way: the same identity (records stay readable across restarts)
    again = AsyncSerdeProcessor(Fp8Serializer(E4M3, True, 128), Fp8Deserializer(E4M3, True, 128)).identity
    assert again == ids[0]


def test_aesgcm_identity_names_the_key_not_where_it_lives(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Defect 4: aesgcm's identity hashes which key (a fingerprint), not key_file / key_env."""
    monkeypatch.setenv("KVTIER_ID_KEY", KEY_A)
    key_file = tmp_path / "key"
    key_file.write_text(KEY_A)
    by_env = create_serde_processor({"type": "aesgcm", "key_env": "KVTIER_ID_KEY"})
    by_file = create_serde_processor({"type": "aesgcm", "key_file": str(key_file), "key_bits": 128})
    direct = AsyncSerdeProcessor(AesGcmStage(bytes.fromhex(KEY_A)), AesGcmStage(bytes.fromhex(KEY_A)))
    assert by_env.identity == by_file.identity == direct.identity
    monkeypatch.setenv("KVTIER_ID_KEY", KEY_B)  # same config, another key: another identity
    other = create_serde_processor({"type": "aesgcm", "key_env": "KVTIER_ID_KEY"})
    assert other.identity != by_env.identity and other.config == by_env.config
    # the fingerprint reveals nothing of the key, the identity and stage config hold no key and no location
    fp = key_fingerprint(bytes.fromhex(KEY_A))
    assert len(fp) == 16 and fp not in KEY_A and KEY_A[:8] not in fp
    described = json.dumps(by_env.serializer.get_config()) + repr(by_env.serializer) + repr(by_env)
    assert KEY_A not in described and "KVTIER_ID_KEY" not in described and str(key_file) not in described
    assert by_env.identity.name == "aesgcm"


def test_aesgcm_identity_in_a_chain_follows_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    config = [{"type": "fp8"}, {"type": "aesgcm", "key_env": "KVTIER_ID_KEY"}]
    monkeypatch.setenv("KVTIER_ID_KEY", KEY_A)
    a = create_serde_processor(config)
    monkeypatch.setenv("KVTIER_ID_KEY", KEY_B)
    b = create_serde_processor(config)
    assert a.identity.name == b.identity.name == "fp8+aesgcm" and a.identity != b.identity


def test_config_identities_of_stored_records_do_not_change() -> None:
    """Records written before stages were typed keep their identity (else every stored record turns foreign)."""
    expected = {
        json.dumps({"type": "raw"}): "b247933f718813aacf05066cfae06b80",
        json.dumps({"type": "fp8"}): "d0c0ab729eb63a0b0b31cfb973cbbfb5",
        json.dumps([{"type": "fp8"}, {"type": "zstd"}]): "4502d9c57d1e98c1e4764d37344a845c",
        json.dumps({"type": "checksum"}): "3c8ead1b5f70e0e5fd368e044f657d3b",
        json.dumps({"type": "lz4", "shuffle": True}): "bd73f17a6508a5b667151562caf51f91",
    }
    for config, digest in expected.items():
        assert create_serde_processor(json.loads(config)).identity.config_hash.hex() == digest, config


def test_typed_stages_describe_themselves() -> None:
    stages = [
        RawStage(),
        Fp8Stage(E5M2, False, 32),
        CompressStage(ZstdCodec(3), shuffle=True),
        ChecksumStage(),
        AesGcmStage(bytes.fromhex(KEY_A)),
    ]
    for stage in stages:
        config = stage.get_config()
        assert json.loads(json.dumps(config)) == config and config["type"] == stage.name
        assert stage.format_version == 1
        assert isinstance(stage, TensorBytesStage | BytesBytesStage)
    assert stages[1].get_config() == {"type": "fp8", "fp8_dtype": "float8_e5m2", "scale": "none", "block": 32}
    assert stages[2].get_config() == {"type": "zstd", "level": 3, "shuffle": True}
    # a stage built directly has the identity of the equal config where the config spells out every field
    assert (
        pipeline_of([Fp8Stage(E5M2, False, 32)]).identity
        == create_serde_processor({"type": "fp8", "fp8_dtype": "float8_e5m2", "scale": "none", "block": 32}).identity
    )


def test_a_format_version_bump_changes_the_identity() -> None:
    class RawV2(RawStage):
        format_version = 2

    assert pipeline_of([RawV2()]).identity != pipeline_of([RawStage()]).identity
    register_serde_factory("raw_v2_test", lambda config: AsyncSerdeProcessor(RawV2(), RawV2()))
    try:
        v2 = create_serde_processor({"type": "raw_v2_test"})
        assert v2.identity == create_serde_processor({"type": "raw_v2_test"}).identity
        assert v2.serializer.identity_config({"type": "raw_v2_test"}) == {"type": "raw_v2_test", "format_version": 2}
    finally:
        unregister_serde_factory("raw_v2_test")


# A seed-style user serde without get_config().
class PlainSerializer(Serializer):
    def serialize(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        data = src.reshape(-1).view(torch.uint8)
        dst[: data.numel()].copy_(data)
        return data.numel()

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return layout_desc.nbytes


class PlainDeserializer(Deserializer):
    def deserialize(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.reshape(-1).view(torch.uint8).copy_(src)


def test_a_processor_without_config_or_get_config_has_no_identity() -> None:
    """Storage asks for the identity when it is configured: such a processor is refused with a clear error."""
    processor = AsyncSerdeProcessor(PlainSerializer(), PlainDeserializer())
    with pytest.raises(ConfigError, match=r"no identity.*get_config\(\)"):
        _ = processor.identity
    assert "PlainSerializer" in repr(processor)  # repr and batches still work
    src = kv_like((3, 8), torch.float32)
    dst = torch.empty(96, dtype=torch.uint8)
    assert processor.serialize_batch([src], [dst]) == [96]
    processor.close()
    # built from a registered factory, the config names it
    register_serde_factory("plain_test", lambda config: AsyncSerdeProcessor(PlainSerializer(), PlainDeserializer()))
    try:
        assert create_serde_processor({"type": "plain_test"}).identity.name == "plain_test"
    finally:
        unregister_serde_factory("plain_test")


def test_halves_that_describe_different_configs_are_refused() -> None:
    processor = AsyncSerdeProcessor(Fp8Serializer(E4M3, True), Fp8Deserializer(E5M2, True))
    with pytest.raises(ConfigError, match="describe different configs"):
        _ = processor.identity
    # one half without a config: the other half's names the stage
    half = AsyncSerdeProcessor(PlainSerializer(), Fp8Deserializer(E4M3, True))
    assert half.identity == pipeline_of([Fp8Stage(E4M3, True)]).identity


def test_pipeline_of_checks_the_order_and_puts_raw_first() -> None:
    with pytest.raises(ConfigError, match=r"serde\[1\]: 'raw' takes a tensor"):
        pipeline_of([RawStage(), RawStage()])
    with pytest.raises(ConfigError, match="at least one stage"):
        pipeline_of([])
    with pytest.raises(ConfigError, match="typed stage"):
        pipeline_of([PlainSerializer()])  # type: ignore[list-item]
    chain = pipeline_of([ChecksumStage()], max_workers=2)
    assert chain.identity.name == "raw+checksum" and chain.max_workers == 2
    src = kv_like((2, 2, 4, 8), torch.bfloat16)
    dst = torch.empty(chain.estimate_serialized_size(LayoutDesc.of(src)), dtype=torch.uint8)
    (n,) = chain.serialize_batch([src], [dst])
    out = torch.empty_like(src)
    chain.deserialize_batch([dst[:n]], [out])
    assert torch.equal(out, src)


# -- record contexts ---------------------------------------------------------------------------------------------
class _SeenSerializer(BytesSerializer):
    """A user's bytes stage that takes the record context: appends the associated data's length."""

    takes_context: ClassVar[bool] = True

    def __init__(self) -> None:
        self.seen: list[RecordContext | None] = []
        self.lock = threading.Lock()

    def serialize(self, src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None = None) -> int:
        with self.lock:
            self.seen.append(context)
        n = src.numel()
        dst[:n].copy_(src)
        return n

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return layout_desc.nbytes


class _SeenDeserializer(BytesDeserializer):
    takes_context: ClassVar[bool] = True

    def __init__(self) -> None:
        self.seen: list[RecordContext | None] = []
        self.lock = threading.Lock()

    def decoded_size(self, src: torch.Tensor) -> int:
        return src.numel()

    def deserialize(self, src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None = None) -> None:
        with self.lock:
            self.seen.append(context)
        dst.copy_(src)


def test_contexts_reach_the_stages_that_take_them_and_only_those() -> None:
    ser, deser = _SeenSerializer(), _SeenDeserializer()
    register_serde_factory("seen_test", lambda config: AsyncSerdeProcessor(ser, deser))
    try:
        # raw and checksum take two arguments (they would raise TypeError on a third), the user stage three
        chain = create_serde_processor([{"type": "raw"}, {"type": "seen_test"}, {"type": "checksum", "max_workers": 3}])
        srcs = [kv_like((2, 2, 4, 8), torch.bfloat16, seed=i) for i in range(5)]
        contexts = [RecordContext(f"salt-{i}", f"aad-{i}".encode()) for i in range(5)]
        bound = chain.estimate_serialized_size(LayoutDesc.of(srcs[0]))
        dsts = [torch.empty(bound, dtype=torch.uint8) for _ in srcs]
        sizes = chain.serialize_batch(srcs, dsts, contexts)
        assert sorted(c.associated_data for c in ser.seen if c) == sorted(c.associated_data for c in contexts)
        outs = [torch.empty_like(s) for s in srcs]
        chain.deserialize_batch([d[:n] for d, n in zip(dsts, sizes, strict=True)], outs, contexts)
        assert sorted(c.cache_salt for c in deser.seen if c) == [f"salt-{i}" for i in range(5)]
        assert all(torch.equal(o, s) for o, s in zip(outs, srcs, strict=True))
        chain.serialize_batch(srcs[:1], dsts[:1])  # no contexts: the stage gets None
        assert ser.seen[-1] is None
        with pytest.raises(ValueError, match="record contexts"):
            chain.submit_serialize(srcs, dsts, contexts[:2])
        chain.close()
    finally:
        unregister_serde_factory("seen_test")


def test_record_context_repr_hides_the_salt() -> None:
    assert "tenant-secret" not in repr(RecordContext("tenant-secret", b"x"))


@settings(max_examples=60, deadline=None)
@given(salt=st.text(max_size=300), other=st.text(max_size=300), aad=st.binary(max_size=64))
def test_aesgcm_any_salt_round_trips_and_binds(salt: str, other: str, aad: bytes) -> None:
    """Any salt string (slashes, 300 characters, lone surrogates) works; another salt or header is foreign."""
    stage = _AES
    src = torch.arange(48, dtype=torch.uint8)
    dst = torch.empty(stage.estimate_serialized_size(LayoutDesc.of(src)), dtype=torch.uint8)
    ctx = RecordContext(salt, aad)
    n = stage.serialize(src, dst, ctx)
    out = torch.empty_like(src)
    stage.deserialize(dst[:n], out, RecordContext(salt, aad))
    assert torch.equal(out, src)
    if other != salt:
        with pytest.raises(ForeignRecordError):
            stage.deserialize(dst[:n], out, RecordContext(other, aad))
    with pytest.raises(ForeignRecordError):
        stage.deserialize(dst[:n], out, RecordContext(salt, aad + b"!"))
    bad = dst[:n].clone()
    bad[n // 2] ^= 4
    with pytest.raises(IntegrityError):
        stage.deserialize(bad, out, ctx)


_AES = AesGcmStage(os.urandom(32))


def test_aesgcm_caches_derived_keys_per_salt_and_is_thread_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four threads, 13 salts, a derived-key cache of 3: keys are evicted and derived again under contention,
    and every record still decodes under its own salt only."""
    monkeypatch.setattr("kvtier.serde.aesgcm._KEY_CACHE", 3)
    stage = AesGcmStage(bytes.fromhex(KEY_A))
    src = kv_like((2, 2, 4, 8), torch.bfloat16)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                ctx = RecordContext(f"s{(t * 7 + i) % 13}", b"h%d" % i)
                dst = torch.empty(src.numel() * 2 + 28, dtype=torch.uint8)
                n = stage.serialize(src, dst, ctx)
                out = torch.empty_like(src)
                stage.deserialize(dst[:n], out, ctx)
                assert torch.equal(out, src)
                with pytest.raises(ForeignRecordError):
                    stage.deserialize(dst[:n], out, RecordContext(f"s{(t * 7 + i + 1) % 13}", ctx.associated_data))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(stage._aeads) <= 3
