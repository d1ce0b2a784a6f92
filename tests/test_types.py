import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvtier import ConfigError, KVFormat, LayoutDesc, ObjectKey


def test_object_key_round_trips_through_its_string() -> None:
    key = ObjectKey("HuggingFaceTB/SmolLM2-135M", "00ff", kv_rank=3)
    text = key.to_str()
    assert "/" not in text and ObjectKey.from_str(text) == key


def test_salted_key_string_holds_only_the_salt_digest() -> None:
    key = ObjectKey("m", "00ff", cache_salt="tenant-a")
    text = key.to_str()
    assert "tenant-a" not in text and "tenant-a" not in repr(key)
    assert key.salt_digest in text and len(key.salt_digest) == 32
    assert ObjectKey("m", "00ff", cache_salt="tenant-b").to_str() != text
    assert ObjectKey("m", "00ff").to_str() == "m@0@@00ff", "the empty salt keeps the names of unsalted keys"
    with pytest.raises(ConfigError, match="digest"):
        ObjectKey.from_str(text)


def test_object_key_normalizes_hashes() -> None:
    assert ObjectKey("m", 255).chunk_hash == "ff"
    assert ObjectKey("m", b"\x01\x02").chunk_hash == "0102"
    assert ObjectKey("m", -1).chunk_hash == "f" * 16  # signed 64-bit engine hashes map to their unsigned form


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model_name": "", "chunk_hash": "ab"},
        {"model_name": "a b", "chunk_hash": "ab"},
        {"model_name": "../etc", "chunk_hash": "ab"},
        {"model_name": "/abs", "chunk_hash": "ab"},
        {"model_name": "m@x", "chunk_hash": "ab"},
        {"model_name": "m", "chunk_hash": "XYZ"},
        {"model_name": "m", "chunk_hash": ""},
        {"model_name": "m", "chunk_hash": "ab", "kv_rank": -1},
        {"model_name": "m", "chunk_hash": "ab", "kv_rank": True},
        {"model_name": "m", "chunk_hash": "ab", "cache_salt": b"bytes"},
    ],
)
def test_object_key_rejects_unsafe_fields(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as err:
        ObjectKey(**kwargs)
    field = next(k for k in ("model_name", "chunk_hash", "kv_rank", "cache_salt") if k in str(err.value))
    assert field  # the message names the field


def test_object_key_from_str_rejects_garbage() -> None:
    with pytest.raises(ConfigError):
        ObjectKey.from_str("no-separators")


def test_layout_desc() -> None:
    t = torch.zeros(2, 3, 4, 5, dtype=torch.bfloat16)
    layout = LayoutDesc.of(t, "2LTH")
    assert layout.shape == (2, 3, 4, 5) and layout.nbytes == 2 * 3 * 4 * 5 * 2
    assert layout.kv_format is KVFormat.KV_LAYER_TOKEN_HIDDEN
    assert LayoutDesc.from_json(layout.to_json()) == layout
    assert LayoutDesc.kv_chunk(32, 256, 1024).nbytes == 32 << 20
    with pytest.raises(ConfigError, match="kv_format"):
        LayoutDesc((3, 2, 2, 2), torch.bfloat16, KVFormat.KV_LAYER_TOKEN_HIDDEN)
    with pytest.raises(ConfigError, match="dtype"):
        LayoutDesc((1,), "complex")  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["m@²@@ab", "m@٣@@ab", "m@01@@ab", "m@@@ab", "m@1@@", "m@1@x@y@z", "@0@@ab"])
def test_a_key_string_of_another_shape_is_refused_with_a_config_error(text: str) -> None:
    """Unicode digits passed ``str.isdigit()`` and then made ``int()`` raise ValueError; a rank with a leading zero
    read back as another key's string. Every reader of key strings shares one parser now."""
    from kvtier.key_names import parse_key_str
    from kvtier.l2.adapters.base import KeyMatch
    from kvtier.tenants import tenant_of_key_str

    fields = parse_key_str(text)
    if fields is None:
        with pytest.raises(ConfigError):
            ObjectKey.from_str(text)
        assert not KeyMatch().matches(text)
        assert tenant_of_key_str(text) == ("", "")
    else:  # the shape holds ("m@1@@": an empty hash); the fields themselves are the key's to check
        with pytest.raises(ConfigError):
            ObjectKey.from_str(text)


@given(
    model=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}(/[A-Za-z0-9][A-Za-z0-9_-]{0,20})?", fullmatch=True),
    chunk_hash=st.from_regex(r"[0-9a-f]{1,64}", fullmatch=True),
    rank=st.integers(0, (1 << 16) - 1),
    salt=st.text(max_size=20),
)
def test_every_key_string_parses_back_to_its_fields(model: str, chunk_hash: str, rank: int, salt: str) -> None:
    from kvtier.key_names import parse_key_str
    from kvtier.l2.adapters.base import KeyMatch
    from kvtier.tenants import tenant_of_key_str

    key = ObjectKey(model, chunk_hash, rank, salt)
    fields = parse_key_str(key.to_str())
    assert fields is not None
    assert (fields.model_name, fields.kv_rank, fields.salt_digest, fields.chunk_hash) == (
        model,
        rank,
        key.salt_digest,
        chunk_hash,
    )
    assert KeyMatch(model, key.salt_digest).matches(key.to_str())
    assert not KeyMatch(model + "x").matches(key.to_str())
    assert tenant_of_key_str(key.to_str()) == (key.salt_digest, model)
    if not salt:
        assert ObjectKey.from_str(key.to_str()) == key


@given(st.text(alphabet=st.sampled_from("ab@0123456789²%/_-"), max_size=30))
def test_any_string_parses_or_is_refused_never_raises(text: str) -> None:
    from kvtier.key_names import parse_key_str

    fields = parse_key_str(text)
    try:
        key = ObjectKey.from_str(text)
    except ConfigError:
        return
    assert fields is not None and key.to_str() == text
