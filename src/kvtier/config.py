"""Typed reading of config dicts: every field checked once, at start-up, with a message that names it.

Configs arrive as JSON-like dicts (``--l2-adapter '{...}'``, YAML files, ``Store(l2_adapters=[...])``). Code
below the config layer never calls ``.get()`` on them: a :class:`ConfigReader` turns each dict into typed values
and :meth:`ConfigReader.finish` rejects keys nobody asked for, so a typo fails loudly instead of being ignored.

Configs hold secrets (Redis passwords in URLs, key files, admin tokens): :func:`redact_config` is the form of a
config that may be logged or reported, and :func:`scrub` removes known secret strings from any text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote

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


# -- secrets ------------------------------------------------------------------------------------------------------
#: What a redacted value reads as in logs, stats, metrics and error messages.
REDACTED = "<redacted>"
# Config keys whose values are secrets (compared lower-case): passwords, tokens, key material and where it lives,
# tenant salts. ``key_env`` (the *name* of a variable) and ``key_prefix`` are not secrets.
_SECRET_KEYS = frozenset(
    {"password", "passwd", "secret", "token", "key", "key_hex", "key_b64", "key_file", "key_path", "credentials"}
)
_SECRET_SUFFIXES = ("_password", "_secret", "_token", "_key", "_key_file", "_key_path", "_salt", "cache_salt")
# ``scheme://user:PASSWORD@host``: the password part of any URL in a string.
_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s'\"]*:)([^@\s'\"]+)(@)")
# Secrets shorter than this are hidden where they are structured (config fields, URL passwords) but not searched
# for as substrings of free text: a 2-character password would otherwise blank out every word that contains it.
_MIN_SCRUB_LEN = 4


# Keys whose whole value is secret, whatever its shape: an object store's ``options`` carry credentials under
# names chosen by its client library (``application_credentials``, ``sas_key``, ...), so every value is hidden.
_SECRET_CONTAINERS = frozenset({"options"})


def is_secret_key(name: str) -> bool:
    """Whether a config key names a secret (its value never appears in logs, stats, metrics or errors)."""
    lower = name.lower()
    return lower in _SECRET_KEYS or lower in _SECRET_CONTAINERS or lower.endswith(_SECRET_SUFFIXES)


def redact_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1***\3", text)


def redact_config(value: Any) -> Any:
    """A copy of a config (dicts, lists, scalars) fit to log or report: the values of secret keys
    (:func:`is_secret_key`) replaced by :data:`REDACTED`, URL passwords by ``***``. Every place that logs or
    reports a config goes through this."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k) and v not in (None, "") else redact_config(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_config(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def _strings_in(node: Any) -> list[str]:
    """Every non-empty string value below ``node``."""
    if isinstance(node, str):
        return [node] if node else []
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings_in(v)]
    if isinstance(node, list | tuple):
        return [s for v in node for s in _strings_in(v)]
    return []


def secret_values(value: Any, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every secret string in a config: values of secret keys, URL passwords (as written and percent-decoded),
    and the key material an ``key_env`` field points to (read from ``environ``). For :func:`scrub`."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(k, str) and is_secret_key(k) and isinstance(v, str) and v:
                    found.add(v)
                elif isinstance(k, str) and k.lower() in _SECRET_CONTAINERS:
                    found.update(_strings_in(v))
                elif k == "key_env" and isinstance(v, str) and environ is not None and environ.get(v):
                    material = environ[v]
                    found.update({material, material.strip()})
                else:
                    walk(v)
        elif isinstance(node, list | tuple):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            for match in _URL_PASSWORD.finditer(node):
                found.update({match.group(2), unquote(match.group(2))})

    walk(value)
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret (as is, and as JSON or ``repr`` would escape it) replaced by
    :data:`REDACTED`, and URL passwords by ``***``: the last line of defence for logs, stats, metrics and
    error messages, which may quote a value from anywhere."""
    forms = {
        form
        for secret in secrets
        if len(secret) >= _MIN_SCRUB_LEN
        for form in (secret, json.dumps(secret)[1:-1], repr(secret)[1:-1])
    }
    # Again until nothing changes: a replacement next to the text around it could spell a secret anew (a secret
    # that begins with the end of "<redacted>"). Each pass that changes something shortens what is left of the
    # secrets' own characters, so this ends; the bound is a guard.
    for _ in range(8):
        before = text
        for form in sorted(forms, key=len, reverse=True):
            if form in text:
                text = text.replace(form, REDACTED)
        if text == before:
            break
    return redact_url(text)


def scrub_tree(value: Any, secrets: Sequence[str]) -> Any:
    """A copy of a JSON-like document (a stats document, a log record's fields) with :func:`scrub` applied to every
    string in it, keys included; other values are kept as they are (``str()`` of an unknown object is scrubbed)."""
    if not secrets:
        return value
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, dict):
        return {scrub_tree(k, secrets) if isinstance(k, str) else k: scrub_tree(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_tree(v, secrets) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return scrub(str(value), secrets)
