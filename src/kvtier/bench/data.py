"""Test and benchmark tensors: synthetic KV chunks, with optional outlier channels, or real KV from a file."""

from __future__ import annotations

from pathlib import Path

import torch

#: the chunk the issues' targets are stated for: [2, 32 layers, 256 tokens, 1024 hidden] bf16 = 32 MiB
DEFAULT_CHUNK_SHAPE = (2, 32, 256, 1024)


def synthetic_kv(
    shape: tuple[int, ...] = DEFAULT_CHUNK_SHAPE,
    dtype: torch.dtype = torch.bfloat16,
    outlier_channels: int = 0,
    outlier_scale: float = 1000.0,
    seed: int = 0,
) -> torch.Tensor:
    """Gaussian KV (std 1); ``outlier_channels`` channels of the last axis scaled by ``outlier_scale``.

    Real K caches have a few channels whose magnitude is orders above the rest (e.g. Qwen2); an unscaled fp8
    cast clips them at 448, which is what the outlier option exercises.
    """
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(shape, generator=gen, dtype=torch.float32)
    if outlier_channels:
        hidden = shape[-1]
        picks = torch.randperm(hidden, generator=gen)[:outlier_channels]
        data[..., picks] *= outlier_scale
    return data.to(dtype).contiguous()


def load_kv_file(path: str | Path, key: str = "kv") -> torch.Tensor:
    """The tensor ``key`` of a safetensors file (e.g. ``shared/data/smollm2_kv_1024.safetensors``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if key not in tensors:
        raise SystemExit(f"--data: {path} has no tensor {key!r} (it has {sorted(tensors)})")
    return tensors[key].contiguous()
