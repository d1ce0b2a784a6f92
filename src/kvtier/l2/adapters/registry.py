"""L2 adapters by ``type`` name: ``register_l2_adapter(name, factory)`` and ``create_l2_adapter(config)``.

Adapters share the one generic :class:`kvtier.registry.Registry` with serdes. Third-party packages register
adapters through the entry-point group ``kvtier.l2_adapter`` (``name = "package.module:factory"`` in their
``pyproject.toml``), so ``kvtier server --l2-adapter '{"type": "name", ...}'`` finds an adapter installed in its
environment; each is imported the first time a config names it.

A config is ``{"type": NAME, "serde": {...} | [...], ...}``. ``serde`` (optional) is split off and built with
:func:`kvtier.serde.create_serde_processor`; the other keys except ``type`` go to the factory registered under
``NAME``, which returns an :class:`~kvtier.l2.adapters.base.L2Adapter` (reading its keys with a
:class:`~kvtier.config.ConfigReader`, so a misspelt key fails at start). The result is an
:class:`~kvtier.l2.tier.L2Tier`: the adapter behind its serde and the record framing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from kvtier.config import ConfigReader
from kvtier.errors import ConfigError
from kvtier.l2.adapters.base import L2Adapter
from kvtier.l2.tier import L2Tier
from kvtier.registry import Registry
from kvtier.serde import create_serde_processor

#: ``factory(config, where) -> L2Adapter``; ``config`` has no ``type`` and no ``serde``; ``where`` prefixes errors.
L2AdapterFactory = Callable[[dict[str, Any], str], L2Adapter]

ENTRY_POINT_GROUP = "kvtier.l2_adapter"

#: Every L2 adapter by name; third-party adapters join through the entry-point group ``kvtier.l2_adapter``.
L2_ADAPTERS: Registry[L2AdapterFactory] = Registry("L2 adapter", ENTRY_POINT_GROUP)


def register_l2_adapter(name: str, factory: L2AdapterFactory) -> None:
    """Register ``factory`` under ``name``; a name already taken is a ConfigError."""
    L2_ADAPTERS.register(name, factory)


def unregister_l2_adapter(name: str) -> None:
    """Remove a registered factory (for tests); unknown names are ignored."""
    L2_ADAPTERS.unregister(name)


def registered_l2_adapters() -> list[str]:
    """The ``type`` names ``create_l2_adapter`` accepts (entry points included, not yet imported)."""
    return L2_ADAPTERS.names()


def create_backend(config: Any, where: str = "l2_adapter") -> L2Adapter:
    """Build the bare adapter of ``config`` (``serde``, if present, must be absent: backends take no serde)."""
    reader = ConfigReader(config, where)
    name = reader.string("type")
    params = {k: v for k, v in config.items() if k != "type"}
    adapter = L2_ADAPTERS.call(name, params, where, where=f"{where}.type")
    if not isinstance(adapter, L2Adapter):
        raise ConfigError(
            f"{where}: factory of L2 adapter {name!r} returned {type(adapter).__name__}, not an L2Adapter"
        )
    adapter.type_name = name
    adapter.config = copy.deepcopy(config)
    return adapter


def create_l2_adapter(config: Any, where: str = "l2_adapter") -> L2Tier:
    """Build an adapter and its optional serde from ``{"type": ..., "serde": ..., ...}``; errors name the field."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
    serde_config = config.get("serde")
    backend_config = {k: v for k, v in config.items() if k != "serde"}
    processor = None
    if serde_config is not None:
        try:
            processor = create_serde_processor(copy.deepcopy(serde_config))
        except ConfigError as exc:
            raise ConfigError(f"{where}.{exc}") from exc
    adapter = create_backend(backend_config, where)
    try:
        return L2Tier(adapter, processor, config=copy.deepcopy(config))
    except ConfigError as exc:  # a serde without an identity: refused here, before anything is stored
        adapter.close()
        if processor is not None:
            processor.close()
        raise ConfigError(f"{where}.serde: {exc}") from exc
