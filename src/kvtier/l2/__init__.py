"""The L2 tier: everything below the Store's L1 pool.

* :mod:`kvtier.l2.record`: the self-describing, checked record every L2 object is;
* :mod:`kvtier.l2.tier`: :class:`L2Tier`, one adapter + its serde pipeline + the record framing, with one store
  path and one load path (raw is the identity stage of the same path);
* :mod:`kvtier.l2.adapters`: the bytes-only adapter contract, the registry and the built-in backends.
"""

from kvtier.l2.adapters import MISS, L2Adapter, create_l2_adapter, register_l2_adapter, registered_l2_adapters
from kvtier.l2.tier import L2Tier

__all__ = ["MISS", "L2Adapter", "L2Tier", "create_l2_adapter", "register_l2_adapter", "registered_l2_adapters"]
