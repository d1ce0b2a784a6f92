"""Tenants and models: usage accounting and per-tenant quotas, for the L1 pool and the L2 adapters that keep a
capacity index (fs, memory, object store on an owned prefix).

A **tenant** is a ``cache_salt``. The salt is a secret, so a tenant is only ever named by its keyed digest
(:attr:`kvtier.ObjectKey.salt_digest`: 32 lower-case hex digits; ``""`` for requests without a salt, which form
one tenant of their own). Stats, metrics and quota overrides use the digest, never the salt. Compute a tenant's
digest without putting the salt on a command line (where the process list and shell history would keep it)::

    printf %s "$SALT" | python -m kvtier.tenants digest

**Quotas.** A :class:`TenantQuotas` holds a default quota (bytes, for every tenant; ``None``: unlimited) and
overrides by digest (a byte count, or ``None`` to exempt a tenant from the default). Config gives them in GiB:
``l1_quota_gb`` / ``l1_quotas_gb`` for L1, ``tenant_quota_gb`` / ``tenant_quotas_gb`` inside an adapter's config.
A tenant that would go over its quota evicts its own objects first, in the owner's policy order restricted to the
tenant, so one tenant's burst does not evict everyone's; a tenant whose own objects cannot make room (all pinned
by reads and writes in flight) is refused, never let past its quota.

**Accounting.** A :class:`UsageLedger` keeps bytes and objects per tenant and per model, updated by its owner at
each store, eviction, replacement and deletion (O(1) each: no scan ever), and a per-tenant eviction order for the
tenants that have a quota. It is not thread-safe: its owner calls it under its own lock, the same lock that
guards what it accounts for, so its figures are exact under concurrency.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.errors import ConfigError
from kvtier.key_names import parse_key_str
from kvtier.storage.policies import EvictionPolicy, create_policy

GiB = 1 << 30
_DIGEST_RE = re.compile(r"(?:[0-9a-f]{32})?")
_DIGEST_HINT = (
    'tenants are named by their salt digest: 32 lower-case hex digits, or "" for requests without a salt '
    '(compute it with `printf %s "$SALT" | python -m kvtier.tenants digest`)'
)


def is_tenant_name(name: object) -> bool:
    """Whether ``name`` is a tenant's name: a salt digest, or ``""`` for no salt."""
    return isinstance(name, str) and _DIGEST_RE.fullmatch(name) is not None


def tenant_of_key_str(key: str) -> tuple[str, str]:
    """``(salt digest, model name)`` of an ``ObjectKey.to_str()`` string (``model@rank@digest@hash``); a string
    that is not one (adapter tests store arbitrary names) is the unsalted tenant's, under the model ``""``."""
    fields = parse_key_str(key)
    if fields is not None and is_tenant_name(fields.salt_digest):
        return fields.salt_digest, fields.model_name
    return "", ""


def _gb_to_bytes(gb: float) -> int:
    return int(gb * GiB)


