"""The L1 memory pool: a lazily touched arena, an allocator over it, and objects with pins."""

from kvtier.storage.l1.allocator import Allocator
from kvtier.storage.l1.arena import BACKINGS, Arena
from kvtier.storage.l1.pool import L1Object, L1Pool

__all__ = ["BACKINGS", "Allocator", "Arena", "L1Object", "L1Pool"]
