"""Where vLLM's paged KV cache keeps each token's K and V, learnt from vLLM's own cache-writing op.

vLLM's CPU paged cache is ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` per layer, but the order inside a
block depends on the attention ISA: with ``vec`` K is stored transposed (``[head_dim, block_size]``), with ``amx``
it is packed in pairs of channels, and other ISAs may differ again. A connector that assumes an order still
round-trips vLLM to vLLM exactly while storing wrong K for every other engine, so nothing is assumed here:
:meth:`BlockLayout.probe` writes known values through the engine's writer (the op the attention layer itself
calls) into a two-block scratch cache and reads back where every ``(kv, token, head, channel)`` landed.

The result is an offset map ``[2, block_size, kv_heads, head_dim]`` into one block. When that map is a strided
view (every ISA seen so far: a transposition or a split of a power-of-two axis), copies between the paged cache
and kvtier's chunks are plain strided copies; otherwise they fall back to a gather / scatter through the map.

kvtier's chunk layout (shared with :mod:`kvtier.integrations.transformers`) is ``[2 (K, V), layers, tokens,
kv_heads * head_dim]``: token-major, heads then channels, in the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvtier.errors import ConfigError

# writer(key, value, cache, slot_mapping): write ``key`` / ``value`` [tokens, kv_heads, head_dim] into ``cache``
# [num_blocks, kv_heads, block_size, 2 * head_dim] at the slots (block * block_size + offset) given, exactly as
# the engine's attention layer does.
CacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

# Digits of the probe: values 1..256 are exact in every float dtype a KV cache uses (bf16 keeps 8 bits).
_BASE = 256


class LayoutError(ConfigError):
    """The engine's cache layout could not be determined or is not one kvtier can copy exactly."""


