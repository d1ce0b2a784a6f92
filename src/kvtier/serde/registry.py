"""Serdes by name: ``register_serde_factory(name, factory)`` and ``create_serde_processor(config)``.

A config is ``{"type": NAME, ...}`` or a list of such stages (a chain). The keys besides ``type`` and
``max_workers`` go to the factory registered under ``NAME``; the factory returns an
:class:`~kvtier.serde.processor.AsyncSerdeProcessor`. Third-party packages register factories through the
entry-point group ``kvtier.serde`` (``name = "package.module:factory"``); each is imported the first time a
config names it (see :class:`kvtier.registry.Registry`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from kvtier.config import ConfigReader
from kvtier.errors import ConfigError
from kvtier.registry import Registry
from kvtier.serde.chain import ChainDeserializer, ChainSerializer, ScratchPool, check_chain_order
from kvtier.serde.processor import AsyncSerdeProcessor

SerdeFactory = Callable[[dict[str, Any]], AsyncSerdeProcessor]
ENTRY_POINT_GROUP = "kvtier.serde"

#: Every serde by name; third-party serdes join through the entry-point group ``kvtier.serde``.
SERDES: Registry[SerdeFactory] = Registry("serde", ENTRY_POINT_GROUP)


def register_serde_factory(name: str, factory: SerdeFactory) -> None:
    """Register ``factory`` under ``name``; a name already taken is a ConfigError."""
    SERDES.register(name, factory)


def unregister_serde_factory(name: str) -> None:
    """Remove a registered factory (for tests and plugin reloads); unknown names are ignored."""
    SERDES.unregister(name)


def registered_serdes() -> list[str]:
    """The names that ``create_serde_processor`` accepts now (entry points included, not yet imported)."""
    return SERDES.names()


def _create_stage(config: Any, where: str) -> tuple[AsyncSerdeProcessor, int | None]:
    reader = ConfigReader(config, where)
    name = reader.string("type")
    workers = reader.integer("max_workers", None, min=1, max=256)
    params = {k: v for k, v in config.items() if k not in ("type", "max_workers")}
    processor = SERDES.call(name, params, where=f"{where}.type")
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
        raw = SERDES.call("raw", {}, where="serde")
        stages.insert(0, raw)
    scratch = ScratchPool()
    processor = AsyncSerdeProcessor(
        ChainSerializer([s.serializer for s in stages], scratch),
        ChainDeserializer([s.deserializer for s in stages], scratch, [s.serializer for s in stages]),
        max_workers=max_workers,
    )
    processor.config = saved
    return processor