@dataclass(frozen=True)
class TenantQuotas:
    """Per-tenant quotas in bytes: ``default`` for every tenant, ``overrides`` by salt digest (``None``: no
    quota for that tenant). The empty value (no default, no overrides) enforces nothing."""

    default: int | None = None
    overrides: Mapping[str, int | None] = field(default_factory=dict)

    def quota(self, tenant: str) -> int | None:
        """The quota of ``tenant`` (a salt digest) in bytes, or ``None`` when it has none."""
        if tenant in self.overrides:
            return self.overrides[tenant]
        return self.default

    @property
    def enabled(self) -> bool:
        return self.default is not None or any(v is not None for v in self.overrides.values())

    @classmethod
    def parse(cls, default_gb: Any, overrides_gb: Any, default_field: str, overrides_field: str) -> TenantQuotas:
        """Check a default (GiB, ``None`` for none) and overrides (``{digest: GiB or None}``); a bad value raises
        :class:`ConfigError` naming the field. An override key that is not a digest is refused without echoing
        it: it may be a raw salt, a secret."""
        default = None if default_gb is None else _gb_to_bytes(_quota_gb(default_gb, default_field))
        if overrides_gb is None:
            overrides_gb = {}
        if not isinstance(overrides_gb, Mapping):
            raise ConfigError(
                f"{overrides_field}: expected a mapping of salt digest to GiB, got {type(overrides_gb).__name__}"
            )
        overrides: dict[str, int | None] = {}
        for i, (name, gb) in enumerate(overrides_gb.items()):
            if not is_tenant_name(name):
                # Never echo the name: a raw salt put here by mistake is a secret.
                length = len(name) if isinstance(name, str) else len(str(name))
                quote = (
                    "; quote it in YAML, where a digest of decimal digits reads as a number"
                    if isinstance(name, int)
                    else ""
                )
                raise ConfigError(
                    f"{overrides_field}: entry #{i + 1} is not named by a salt digest (a {type(name).__name__} of "
                    f"length {length}); {_DIGEST_HINT}{quote}"
                )
            where = f"{overrides_field}[{name!r}]"
            overrides[name] = None if gb is None else _gb_to_bytes(_quota_gb(gb, where))
        return cls(default, overrides)