@dataclass(frozen=True)
class _Strided:
    """One half (K or V) of a block as a strided view: ``size`` / ``stride`` over a factored ``[T, H, D]``."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _factor(n: int) -> list[int]:
    """An axis of a power-of-two size splits into bits (so that a tiled layout is still a strided view)."""
    if n > 1 and n & (n - 1) == 0:
        return [2] * int(math.log2(n))
    return [n]


def _as_strided(offsets: torch.Tensor) -> _Strided | None:
    """``offsets`` [T, H, D] (element offsets) as one strided view, or None when no such view exists."""
    dims = [f for n in offsets.shape for f in _factor(int(n))]
    flat = offsets.reshape(dims)
    base = int(flat.reshape(-1)[0])
    strides = []
    for axis, size in enumerate(dims):
        idx = [0] * len(dims)
        idx[axis] = 1 if size > 1 else 0
        strides.append(int(flat[tuple(idx)]) - base if size > 1 else 0)
    predicted = torch.full(flat.shape, base, dtype=torch.int64)
    for axis, (size, stride) in enumerate(zip(dims, strides, strict=True)):
        shape = [1] * len(dims)
        shape[axis] = size
        predicted += torch.arange(size, dtype=torch.int64).view(shape) * stride
    if not torch.equal(predicted, flat) or min(strides, default=0) < 0:
        return None
    # Merge neighbours that are contiguous with each other, so most copies see few dimensions.
    merged_size: list[int] = []
    merged_stride: list[int] = []
    for size, stride in zip(dims, strides, strict=True):
        if merged_size and merged_stride[-1] == stride * size:
            merged_size[-1] *= size
            merged_stride[-1] = stride
        else:
            merged_size.append(size)
            merged_stride.append(stride)
    return _Strided(tuple(merged_size), tuple(merged_stride), base)


class BlockLayout:
    """Token order inside one block of a layer's paged cache, for ``kv_heads`` x ``head_dim`` in ``block_size``.

    Build it with :meth:`probe` (from the engine's own writer) or :meth:`from_offsets`. ``gather`` and ``scatter``
    move whole blocks between a layer's cache and tensors ``[n, block_size, kv_heads, head_dim]``.
    """

    def __init__(self, offsets: torch.Tensor, block_size: int, kv_heads: int, head_dim: int) -> None:
        expected = (2, block_size, kv_heads, head_dim)
        if tuple(offsets.shape) != expected:
            raise LayoutError(f"offset map of shape {list(offsets.shape)}, expected {list(expected)}")
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.block_elems = 2 * block_size * kv_heads * head_dim
        self.offsets = offsets.to(torch.int64).contiguous()
        halves = [_as_strided(self.offsets[kv]) for kv in (0, 1)]
        self.strided: tuple[_Strided, _Strided] | None = (
            (halves[0], halves[1]) if halves[0] is not None and halves[1] is not None else None
        )

    @classmethod
    def probe(
        cls, writer: CacheWriter, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> BlockLayout:
        """Learn the layout by writing known values with ``writer`` into a two-block scratch cache (block 1).

        Each probe writes one base-256 digit of every element's canonical index (+1, so 0 means "not written");
        two or three probes cover any realistic block. Raises :class:`LayoutError` when the writer leaves an
        element unwritten, writes one twice, touches block 0, or loses a value (an fp8 cache).
        """
        n = 2 * block_size * kv_heads * head_dim
        digits = max(1, math.ceil(math.log(n, _BASE)))
        index = torch.arange(n, dtype=torch.int64)
        decoded = torch.zeros(n, dtype=torch.int64)
        slots = torch.arange(block_size, dtype=torch.int64) + block_size
        for digit in range(digits):
            values = (index // _BASE**digit % _BASE + 1).view(2, block_size, kv_heads, head_dim)
            cache = torch.zeros((2, kv_heads, block_size, 2 * head_dim), dtype=dtype)
            writer(values[0].to(dtype), values[1].to(dtype), cache, slots)
            if bool(cache[0].ne(0).any()):
                raise LayoutError("the cache writer touched a block it was not given")
            got = cache[1].reshape(-1).to(torch.float64)
            if bool(got.eq(0).any()):
                raise LayoutError("the cache writer left elements of the block unwritten")
            if bool(got.ne(got.round()).any()) or bool((got > _BASE).any()):
                raise LayoutError(
                    f"the cache writer does not keep values exactly in {dtype} (a quantized KV cache?): "
                    "kvtier needs the model's dtype in the paged cache"
                )
            decoded += (got.to(torch.int64) - 1) * _BASE**digit
        if not torch.equal(torch.sort(decoded).values, index):
            raise LayoutError("the cache writer's layout is not a permutation of one block's elements")
        offsets = torch.empty(n, dtype=torch.int64)
        offsets[decoded] = torch.arange(n, dtype=torch.int64)
        return cls(offsets.view(2, block_size, kv_heads, head_dim), block_size, kv_heads, head_dim)

    @classmethod
    def contiguous(cls, block_size: int, kv_heads: int, head_dim: int) -> BlockLayout:
        """The naive order (per head: K as ``[block_size, head_dim]`` then V): for tests and comparisons."""
        t = torch.arange(block_size).view(1, block_size, 1, 1)
        h = torch.arange(kv_heads).view(1, 1, kv_heads, 1)
        d = torch.arange(head_dim).view(1, 1, 1, head_dim)
        kv = torch.arange(2).view(2, 1, 1, 1)
        offsets = h * (2 * block_size * head_dim) + kv * (block_size * head_dim) + t * head_dim + d
        return cls(offsets, block_size, kv_heads, head_dim)

    # -- copies ---------------------------------------------------------------------------------------------
    def check_cache(self, cache: torch.Tensor, name: str) -> None:
        """``cache`` must be one layer's ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, dense per block."""
        shape = (self.kv_heads, self.block_size, 2 * self.head_dim)
        if cache.dim() != 4 or tuple(cache.shape[1:]) != shape:
            raise LayoutError(f"{name}: paged cache of shape {list(cache.shape)}, expected [num_blocks, *{shape}]")
        dense = (self.block_size * 2 * self.head_dim, 2 * self.head_dim, 1)
        if tuple(cache.stride()[1:]) != dense:
            raise LayoutError(f"{name}: paged cache strides {cache.stride()} are not dense within a block")

    def _view(self, cache: torch.Tensor, kv: int) -> torch.Tensor:
        s = self.strided[kv]  # type: ignore[index]
        return torch.as_strided(
            cache, (cache.shape[0], *s.size), (cache.stride(0), *s.stride), cache.storage_offset() + s.offset
        )

    def gather(self, cache: torch.Tensor, blocks: Sequence[int], out: torch.Tensor, kv: int) -> None:
        """Copy K (``kv`` 0) or V (1) of ``blocks`` of ``cache`` into ``out`` ``[len(blocks), T, H, D]``."""
        if self.strided is not None:
            s = self.strided[kv]
            view, dst = self._view(cache, kv), out.view(len(blocks), *s.size)
            for j, first, n in _runs(blocks):  # slices of consecutive blocks: plain strided copies, no gather
                dst[j : j + n].copy_(view[first : first + n])
            return
        idx = torch.as_tensor(list(blocks), dtype=torch.int64)
        flat = cache.view(cache.shape[0], self.block_elems)
        out.copy_(flat.index_select(0, idx)[:, self.offsets[kv].reshape(-1)].view(out.shape))

    def scatter(self, cache: torch.Tensor, blocks: Sequence[int], src: torch.Tensor, kv: int) -> None:
        """Write ``src`` ``[len(blocks), T, H, D]`` as K (``kv`` 0) or V (1) of ``blocks`` of ``cache``."""
        if self.strided is not None:
            s = self.strided[kv]
            view, rows = self._view(cache, kv), src.reshape(len(blocks), *s.size)
            for j, first, n in _runs(blocks):
                view[first : first + n].copy_(rows[j : j + n])
            return
        idx = torch.as_tensor(list(blocks), dtype=torch.int64)
        flat = cache.view(cache.shape[0], self.block_elems)
        rows = flat.index_select(0, idx)
        rows[:, self.offsets[kv].reshape(-1)] = src.reshape(len(blocks), -1).to(rows.dtype)
        flat.index_copy_(0, idx, rows)


def _runs(blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(position, first block, count)`` of each run of consecutive block ids (vLLM often allocates runs)."""
    runs: list[tuple[int, int, int]] = []
    for j, b in enumerate(blocks):
        if runs and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((j, int(b), 1))
    return runs
