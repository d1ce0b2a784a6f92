"""Typed reading of config dicts: every field checked once, at start-up, with a message that names it.

Configs arrive as JSON-like dicts (``--l2-adapter '{...}'``, YAML files, ``Store(l2_adapters=[...])``). Code
below the config layer never calls ``.get()`` on them: a :class:`ConfigReader` turns each dict into typed values
and :meth:`ConfigReader.finish` rejects keys nobody asked for, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TypeVar

import blake3

from kvtier.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()


def canonical_json(value: Any) -> str:
    """The canonical JSON text of a config: sorted keys, no spaces. Equal configs give equal text."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config is not plain JSON data: {exc}") from exc


def config_hash(value: Any, size: int = 16) -> bytes:
    """A stable ``size``-byte hash of a config's canonical JSON (blake3)."""
    return blake3.blake3(canonical_json(value).encode()).digest(length=size)


class ConfigReader:
    """Reads typed fields from one config dict; ``where`` prefixes every message (e.g. ``l2_adapters[0]``)."""

    def __init__(self, config: Any, where: str) -> None:
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
        self._config: dict[str, Any] = config
        self._seen: set[str] = set()
        self.where = where

    def _take(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key in self._config:
            return self._config[key]
        if default is _MISSING:
            raise ConfigError(f"{self.where}.{key}: required field is missing")
        return default

    def has(self, key: str) -> bool:
        return key in self._config

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The value as given, unchecked (for sub-configs handed to another reader)."""
        return self._take(key, default)

    def string(self, key: str, default: Any = _MISSING, choices: Iterable[str] | None = None) -> Any:
        value = self._take(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{self.where}.{key}: expected a string, got {value!r}")
        if choices is not None:
            options = list(choices)
            if value not in options:
                raise ConfigError(f"{self.where}.{key}: expected one of {options}, got {value!r}")
        return value

    def integer(self, key: str, default: Any = _MISSING, min: int | None = None, max: int | None = None) -> Any:
        value = self._take(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where}.{key}: expected an integer, got {value!r}")
        self._check_range(key, value, min, max)
        return value

    def number(self, key: str, default: Any = _MISSING, min: float | None = None, max: float | None = None) -> Any:
        value = self._take(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.where}.{key}: expected a number, got {value!r}")
        self._check_range(key, value, min, max)
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self._take(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}.{key}: expected true or false, got {value!r}")
        return value

    def _check_range(self, key: str, value: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and value < lo:
            raise ConfigError(f"{self.where}.{key}: expected a value >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(f"{self.where}.{key}: expected a value <= {hi}, got {value!r}")

    def finish(self) -> None:
        """Reject keys that no field read: a misspelt option must not be silently ignored."""
        unknown = sorted(set(self._config) - self._seen)
        if unknown:
            known = sorted(self._seen)
            raise ConfigError(f"{self.where}: unknown field(s) {unknown}; known fields are {known}")