def _quota_gb(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: expected a quota in GiB (a number >= 0) or null for none, got {value!r}")
    return float(value)


def parse_quota_flag(text: str, flag: str) -> tuple[str, float | None]:
    """One ``DIGEST=GB`` command-line value (``=GB`` names the unsalted tenant; ``GB`` may be ``none``)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"{flag}: expected DIGEST=GB (e.g. 0123...cdef=2.5), got a value without '='")
    if not is_tenant_name(name):
        raise ConfigError(f"{flag}: the part before '=' is not a salt digest (length {len(name)}); {_DIGEST_HINT}")
    if value.strip().lower() in ("none", "null"):
        return name, None
    try:
        gb = float(value)
    except ValueError:
        raise ConfigError(f"{flag} {name}: expected a quota in GiB or 'none' after '=', got {value!r}") from None
    return name, _quota_gb(gb, f"{flag} {name}")


class UsageLedger:
    """Bytes and objects per tenant and per model, and the eviction order within each tenant that has a quota.

    The owner reports every change with :meth:`change` (bytes held and objects visible may move separately: the
    L1 pool holds a reserved object's bytes before it is visible and a replaced, pinned object's bytes after it
    is gone from its index) and tells the per-tenant order what happens with :meth:`insert`, :meth:`access` and
    :meth:`remove`, as it tells its global policy. Entries that fall to zero are dropped, so the ledger holds
    only tenants and models with something stored (and tenants with a quota override, reported always).
    """

    def __init__(self, quotas: TenantQuotas | None = None, policy: str = "LRU") -> None:
        self.quotas = quotas or TenantQuotas()
        create_policy(policy)  # checked once here: a typo fails at start, not at the first quota eviction
        self._policy = policy
        self._tenants: dict[str, list[int]] = {}  # digest -> [bytes, objects]
        self._models: dict[str, list[int]] = {}  # model name -> [bytes, objects]
        self._orders: dict[str, EvictionPolicy[Any]] = {}  # digest -> its keys in eviction order (quota'd only)

    # -- accounting -------------------------------------------------------------------------------------------
    def change(self, tenant: str, model: str, nbytes: int, objects: int = 0) -> None:
        """Add ``nbytes`` and ``objects`` (either may be negative) to ``tenant`` and ``model``."""
        _bump(self._tenants, tenant, nbytes, objects)
        _bump(self._models, model, nbytes, objects)

    def bytes_of(self, tenant: str) -> int:
        entry = self._tenants.get(tenant)
        return entry[0] if entry else 0

    def objects_of(self, tenant: str) -> int:
        entry = self._tenants.get(tenant)
        return entry[1] if entry else 0

    def excess(self, tenant: str, extra: int) -> int:
        """How many bytes ``tenant`` would be over its quota with ``extra`` more (<= 0: it fits or has none)."""
        quota = self.quotas.quota(tenant)
        if quota is None:
            return 0
        return self.bytes_of(tenant) + extra - quota

    # -- the per-tenant eviction order ------------------------------------------------------------------------
    def insert(self, tenant: str, key: Hashable) -> None:
        if self.quotas.quota(tenant) is None:
            return
        order = self._orders.get(tenant)
        if order is None:
            order = self._orders[tenant] = create_policy(self._policy)
        order.insert(key)

    def access(self, tenant: str, key: Hashable) -> None:
        order = self._orders.get(tenant)
        if order is not None:
            order.access(key)

    def remove(self, tenant: str, key: Hashable) -> None:
        order = self._orders.get(tenant)
        if order is not None:
            order.remove(key)
            if not len(order):
                del self._orders[tenant]

    def victims(self, tenant: str) -> Iterator[Any]:
        """The tenant's keys, best victim first (nothing for a tenant without a quota)."""
        order = self._orders.get(tenant)
        return iter(()) if order is None else order.victims()

    # -- reporting --------------------------------------------------------------------------------------------
    def tenants(self) -> dict[str, dict[str, int | None]]:
        """``{digest: {"bytes", "objects", "quota_bytes"}}`` for every tenant holding something or overridden."""
        out: dict[str, dict[str, int | None]] = {
            t: {"bytes": b, "objects": n, "quota_bytes": self.quotas.quota(t)} for t, (b, n) in self._tenants.items()
        }
        for t, quota in self.quotas.overrides.items():
            out.setdefault(t, {"bytes": 0, "objects": 0, "quota_bytes": quota})
        return out

    def models(self) -> dict[str, dict[str, int]]:
        """``{model_name: {"bytes", "objects"}}`` for every model holding something."""
        return {m: {"bytes": b, "objects": n} for m, (b, n) in self._models.items()}

    def totals(self) -> tuple[int, int]:
        """Bytes and objects over every tenant (for checks: equal to the owner's own totals)."""
        return sum(v[0] for v in self._tenants.values()), sum(v[1] for v in self._tenants.values())


def _bump(table: dict[str, list[int]], name: str, nbytes: int, objects: int) -> None:
    entry = table.get(name)
    if entry is None:
        entry = table[name] = [nbytes, objects]
    else:
        entry[0] += nbytes
        entry[1] += objects
    if entry[0] <= 0 or entry[1] <= 0:
        if entry[0] < 0 or entry[1] < 0:
            # An owner that credits more than it charged has a bookkeeping bug: fail loudly where it happens.
            raise RuntimeError(f"usage ledger went negative for {name!r}: {entry}")
        if not entry[0] and not entry[1]:
            del table[name]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvtier.tenants digest``: the salt digest of the salt read from standard input (without a
    trailing newline: ``printf %s "$SALT"``, not ``echo``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["digest"]:
        print('usage: printf %s "$SALT" | python -m kvtier.tenants digest', file=sys.stderr)
        return 2
    salt = sys.stdin.read()
    if salt.endswith("\n"):
        print("kvtier: the salt read ends in a newline, which is part of it; use printf %s, not echo", file=sys.stderr)
    from kvtier.types import salt_digest

    print(salt_digest(salt) if salt else '""  (the empty salt: requests without one)')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def read_adapter_quotas(reader: Any, where: str) -> TenantQuotas:
    """An adapter config's ``tenant_quota_gb`` (default per tenant) and ``tenant_quotas_gb`` (overrides by salt
    digest), read from its :class:`~kvtier.config.ConfigReader`."""
    return TenantQuotas.parse(
        reader.raw("tenant_quota_gb", None),
        reader.raw("tenant_quotas_gb", None),
        f"{where}.tenant_quota_gb",
        f"{where}.tenant_quotas_gb",
    )


def refuse_adapter_quotas(reader: Any, where: str, why: str) -> None:
    """For an adapter that cannot enforce tenant quotas: a config that sets one fails at start naming the field."""
    for name in ("tenant_quota_gb", "tenant_quotas_gb"):
        if reader.has(name):
            raise ConfigError(f"{where}.{name}: not supported by this adapter: {why}")
