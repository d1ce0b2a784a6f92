"""kvtier.integrations.vllm.layout and .config without vLLM: the probe against writers with known layouts, the
strided and the gathered copy paths, the writer faults the probe must refuse, and the names put into keys."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import ConfigError
from kvtier.integrations.vllm.config import ConnectorConfig, key_model_name, key_salt
from kvtier.integrations.vllm.layout import BlockLayout, LayoutError
from kvtier.types import ObjectKey

T, H, D = 32, 3, 16


def writer_from(offsets: torch.Tensor) -> object:
    """A cache writer that puts (kv, t, h, d) of each slot's block at ``offsets`` [2, T, H, D] in that block."""

    def write(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        nb, _, bs, _ = cache.shape
        flat = cache.view(nb, -1)
        for i, slot in enumerate(slots.tolist()):
            block, t = divmod(slot, bs)
            flat[block, offsets[0, t].reshape(-1)] = key[i].reshape(-1)
            flat[block, offsets[1, t].reshape(-1)] = value[i].reshape(-1)

    return write


def naive() -> torch.Tensor:
    return BlockLayout.contiguous(T, H, D).offsets


def transposed_k() -> torch.Tensor:
    """vLLM's ``vec`` ISA: per head K as [D, T], then V as [T, D]."""
    t = torch.arange(T).view(1, T, 1, 1)
    h = torch.arange(H).view(1, 1, H, 1)
    d = torch.arange(D).view(1, 1, 1, D)
    k = h * (2 * T * D) + d * T + t
    v = h * (2 * T * D) + T * D + t * D + d
    return torch.cat([k, v])


def vnni_k() -> torch.Tensor:
    """``amx``-like: per head K packed as [D/2, T, 2]."""
    t = torch.arange(T).view(1, T, 1, 1)
    h = torch.arange(H).view(1, 1, H, 1)
    d = torch.arange(D).view(1, 1, 1, D)
    k = h * (2 * T * D) + (d // 2) * (2 * T) + t * 2 + d % 2
    v = h * (2 * T * D) + T * D + t * D + d
    return torch.cat([k, v])


def scrambled() -> torch.Tensor:
    """A layout that is no strided view: a fixed random permutation of the block."""
    perm = torch.randperm(2 * T * H * D, generator=torch.Generator().manual_seed(0))
    return perm.view(2, T, H, D)


@pytest.mark.parametrize("make", [naive, transposed_k, vnni_k, scrambled])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_probe_learns_the_layout_and_copies_are_exact(make: object, dtype: torch.dtype) -> None:
    offsets = make()  # type: ignore[operator]
    layout = BlockLayout.probe(writer_from(offsets), T, H, D, dtype)  # type: ignore[arg-type]
    assert torch.equal(layout.offsets, offsets)
    assert (layout.strided is None) == (make is scrambled)
    cache = torch.zeros((6, H, T, 2 * D), dtype=dtype)
    k, v = torch.randn(3 * T, H, D).to(dtype), torch.randn(3 * T, H, D).to(dtype)
    blocks = [4, 1, 2]
    slots = torch.cat([torch.arange(T) + b * T for b in blocks])
    writer_from(offsets)(k, v, cache, slots)  # type: ignore[operator]
    out = torch.empty((3, T, H, D), dtype=dtype)
    for kv, want in ((0, k), (1, v)):
        layout.gather(cache, blocks, out, kv)
        assert torch.equal(out.reshape(-1, H, D), want)
    again = torch.zeros_like(cache)
    layout.scatter(again, blocks, k.view(3, T, H, D), 0)
    layout.scatter(again, blocks, v.view(3, T, H, D), 1)
    assert torch.equal(again, cache)


def test_the_layout_trap_naive_slicing_is_wrong_for_transposed_k() -> None:
    """What a connector assuming the naive order would store: V right, K wrong, while vLLM to vLLM round-trips."""
    cache = torch.zeros((2, H, T, 2 * D))
    k, v = torch.randn(T, H, D), torch.randn(T, H, D)
    writer_from(transposed_k())(k, v, cache, torch.arange(T) + T)  # type: ignore[operator]
    out = torch.empty((1, T, H, D))
    BlockLayout.contiguous(T, H, D).gather(cache, [1], out, 0)
    assert not torch.equal(out[0], k)
    BlockLayout.contiguous(T, H, D).gather(cache, [1], out, 1)
    assert torch.equal(out[0], v)


def test_probe_refuses_a_writer_it_cannot_trust() -> None:
    good = writer_from(naive())

    def skips_one(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        good(key, value, cache, slots)  # type: ignore[operator]
        cache[1, 0, 0, 0] = 0

    def touches_block_0(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        good(key, value, cache, slots)  # type: ignore[operator]
        cache[0, 0, 0, 0] = 1

    def lossy(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        good(key.clamp(max=200), value, cache, slots)  # type: ignore[operator]

    def duplicates(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        good(key, key, cache, slots)  # type: ignore[operator]

    for writer, match in ((skips_one, "unwritten"), (touches_block_0, "not given"), (lossy, "permutation"),
                          (duplicates, "permutation")):  # fmt: skip
        with pytest.raises(LayoutError, match=match):
            BlockLayout.probe(writer, T, H, D, torch.bfloat16)
    with pytest.raises(LayoutError, match=r"exactly|permutation"):  # an fp8 cache keeps no exact index
        BlockLayout.probe(good, T, H, D, torch.float8_e4m3fn)  # type: ignore[arg-type]


def test_check_cache_refuses_other_shapes_and_strides() -> None:
    layout = BlockLayout.contiguous(T, H, D)
    layout.check_cache(torch.zeros((4, H, T, 2 * D)), "l0")
    with pytest.raises(LayoutError, match="shape"):
        layout.check_cache(torch.zeros((4, H + 1, T, 2 * D)), "l0")
    with pytest.raises(LayoutError, match="dense"):
        layout.check_cache(torch.zeros((4, T, H, 2 * D)).transpose(1, 2), "l0")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_cache_salt_is_kvtiers_salt_as_is(salt: str) -> None:
    # The same string: a store filled through vLLM serves the HF integration given the same salt, and back.
    assert key_salt(salt) == salt
    key = ObjectKey("m", "0", 0, key_salt(salt))
    assert key.cache_salt == salt and key.to_str().split("@")[2] == key.salt_digest
    assert key_salt(None) == ""


def test_model_names() -> None:
    assert key_model_name("smollm2-135m") == "smollm2-135m"
    a, b = key_model_name("/models/x y"), key_model_name("/models/x_y")
    assert a != b and a.startswith("models/x_y-")
    ObjectKey(key_model_name("/../.."), "0")
    ObjectKey(key_model_name("a" * 500), "0")


def test_extra_config_is_checked_at_start() -> None:
    with pytest.raises(ConfigError, match=r"'server'.*or an embedded Store"):
        ConnectorConfig.from_extra({})
    with pytest.raises(ConfigError, match="server"):
        ConnectorConfig.from_extra({"server": "localhost:5555"})
    with pytest.raises(ConfigError, match="either 'server' or Store keys"):
        ConnectorConfig.from_extra({"server": "tcp://127.0.0.1:5555", "l1_size_gb": 1})
    with pytest.raises(ConfigError, match="chunk_sise"):
        ConnectorConfig.from_extra({"l1_size_gb": 1, "chunk_sise": 128})
    with pytest.raises(ConfigError, match="l1_size_gb"):
        ConnectorConfig.from_extra({"l1_size_gb": -1})
    with pytest.raises(ConfigError, match="timeout_s"):
        ConnectorConfig.from_extra({"server": "tcp://127.0.0.1:5555", "timeout_s": 0})
    cfg = ConnectorConfig.from_extra({"l1_size_gb": 0.5, "chunk_size": 256, "model_name": "m"})
    assert cfg.store == {
        "l1_size_gb": 0.5,
        "eviction_policy": "LRU",
        "l2_adapters": [],
        "chunk_size": 256,
        "l1_backing": "anonymous",
    }
    assert cfg.server is None and cfg.model_name == "m"
