"""The Redis / Valkey adapter, in four parts: :mod:`.config` (URL and prefix checks), :mod:`.scripts` (the Lua
accounting), :mod:`.io` (zero-copy RESP on redis-py's socket) and :mod:`.adapter` (:class:`RedisAdapter`)."""

from __future__ import annotations

import importlib.util
from typing import Any

from kvtier.config import ConfigReader
from kvtier.errors import ConfigError, MissingDependencyError
from kvtier.l2.adapters.redis.adapter import RedisAdapter
from kvtier.l2.adapters.redis.config import check_key_prefix, check_url, redact_url
from kvtier.tenants import refuse_adapter_quotas

GiB = 1 << 30


def redis_factory(config: dict[str, Any], where: str) -> RedisAdapter:
    # redis-py is the `redis` extra: a config that names this adapter without it fails at start, saying what to add.
    if importlib.util.find_spec("redis") is None:
        raise MissingDependencyError("the redis L2 adapter", "redis", "redis")
    reader = ConfigReader(config, where)
    refuse_adapter_quotas(
        reader, where, "Redis manages its own memory (maxmemory), so kvtier cannot hold a tenant to a quota there"
    )
    url = reader.string("url")
    cluster = reader.boolean("cluster", False)
    key_prefix = reader.string("key_prefix", "kvtier")
    gb = reader.number("max_capacity_gb", None, min=0.0)
    timeout_s = reader.number("timeout_s", 10.0, min=0.001)
    connect_timeout_s = reader.number("connect_timeout_s", 5.0, min=0.001)
    max_connections = reader.integer("max_connections", 64, min=1)
    reader.finish()
    check_url(url, cluster, where)
    check_key_prefix(key_prefix, where)
    if cluster and gb is not None:
        raise ConfigError(
            f"{where}.max_capacity_gb: not supported with cluster: true "
            "(the accounting script cannot reach records on other slots); bound each node with maxmemory "
            "and allkeys-lru"
        )
    if gb is not None and gb <= 0:
        raise ConfigError(f"{where}.max_capacity_gb: expected a value > 0, got {gb!r}")
    return RedisAdapter(
        url,
        cluster=cluster,
        key_prefix=key_prefix,
        capacity_bytes=None if gb is None else max(1, int(gb * GiB)),
        timeout_s=timeout_s,
        connect_timeout_s=connect_timeout_s,
        max_connections=max_connections,
    )


__all__ = ["RedisAdapter", "check_key_prefix", "check_url", "redact_url", "redis_factory"]
