"""The one error tree of kvtier.

Every error kvtier raises on purpose is a :class:`KVTierError`. Each subclass also inherits the builtin
exception it refines, so callers that already catch ``ValueError`` or ``KeyError`` keep working:

* :class:`ConfigError` (``ValueError``): a config value, CLI flag or argument is wrong. Raised at start-up, the
  message names the field and what was expected.
* :class:`MissingDependencyError` (``ConfigError``, ``ImportError``): a configured feature needs a package that is
  not installed; the message names the package.
* :class:`IntegrityError` (``ValueError``): stored data failed a check (bad magic, foreign serde, truncated,
  flipped bits, wrong key). Storage layers turn it into a *miss*, never into wrong KV.
* :class:`ForeignRecordError` (``IntegrityError``): an intact record that is not ours (another serde identity,
  another key, a key we cannot decrypt). A miss left in place: it may belong to another deployment.
* :class:`L2Error` (``OSError``): an L2 backend failed (I/O, timeout, outage). Adapters translate whatever their
  backend raised into this one error at their boundary; the Store turns only it (and integrity failures) into
  misses or failed writes.
* :class:`NotFoundError` (``KeyError``): a requested object is in no tier.
* :class:`CapacityError` (``MemoryError``): an object cannot fit (larger than the pool, disk full).
* :class:`SerdeError` (``RuntimeError``): a serialize or deserialize step failed (e.g. non-finite input to fp8).
* :class:`BatchError` (``RuntimeError``): a batch failed as a whole; ``.errors`` maps item index to its cause.
"""

from __future__ import annotations


class KVTierError(Exception):
    """Base of every error kvtier raises on purpose."""


class ConfigError(KVTierError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class MissingDependencyError(ConfigError, ImportError):
    """A configured feature needs an optional package that is not installed."""

    def __init__(self, feature: str, package: str, extra: str | None = None) -> None:
        hint = f"pip install 'kvtier[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the package {package!r}, which is not installed ({hint})")
        self.feature = feature
        self.package = package


class IntegrityError(KVTierError, ValueError):
    """Stored data failed a check; callers treat it as a miss."""


class ForeignRecordError(IntegrityError):
    """An intact record that is not ours (another serde identity, key, or encryption key): a miss, left in place."""


class L2Error(KVTierError, OSError):
    """An L2 backend failed (I/O, timeout, outage); the one error adapters raise for backend failures."""


class NotFoundError(KVTierError, KeyError):
    """The requested object is in no tier."""

    def __str__(self) -> str:  # KeyError quotes its argument; a message reads better plain.
        return str(self.args[0]) if self.args else "not found"


class CapacityError(KVTierError, MemoryError):
    """An object does not fit: larger than the pool, or the backing store is full."""


class SerdeError(KVTierError, RuntimeError):
    """A serialize or deserialize step failed."""


class BatchError(KVTierError, RuntimeError):
    """A batch failed as a whole. ``errors`` maps the index of each failed item to its exception."""

    def __init__(self, message: str, errors: dict[int, BaseException] | None = None) -> None:
        self.errors: dict[int, BaseException] = dict(errors or {})
        if self.errors:
            first = min(self.errors)
            message = f"{message}: {len(self.errors)} item(s) failed, first #{first}: {self.errors[first]!r}"
        super().__init__(message)
