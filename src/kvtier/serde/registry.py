"""Serdes by name: ``register_serde_factory(name, factory)`` and ``create_serde_processor(config)``.

A config is ``{"type": NAME, ...}`` or a list of such stages (a chain). The keys besides ``type`` and
``max_workers`` go to the factory registered under ``NAME``; the factory returns an
:class:`~kvtier.serde.processor.AsyncSerdeProcessor`. Third-party packages register factories through the
entry-point group ``kvtier.serde`` (``name = "package.module:factory"``); they are loaded the first time an
unknown name is asked for.
"""

from __future__ import annotations

import copy
import importlib.metadata
import threading
from collections.abc import Callable
from typing import Any

from kvtier.config import ConfigReader
from kvtier.errors import ConfigError
from kvtier.serde.chain import ChainDeserializer, ChainSerializer, ScratchPool, check_chain_order
from kvtier.serde.processor import AsyncSerdeProcessor

SerdeFactory = Callable[[dict[str, Any]], AsyncSerdeProcessor]
ENTRY_POINT_GROUP = "kvtier.serde"

_factories: dict[str, SerdeFactory] = {}
_lock = threading.Lock()
_entry_points_loaded = False


def register_serde_factory(name: str, factory: SerdeFactory) -> None:
    """Register ``factory`` under ``name``; a name already taken is a ConfigError."""
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"serde name: expected letters, digits, '_' or '-', got {name!r}")
    if not callable(factory):
        raise ConfigError(f"serde {name!r}: factory must be callable, got {type(factory).__name__}")
    with _lock:
        if name in _factories:
            raise ConfigError(f"serde {name!r} is already registered")
        _factories[name] = factory


def unregister_serde_factory(name: str) -> None:
    """Remove a registered factory (for tests and plugin reloads); unknown names are ignored."""
    with _lock:
        _factories.pop(name, None)


def registered_serdes() -> list[str]:
    """The names that ``create_serde_processor`` accepts now."""
    _load_entry_points()
    return sorted(_factories)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _factories:
            continue
        try:
            factory = ep.load()
        except ImportError as exc:  # a broken plugin must not break the built-in serdes
            raise ConfigError(f"serde plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        register_serde_factory(ep.name, factory)


def _factory_for(name: str, where: str) -> SerdeFactory:
    factory = _factories.get(name)
    if factory is None:
        _load_entry_points()
        factory = _factories.get(name)
    if factory is None:
        raise ConfigError(f"{where}.type: unknown serde {name!r}; known serdes are {sorted(_factories)}")
    return factory


def _create_stage(config: Any, where: str) -> tuple[AsyncSerdeProcessor, int | None]:
    reader = ConfigReader(config, where)
    name = reader.string("type")
    workers = reader.integer("max_workers", None, min=1, max=256)
    params = {k: v for k, v in config.items() if k not in ("type", "max_workers")}
    processor = _factory_for(name, where)(params)
    if not isinstance(processor, AsyncSerdeProcessor):
        raise ConfigError(
            f"{where}: factory of serde {name!r} returned {type(processor).__name__}, expected an AsyncSerdeProcessor"
        )
    return processor, workers


def create_serde_processor(config: dict[str, Any] | list[dict[str, Any]]) -> AsyncSerdeProcessor:
    """Build a processor from ``{"type": ...}`` or a chain ``[{"type": ...}, ...]``; errors name the field.

    ``max_workers`` (any stage) sets the pool size. The returned processor's ``config`` is a deep copy of the
    input, so it rebuilds an equal processor from ``json.loads(json.dumps(processor.config))``.
    """
    saved = copy.deepcopy(config)
    if isinstance(config, dict):
        processor, workers = _create_stage(config, "serde")
        if workers is not None:
            processor.max_workers = workers
        processor.config = saved
        return processor
    if not isinstance(config, list):
        raise ConfigError(f"serde: expected an object or a list of objects, got {type(config).__name__}")
    if not config:
        raise ConfigError("serde: a chain needs at least one stage")
    stages: list[AsyncSerdeProcessor] = []
    names: list[str] = []
    max_workers = 1
    for i, stage_config in enumerate(config):
        stage, workers = _create_stage(stage_config, f"serde[{i}]")
        stages.append(stage)
        names.append(stage_config["type"])
        max_workers = max(max_workers, workers or stage.max_workers)
    serializers = [s.serializer for s in stages]
    check_chain_order(serializers, names)
    if serializers[0].consumes == "bytes":
        # No tensor stage given: the tensor's own bytes go first (raw), as for an adapter without serde.
        raw = _factory_for("raw", "serde")({})
        stages.insert(0, raw)
    scratch = ScratchPool()
    processor = AsyncSerdeProcessor(
        ChainSerializer([s.serializer for s in stages], scratch),
        ChainDeserializer([s.deserializer for s in stages], scratch),
        max_workers=max_workers,
    )
    processor.config = saved
    return processor
