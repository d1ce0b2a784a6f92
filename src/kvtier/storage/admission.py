"""Write admission for L2: which chunks the Store writes to each L2 tier, per adapter (``"admission"``).

An adapter config may say ``"admission": "always"`` (the default: every stored chunk is written through) or
``"admission": "second_hit"``: a chunk is written to that tier only once it was requested again while in L1 (an
L1 hit of :meth:`~kvtier.Store.retrieve` or :meth:`~kvtier.Store.retrieve_into`). One-shot prompts then never
cost the tier a write (the common way to spare an SSD's endurance or a network link), at the price of the L2
copy of a chunk that is reused only after it left L1.

What the Store does (``storage/store.py``, the ``_admit_*`` methods):

* ``store()`` queues its L2 write only to the ``always`` tiers; each ``second_hit`` tier counts the chunks as
  ``admission_skipped``.
* An L1 hit on a chunk that a ``second_hit`` tier does not hold yet queues the write of that chunk to those tiers
  through the Store's one write path (the write item names its tiers; the object stays pinned in L1 until the
  write is done) and counts ``admission_admitted``. A write that cannot be queued (queue full, L1 half pinned by
  waiting writes, Store closing) is counted as dropped and retried by the next hit.
* Which tiers hold a chunk is one bit per tier on its L1 object (``L1Object.l2_held``): no index to bound, gone
  with the object. A chunk loaded from a tier into L1 is marked as held by that tier, so its reuse does not
  write it to the same tier again; a ``second_hit`` tier that missed it gets it on the next hit (it was requested
  twice).
* A lookup or load from a ``second_hit`` tier of a chunk it was never given is a miss of that tier (nothing was
  written); the chunk may still be in L1 or in another tier.
* A chunk evicted from L1 before its second request is simply never written to a ``second_hit`` tier: that is
  the point. The next request misses, is recomputed and stored again, and starts over.

This module is torch-free: ``kvtier server`` checks the field before it imports torch.
"""

from __future__ import annotations

from typing import Any

from kvtier.errors import ConfigError

ALWAYS = "always"
SECOND_HIT = "second_hit"
#: Admission policies by name, in the order the docs list them.
ADMISSION_POLICIES = (ALWAYS, SECOND_HIT)


def admission_of(config: Any, where: str) -> str:
    """The admission policy an adapter config names (``always`` when absent); a ConfigError names
    ``{where}.admission`` for anything else."""
    if not isinstance(config, dict) or "admission" not in config:
        return ALWAYS
    value = config["admission"]
    if not isinstance(value, str) or value not in ADMISSION_POLICIES:
        raise ConfigError(f"{where}.admission: expected one of {list(ADMISSION_POLICIES)}, got {value!r}")
    return value


def without_admission(config: Any) -> Any:
    """The adapter config without its ``admission`` key (the adapter's factory knows nothing of it)."""
    if not isinstance(config, dict) or "admission" not in config:
        return config
    return {k: v for k, v in config.items() if k != "admission"}


class TierAdmission:
    """One tier's policy and counters. The Store mutates the counters under its own lock."""

    __slots__ = ("admitted", "policy", "skipped")

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.skipped = 0  # chunks stored to L1 and not written to this tier at store time
        self.admitted = 0  # of those, chunks queued for this tier on a later L1 hit

    @property
    def second_hit(self) -> bool:
        return self.policy == SECOND_HIT

    def stats(self) -> dict[str, Any]:
        return {"admission": self.policy, "admission_skipped": self.skipped, "admission_admitted": self.admitted}
