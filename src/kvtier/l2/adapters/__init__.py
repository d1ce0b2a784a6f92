"""L2 adapters: the contract (:mod:`.base`), the registry and the built-in backends."""

from kvtier.l2.adapters.base import MISS, PURGE_BATCH, KeyMatch, L2Adapter
from kvtier.l2.adapters.faulty import FaultyAdapter, faulty_factory
from kvtier.l2.adapters.fs import FSAdapter, fs_factory
from kvtier.l2.adapters.memory import MemoryAdapter, memory_factory
from kvtier.l2.adapters.object_store import ObjectStoreAdapter, object_store_factory
from kvtier.l2.adapters.redis import RedisAdapter, redis_factory
from kvtier.l2.adapters.registry import (
    create_backend,
    create_l2_adapter,
    register_l2_adapter,
    registered_l2_adapters,
    unregister_l2_adapter,
)

BUILTIN_ADAPTERS = {
    "fs": fs_factory,
    "memory": memory_factory,
    "faulty": faulty_factory,
    "redis": redis_factory,
    "object_store": object_store_factory,
}


def register_builtin_adapters() -> None:
    for name, factory in BUILTIN_ADAPTERS.items():
        if name not in registered_l2_adapters():
            register_l2_adapter(name, factory)


register_builtin_adapters()

__all__ = [
    "MISS",
    "PURGE_BATCH",
    "KeyMatch",
    "FSAdapter",
    "FaultyAdapter",
    "L2Adapter",
    "MemoryAdapter",
    "ObjectStoreAdapter",
    "RedisAdapter",
    "create_backend",
    "create_l2_adapter",
    "register_l2_adapter",
    "registered_l2_adapters",
    "unregister_l2_adapter",
]
