"""Core value types: the layout of a KV tensor and the key of a stored object.

Both are immutable and validated at construction, so every layer below can trust them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import blake3
import torch

from kvtier.errors import ConfigError
from kvtier.key_names import key_str, parse_key_str

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


# A model name may contain "/" (org/model); neither it may contain "%" or "@" (used by to_str), whitespace or
# control characters, so every key maps to a safe file name and Redis key. A salt may be any string: only its
# digest is ever written.
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9._\-+:/]{1,200}")
_HASH_RE = re.compile(r"[0-9a-f]{1,128}")
_SALT_DIGEST_RE = re.compile(r"[0-9a-f]{32}")

# The key of the salt digest. A cache_salt is a tenant's secret (vLLM documents it as one), yet every kvtier server
# sharing an L2 store must derive the same record name from the same salt, with no shared secret to configure. So
# the digest is keyed with a fixed, public key: it separates this use of the salt from any other (the same salt
# hashed elsewhere gives unrelated values) and, being blake3, reveals nothing of the salt beyond what guessing it
# whole reveals. Its secrecy rests on the salt's entropy, as vLLM's own use of the salt does: an engine's salt is
# a random token, out of reach of guessing; a guessable salt ("alice") is guessable from its digest too.
# Changing this key renames every salted record (old ones become unreachable and age out): never change it.
SALT_DIGEST_KEY = blake3.blake3(b"kvtier cache_salt digest v1").digest()


def salt_digest(cache_salt: str) -> str:
    """The keyed digest of a salt that names its records (32 hex digits); the empty salt stays empty."""
    if not cache_salt:
        return ""
    data = cache_salt.encode("utf-8", "surrogatepass")
    return blake3.blake3(data, key=SALT_DIGEST_KEY).hexdigest(length=16)


@dataclass(frozen=True, slots=True, order=True)
class ObjectKey:
    """The key of one stored chunk: ``(model_name, chunk_hash, kv_rank, cache_salt)``.

    ``chunk_hash`` is a lower-case hex string (an ``int`` or ``bytes`` is converted). ``cache_salt`` separates
    tenants: two salts never see each other's data. It may be any string and is a secret: it is kept in memory
    (an authenticated serde derives the tenant's key from it) and never written, logged or counted; records,
    file and object names, Redis keys, stats and events carry only :attr:`salt_digest`. ``repr()`` hides it.
    """

    model_name: str
    chunk_hash: str
    kv_rank: int = 0
    cache_salt: str = field(default="", repr=False)
    _digest: str = field(default="", init=False, repr=False, compare=False)

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
        if not isinstance(self.cache_salt, str):  # never echo the value: it is a secret
            raise ConfigError(f"cache_salt: expected a string, got {type(self.cache_salt).__name__}")
        object.__setattr__(self, "_digest", salt_digest(self.cache_salt))

    @property
    def salt_digest(self) -> str:
        """The keyed digest of :attr:`cache_salt` (``""`` for the empty salt): all of the salt that is written."""
        return self._digest

    def to_str(self) -> str:
        """Canonical string ``model@rank@saltdigest@hash``, safe as a file name and a Redis key; it holds the
        salt's keyed digest, never the salt (see :meth:`from_str`)."""
        return key_str(self.model_name, self.kv_rank, self._digest, self.chunk_hash)

    @classmethod
    def from_str(cls, text: str) -> ObjectKey:
        """Parse :meth:`to_str` output of a key without salt; raises :class:`ConfigError` on anything else.

        A salted key cannot be rebuilt from its string: the string holds only the salt's digest.
        """
        fields = parse_key_str(text)
        if fields is None:
            raise ConfigError(f"object key: expected 'model@rank@saltdigest@hash', got {text!r}")
        if fields.salt_digest:
            if not _SALT_DIGEST_RE.fullmatch(fields.salt_digest):
                raise ConfigError(f"object key: expected a salt digest of 32 hex digits in {text!r}")
            raise ConfigError("object key: a salted key holds only its salt's digest; it cannot be parsed back")
        return cls(fields.model_name, fields.chunk_hash, fields.kv_rank)
