"""Damaged payloads through every built-in stage and chain: only IntegrityError / SerdeError, never another
exception, never an allocation sized by a damaged header; stages with a check always catch the damage."""

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.errors import IntegrityError, SerdeError
from kvtier.serde import LayoutDesc, RecordContext, create_serde_processor
from kvtier.testing.serde import kv_like

os.environ.setdefault("KVTIER_DAMAGE_TEST_KEY", "5a" * 16)
AES = {"type": "aesgcm", "key_env": "KVTIER_DAMAGE_TEST_KEY"}
CONFIGS = {
    "raw": {"type": "raw"},
    "fp8": {"type": "fp8"},
    "fp8-none": {"type": "fp8", "scale": "none"},
    "zstd": {"type": "zstd", "level": 1, "shuffle": True},
    "lz4": {"type": "lz4", "shuffle": True},
    "checksum": {"type": "checksum"},
    "aesgcm": AES,
    "fp8+zstd": [{"type": "fp8"}, {"type": "zstd"}],
    "fp8+lz4+checksum": [{"type": "fp8"}, {"type": "lz4"}, {"type": "checksum"}],
    "zstd+aesgcm": [{"type": "zstd", "shuffle": True}, AES],
    "fp8+zstd+aesgcm": [{"type": "fp8"}, {"type": "zstd"}, AES],
}
#: every mutation of these must be detected: their last stage authenticates or checksums the bytes
CHECKED = {"checksum", "aesgcm", "fp8+lz4+checksum", "zstd+aesgcm", "fp8+zstd+aesgcm"}
PROCESSORS = {name: create_serde_processor(config) for name, config in CONFIGS.items()}
SRC = kv_like((2, 2, 8, 32), torch.bfloat16, seed=9) * 3
CTX = RecordContext("tenant", b"header")
PAYLOADS = {}
for _name, _processor in PROCESSORS.items():
    _dst = torch.empty(_processor.estimate_serialized_size(LayoutDesc.of(SRC)), dtype=torch.uint8)
    (_n,) = _processor.serialize_batch([SRC], [_dst], [CTX])
    PAYLOADS[_name] = _dst[:_n].clone()


@pytest.fixture(scope="module", autouse=True)
def _close_processors() -> Iterator[None]:
    yield
    for processor in PROCESSORS.values():
        processor.close()


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 64), st.integers(0, 255)),
    st.tuples(st.just("header"), st.integers(0, 31), st.integers(1, 255)),  # bytes where framings keep sizes
)


def _mutate(payload: torch.Tensor, kind: str, a: int, b: int) -> torch.Tensor:
    data = payload.clone()
    n = data.numel()
    if kind == "flip":
        data[a % n] ^= 1 << b
        return data
    if kind == "truncate":
        return data[: a % n]
    if kind == "append":
        return torch.cat([data, torch.full((a,), b, dtype=torch.uint8)])
    data[a % n] ^= b
    return data


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(
    max_examples=int(os.environ.get("KVTIER_DAMAGE_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutation=mutations)
def test_damaged_payload_is_an_integrity_or_serde_error_never_another(name: str, mutation: tuple) -> None:
    processor = PROCESSORS[name]
    damaged = _mutate(PAYLOADS[name], *mutation)
    out = torch.empty_like(SRC)
    result = processor.submit_deserialize([damaged], [out], [CTX]).result()
    error = result.errors.get(0)
    if error is not None:
        assert isinstance(error, IntegrityError | SerdeError), repr(error)
    else:
        assert name not in CHECKED or torch.equal(damaged, PAYLOADS[name]), f"{name}: damage went unnoticed"


@pytest.mark.parametrize("name", ["fp8+zstd", "fp8+lz4+checksum"])
def test_a_damaged_size_field_allocates_nothing_big(name: str) -> None:
    """A chain's inner stage reads its decoded size from its own framing: a flipped high bit there must fail
    the item before any buffer of that size is allocated (it would be terabytes)."""
    processor = PROCESSORS[name]
    payload = PAYLOADS[name].clone()
    payload[8 + 5] ^= 0x40  # the u64 decoded size of the compress framing, a high byte
    result = processor.submit_deserialize([payload], [torch.empty_like(SRC)], [CTX]).result()
    assert isinstance(result.errors.get(0), IntegrityError), repr(result.errors.get(0))
