"""kvtier: a tiered KV-cache store for LLM inference.

L1 is a bounded memory pool with eviction; L2 adapters (local disk, Redis/Valkey) sit behind it, each with an
optional serde pipeline (fp8, lz4/zstd, AES-GCM, checksums, or a user's own registered transform).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvtier.errors import (
    BatchError,
    CapacityError,
    ConfigError,
    ForeignRecordError,
    IntegrityError,
    KVTierError,
    L2Error,
    MissingDependencyError,
    NotFoundError,
    SerdeError,
)

if TYPE_CHECKING:
    from kvtier.client import Client
    from kvtier.storage.store import Store
    from kvtier.types import KVFormat, LayoutDesc, ObjectKey

__version__ = "0.1.0"

# These pull in torch (seconds to import): loaded on first use, so that ``kvtier --help``, ``--version`` and a
# configuration error of ``kvtier server`` answer at once.
_LAZY = {
    "Client": "kvtier.client",
    "Store": "kvtier.storage.store",
    "KVFormat": "kvtier.types",
    "LayoutDesc": "kvtier.types",
    "ObjectKey": "kvtier.types",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BatchError",
    "CapacityError",
    "Client",
    "ConfigError",
    "ForeignRecordError",
    "IntegrityError",
    "KVFormat",
    "KVTierError",
    "L2Error",
    "LayoutDesc",
    "MissingDependencyError",
    "NotFoundError",
    "ObjectKey",
    "SerdeError",
    "Store",
    "__version__",
]
