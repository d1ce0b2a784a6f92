"""kvtier: a tiered KV-cache store for LLM inference.

L1 is a bounded memory pool with eviction; L2 adapters (local disk, Redis/Valkey) sit behind it, each with an
optional serde pipeline (fp8, lz4/zstd, AES-GCM, checksums, or a user's own registered transform).
"""

from kvtier.client import Client
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
from kvtier.storage.store import Store
from kvtier.types import KVFormat, LayoutDesc, ObjectKey

__version__ = "0.1.0"

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
