"""The L1 memory pool: a shared-memory arena, an allocator over it, and objects with pins."""

from kvtier.storage.l1.allocator import Allocator
from kvtier.storage.l1.arena import Arena
from kvtier.storage.l1.pool import L1Object, L1Pool

__all__ = ["Allocator", "Arena", "L1Object", "L1Pool"]
