"""A first-fit allocator over an arena's byte range, with alignment and coalescing of free blocks.

Free blocks are kept sorted by offset; freeing merges a block with free neighbours, so the free list never holds
two adjacent blocks and fragmentation is only what live objects cause. When no block is large enough although
enough bytes are free in total, :meth:`Allocator.alloc` returns ``None`` and the owner evicts more (the next
victims usually free neighbours of holes). Not thread-safe: the pool holds its lock.
"""

from __future__ import annotations

import bisect

ALIGN = 256  # memcpy and SIMD decoders run at full speed from here; a chunk is megabytes, the waste is nil


class Allocator:
    def __init__(self, size: int, align: int = ALIGN) -> None:
        if align < 1 or align & (align - 1):
            raise ValueError(f"alignment must be a power of two, got {align}")
        self.size = size - size % align
        self.align = align
        self._starts: list[int] = [0] if self.size else []  # free block offsets, sorted
        self._free: dict[int, int] = {0: self.size} if self.size else {}  # offset -> length
        self._used: dict[int, int] = {}  # offset -> allocated (aligned) length
        self.free_bytes = self.size

    def rounded(self, nbytes: int) -> int:
        return max(self.align, -(-nbytes // self.align) * self.align)

    def alloc(self, nbytes: int, limit: int | None = None) -> int | None:
        """Offset of a new block of at least ``nbytes`` ending at or below ``limit`` (default: the arena's end),
        or ``None`` when no free block is large enough."""
        need = self.rounded(nbytes)
        end = self.size if limit is None else min(limit, self.size)
        for i, start in enumerate(self._starts):  # first fit: keeps the low end dense, the top free
            if start + need > end:
                return None  # sorted by offset: every later block starts higher still
            length = self._free[start]
            if length >= need:
                del self._free[start]
                if length == need:
                    del self._starts[i]
                else:
                    self._starts[i] = start + need
                    self._free[start + need] = length - need
                self._used[start] = need
                self.free_bytes -= need
                return start
        return None

    def free(self, offset: int) -> None:
        """Return a block; merges it with free neighbours."""
        length = self._used.pop(offset)
        self.free_bytes += length
        i = bisect.bisect_left(self._starts, offset)
        if i < len(self._starts) and self._starts[i] == offset + length:  # merge with the next block
            length += self._free.pop(self._starts[i])
            del self._starts[i]
        if i > 0 and self._starts[i - 1] + self._free[self._starts[i - 1]] == offset:  # and the previous
            self._free[self._starts[i - 1]] += length
            return
        self._starts.insert(i, offset)
        self._free[offset] = length

    def free_ranges(self) -> list[tuple[int, int]]:
        """Every free block as ``(start, end)``, by offset."""
        return [(start, start + self._free[start]) for start in self._starts]

    @property
    def used_end(self) -> int:
        """The end of the highest allocated block (0 when nothing is allocated)."""
        return max((off + n for off, n in self._used.items()), default=0)

    @property
    def used_blocks(self) -> dict[int, int]:
        """Allocated blocks, offset -> aligned length (a copy)."""
        return dict(self._used)

    @property
    def largest_free(self) -> int:
        return max(self._free.values(), default=0)

    @property
    def free_blocks(self) -> int:
        return len(self._starts)
