"""Core value types: the layout of a KV tensor and the key of a stored object.

Both are immutable and validated at construction, so every layer below can trust them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote, unquote

import torch

from kvtier.errors import ConfigError

# Frozen on-disk codes: a record stores the dtype as one byte. Never renumber; only append.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
    torch.uint8: 6,
    torch.int8: 7,
    torch.int16: 8,
    torch.int32: 9,
    torch.int64: 10,
    torch.float64: 11,
    torch.bool: 12,
}
DTYPES_BY_CODE: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}

# Names accepted in configs and on the command line ("bf16", "bfloat16", "torch.bfloat16").
_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float": torch.float32,
    "fp8": torch.float8_e4m3fn,
}


def parse_dtype(name: str | torch.dtype, field: str = "dtype") -> torch.dtype:
    """Turn a dtype name (``"bf16"``, ``"bfloat16"``, ``"torch.float8_e4m3fn"``) into a supported dtype."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = str(name).removeprefix("torch.")
        found = _DTYPE_ALIASES.get(key) or getattr(torch, key, None)
        if not isinstance(found, torch.dtype):
            raise ConfigError(f"{field}: unknown dtype {name!r}; expected one of {sorted(dtype_names())}")
        dtype = found
    if dtype not in DTYPE_CODES:
        raise ConfigError(f"{field}: dtype {dtype} is not supported; expected one of {sorted(dtype_names())}")
    return dtype


def dtype_names() -> list[str]:
    """The canonical names of the supported dtypes."""
    return [str(d).removeprefix("torch.") for d in DTYPE_CODES]


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical short name of a dtype (``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


class KVFormat(StrEnum):
    """How the axes of a KV tensor are laid out.

    ``KV_LAYER_TOKEN_HIDDEN`` is the chunk layout kvtier is built for: ``[2 (K, V), layers, tokens, hidden]``
    with ``hidden = kv_heads * head_dim``. Quantizers use it to scale per channel (amax over tokens).
    ``FLAT`` makes no claim about the axes.
    """

    FLAT = "flat"
    KV_LAYER_TOKEN_HIDDEN = "2LTH"


@dataclass(frozen=True, slots=True)
class LayoutDesc:
    """Shape, dtype and KV format of a tensor: all a serializer needs to bound its output size."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    kv_format: KVFormat = KVFormat.FLAT

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if any(s < 0 for s in shape):
            raise ConfigError(f"shape: dimensions must be >= 0, got {shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        fmt = KVFormat(self.kv_format)
        if fmt is KVFormat.KV_LAYER_TOKEN_HIDDEN and (len(shape) != 4 or shape[0] != 2):
            raise ConfigError(f"kv_format 2LTH needs a shape [2, layers, tokens, hidden], got {list(shape)}")
        object.__setattr__(self, "kv_format", fmt)

    @classmethod
    def of(cls, tensor: torch.Tensor, kv_format: KVFormat | str = KVFormat.FLAT) -> LayoutDesc:
        """Describe ``tensor``."""
        return cls(tuple(tensor.shape), tensor.dtype, KVFormat(kv_format))

    @classmethod
    def kv_chunk(cls, layers: int, tokens: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> LayoutDesc:
        """The layout of one chunk ``[2, layers, tokens, hidden]``."""
        return cls((2, layers, tokens, hidden), dtype, KVFormat.KV_LAYER_TOKEN_HIDDEN)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": dtype_name(self.dtype), "kv_format": self.kv_format.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayoutDesc:
        return cls(tuple(data["shape"]), parse_dtype(data["dtype"]), KVFormat(data.get("kv_format", "flat")))


# A model name may contain "/" (org/model), a salt may not; neither may contain "%" or "@" (used by to_str),
# whitespace or control characters, so every key maps to a safe file name and Redis key.
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9._\-+:/]{1,200}")
_SALT_RE = re.compile(r"[A-Za-z0-9._\-+:=]{0,128}")
_HASH_RE = re.compile(r"[0-9a-f]{1,128}")


@dataclass(frozen=True, slots=True, order=True)
class ObjectKey:
    """The key of one stored chunk: ``(model_name, chunk_hash, kv_rank, cache_salt)``.

    ``chunk_hash`` is a lower-case hex string (an ``int`` or ``bytes`` is converted). ``cache_salt`` separates
    tenants: two salts never see each other's data. Every field is checked so that :meth:`to_str` is safe
    as a file name component and as a Redis key.
    """

    model_name: str
    chunk_hash: str
    kv_rank: int = 0
    cache_salt: str = ""

    def __post_init__(self) -> None:
        h: Any = self.chunk_hash
        if isinstance(h, bytes | bytearray):
            h = bytes(h).hex()
        elif isinstance(h, int) and not isinstance(h, bool):
            if h < 0:  # engines (vLLM) use signed 64-bit hashes; keep them distinct from positive ones
                h = (1 << 64) + h if h >= -(1 << 63) else h
                if h < 0:
                    raise ConfigError(f"chunk_hash: integer {self.chunk_hash} is below -2**63")
            h = format(h, "x")
        if not isinstance(h, str) or not _HASH_RE.fullmatch(h):
            raise ConfigError(f"chunk_hash: expected 1-128 lower-case hex digits, int or bytes, got {h!r}")
        object.__setattr__(self, "chunk_hash", h)
        if not isinstance(self.model_name, str) or not _MODEL_NAME_RE.fullmatch(self.model_name):
            raise ConfigError(
                f"model_name: expected 1-200 characters of A-Z a-z 0-9 . _ - + : /, got {self.model_name!r}"
            )
        if ".." in self.model_name.split("/") or self.model_name.startswith("/") or "//" in self.model_name:
            raise ConfigError(f"model_name: {self.model_name!r} has an empty or '..' path segment")
        if isinstance(self.kv_rank, bool) or not isinstance(self.kv_rank, int) or not 0 <= self.kv_rank < 1 << 16:
            raise ConfigError(f"kv_rank: expected an integer in [0, 65535], got {self.kv_rank!r}")
        if not isinstance(self.cache_salt, str) or not _SALT_RE.fullmatch(self.cache_salt):
            raise ConfigError(
                f"cache_salt: expected 0-128 characters of A-Z a-z 0-9 . _ - + : =, got {self.cache_salt!r}"
            )

    def to_str(self) -> str:
        """Canonical string ``model@rank@salt@hash``, safe as a file name and a Redis key; see :meth:`from_str`."""
        return f"{quote(self.model_name, safe='')}@{self.kv_rank}@{self.cache_salt}@{self.chunk_hash}"

    @classmethod
    def from_str(cls, text: str) -> ObjectKey:
        """Parse :meth:`to_str` output; raises :class:`ConfigError` on anything else."""
        parts = text.split("@")
        if len(parts) != 4 or not parts[1].isdigit():
            raise ConfigError(f"object key: expected 'model@rank@salt@hash', got {text!r}")
        return cls(unquote(parts[0]), parts[3], int(parts[1]), parts[2])
