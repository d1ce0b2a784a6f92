"""Token ids -> chunk keys: a rolling blake3 prefix hash per ``chunk_size`` tokens.

Chunk ``i``'s hash covers every token before its end: ``h_i = blake3(h_{i-1} || tokens of chunk i)`` with
``h_{-1}`` derived from the chunk size, so two prompts share a chunk key only if they share the whole prefix
up to it. Tokens are hashed as little-endian int64, so any vocabulary fits. A partial tail chunk gets no key:
its KV is not stored (it would be recomputed anyway, and a key would have to change as the prompt grows).
"""

from __future__ import annotations

from collections.abc import Sequence

import blake3
import numpy as np
import torch

from kvtier.errors import ConfigError
from kvtier.types import ObjectKey

HASH_BYTES = 16  # 128-bit chunk hashes: collisions are out of reach, keys stay short


def chunk_hashes(token_ids: Sequence[int] | torch.Tensor | np.ndarray, chunk_size: int) -> list[str]:
    """Hex prefix hashes of the full chunks of ``token_ids``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise ConfigError(f"token_ids: expected a 1-D sequence of integers, got {tokens.dtype} {tokens.shape}")
    data = tokens.astype("<i8", copy=False).tobytes()
    prev = blake3.blake3(f"kvtier-chunk-v1:{chunk_size}".encode()).digest(length=HASH_BYTES)
    out = []
    step = 8 * chunk_size
    for start in range(0, len(tokens) // chunk_size * step, step):
        h = blake3.blake3(prev)
        h.update(data[start : start + step])
        prev = h.digest(length=HASH_BYTES)
        out.append(prev.hex())
    return out


def keys_for_tokens(
    model_name: str,
    token_ids: Sequence[int] | torch.Tensor | np.ndarray,
    chunk_size: int,
    cache_salt: str = "",
    kv_rank: int = 0,
) -> list[ObjectKey]:
    """One :class:`ObjectKey` per full chunk of ``token_ids``."""
    return [ObjectKey(model_name, h, kv_rank, cache_salt) for h in chunk_hashes(token_ids, chunk_size)]
