"""One generic registry of named plugins: serdes and L2 adapters share it (zarr's ``registry.py`` habit).

A :class:`Registry` maps names to items (factories) of one kind. Items come from two places:

* :meth:`Registry.register` in code (built-ins, or a user before building a config);
* the entry-point group of the registry (e.g. ``kvtier.serde``): a third-party package declares
  ``name = "package.module:factory"`` in its ``pyproject.toml``. Entry points are *lazy*: their names are known
  (listed by :meth:`Registry.names`) without importing anything, and one is imported the first time it is asked
  for, so a broken plugin breaks only the configs that name it.

Errors are :class:`~kvtier.errors.ConfigError` and name the field that chose the item (``where``):

* an unknown name lists the known ones;
* a plugin whose import fails, or an item whose optional dependency is missing (see :meth:`Registry.call`),
  says which package to install (``pip install 'kvtier[extra]'`` when the item belongs to an extra);
* a name that is taken, not a valid name, or an item that fails the registry's check.

Thread-safe: registration, lookup and the entry-point scan happen under one lock.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from kvtier.errors import ConfigError, MissingDependencyError

T = TypeVar("T")


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and name.replace("_", "").replace("-", "").isalnum()


class Registry(Generic[T]):
    """Named items of one ``kind`` (``"serde"``, ``"L2 adapter"``), with lazy entry points of ``group``.

    ``check`` (optional) says whether an object is an acceptable item (default: any callable); it is applied to
    registered items and to loaded entry points alike.
    """

    def __init__(self, kind: str, group: str | None = None, check: Callable[[object], bool] = callable) -> None:
        self.kind = kind
        self.group = group
        self._check = check
        self._items: dict[str, T] = {}
        self._extras: dict[str, str] = {}
        self._lazy: dict[str, importlib.metadata.EntryPoint] = {}
        self._scanned = False
        self._lock = threading.RLock()

    # -- registration --------------------------------------------------------------------------------------
    def register(self, name: str, item: T, *, extra: str | None = None) -> None:
        """Register ``item`` under ``name``; a name already registered is a ConfigError.

        ``extra``: the ``kvtier[extra]`` that provides the item's optional dependencies, for the install hint
        :meth:`call` gives when one is missing. A registered name shadows an entry point of the same name.
        """
        if not _valid_name(name):
            raise ConfigError(f"{self.kind} name: expected letters, digits, '_' or '-', got {name!r}")
        if not self._check(item):
            raise ConfigError(f"{self.kind} {name!r}: not a valid {self.kind} factory ({type(item).__name__})")
        with self._lock:
            if name in self._items:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            if extra is not None:
                self._extras[name] = extra

    def unregister(self, name: str) -> None:
        """Remove a registered item (tests, plugin reloads); unknown names are ignored. Entry points stay."""
        with self._lock:
            self._items.pop(name, None)
            self._extras.pop(name, None)

    # -- lookup --------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every name :meth:`get` accepts now: registered items and not-yet-loaded entry points."""
        with self._lock:
            self._scan()
            return sorted(set(self._items) | set(self._lazy))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def get(self, name: str, where: str = "type") -> T:
        """The item registered as ``name``, loading its entry point on first use.

        Raises ConfigError naming ``where`` for an unknown name (listing the known ones) or a plugin that fails
        to import (MissingDependencyError when it is a missing module).
        """
        with self._lock:
            item = self._items.get(name)
            if item is not None:
                return item
            self._scan()
            ep = self._lazy.get(name)
            if ep is None:
                known = sorted(set(self._items) | set(self._lazy))
                raise ConfigError(f"{where}: unknown {self.kind} {name!r}; known {self.kind}s are {known}")
            try:
                loaded: T = ep.load()
            except ModuleNotFoundError as exc:
                raise MissingDependencyError(
                    f"{where}: {self.kind} plugin {name!r} ({ep.value})", exc.name or str(exc)
                ) from exc
            except Exception as exc:  # a plugin's import may raise anything; it must surface as a config error
                raise ConfigError(f"{where}: {self.kind} plugin {name!r} ({ep.value}) failed to import: {exc}") from exc
            if not self._check(loaded):
                raise ConfigError(
                    f"{where}: {self.kind} plugin {name!r} ({ep.value}) is not a valid {self.kind} factory "
                    f"({type(loaded).__name__})"
                )
            del self._lazy[name]
            self._items[name] = loaded
            return loaded

    @contextmanager
    def missing_dependency_hint(self, name: str, where: str = "type") -> Iterator[None]:
        """Turn a ``ModuleNotFoundError`` raised while building item ``name`` into MissingDependencyError, whose
        message names the package to install (the item's ``kvtier[extra]`` when it was registered with one)."""
        try:
            yield
        except MissingDependencyError:
            raise
        except ModuleNotFoundError as exc:
            package = exc.name or str(exc)
            raise MissingDependencyError(f"{where}: {self.kind} {name!r}", package, self._extras.get(name)) from exc

    def call(self, name: str, *args: Any, where: str = "type") -> Any:
        """``get(name)(*args)`` with the install hint of :meth:`missing_dependency_hint`."""
        item: Any = self.get(name, where)
        with self.missing_dependency_hint(name, where):
            return item(*args)

    def _scan(self) -> None:
        """Collect the group's entry points once, by name, without importing them."""
        if self._scanned or self.group is None:
            return
        self._scanned = True
        for ep in importlib.metadata.entry_points(group=self.group):
            if _valid_name(ep.name) and ep.name not in self._items:
                self._lazy.setdefault(ep.name, ep)

    def rescan(self) -> None:
        """Forget the entry-point scan, so that a package installed since is seen (tests, long-lived shells)."""
        with self._lock:
            self._scanned = False
            self._lazy.clear()
