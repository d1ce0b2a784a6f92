"""The connector's configuration (``kv_connector_extra_config``) and the names it puts into kvtier keys.

Pure Python, importable without vLLM: the checks run at start-up, each error a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

import blake3

from kvtier.config import canonical_json
from kvtier.errors import ConfigError
from kvtier.types import ObjectKey

# Keys of kv_connector_extra_config that belong to the connector; every other key is a Store key (the same keys as
# `kvtier server`'s config file) and is checked by the server's config reader.
CONNECTOR_KEYS = ("server", "model_name", "timeout_s")


@dataclass(frozen=True)
class ConnectorConfig:
    """Either ``server`` (a ``kvtier server`` address) or ``store`` (``kvtier.Store`` keyword arguments)."""

    server: str | None
    store: dict[str, Any] | None
    model_name: str | None
    timeout_s: float

    @classmethod
    def from_extra(cls, extra: Any) -> ConnectorConfig:
        where = "kv_connector_extra_config"
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(extra).__name__}")
        server = extra.get("server")
        model_name = extra.get("model_name")
        timeout_s = extra.get("timeout_s", 30.0)
        if server is not None and (not isinstance(server, str) or "://" not in server):
            raise ConfigError(f"{where}.server: expected a kvtier server address 'tcp://HOST:PORT', got {server!r}")
        if model_name is not None and not isinstance(model_name, str):
            raise ConfigError(f"{where}.model_name: expected a string, got {model_name!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise ConfigError(f"{where}.timeout_s: expected seconds > 0, got {timeout_s!r}")
        rest = {k: v for k, v in extra.items() if k not in CONNECTOR_KEYS}
        store: dict[str, Any] | None = None
        if server is not None:
            if rest:
                raise ConfigError(
                    f"{where}: {sorted(rest)} configure an embedded Store, but 'server' is set: the server's own "
                    "configuration applies; give either 'server' or Store keys"
                )
        else:
            from kvtier.server.config import ServerConfig

            if "l1_size_gb" not in rest:
                raise ConfigError(
                    f"{where}: expected 'server' (a kvtier server address) or an embedded Store config with "
                    "'l1_size_gb' (the same keys as `kvtier server`)"
                )
            store = ServerConfig.from_dict(rest, where=where).store_kwargs()
        return cls(server, store, model_name, float(timeout_s))


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._\-+:/]")


def key_model_name(name: str) -> str:
    """vLLM's served model name as a kvtier ``model_name``: unchanged when valid (so another engine naming the
    model the same way shares its chunks); else (an absolute path, odd characters) a readable form plus a hash of
    the exact name, so two different names never meet."""
    try:
        ObjectKey(name, "0")
        return name
    except ConfigError:
        pass
    readable = "/".join(p for p in _SAFE_NAME.sub("_", name).split("/") if p not in ("", ".", ".."))[-160:]
    digest = blake3.blake3(name.encode()).hexdigest(length=8)
    return f"{readable or 'model'}-{digest}"


def key_salt(cache_salt: str | None) -> str:
    """vLLM's ``cache_salt`` as kvtier's: the same string (kvtier accepts any salt and writes only its keyed
    digest), so the HF integration given the same salt shares its chunks; ``None`` is the empty salt."""
    return cache_salt or ""


# -- the embedded Store shared by both roles of one process --------------------------------------------------------
_stores: dict[str, Any] = {}
_stores_lock = threading.Lock()


def embedded_store(store_kwargs: dict[str, Any]) -> Any:
    """The process's ``kvtier.Store`` for this config, created on first use: vLLM builds the scheduler-side and
    the worker-side connector separately, and both must see the same L1."""
    from kvtier.storage.store import Store

    key = canonical_json(store_kwargs)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = Store(**store_kwargs)
            _stores[key] = store
        return store


def close_embedded_stores() -> None:
    """Close every embedded Store of this process (pending L2 writes are drained first)."""
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()
