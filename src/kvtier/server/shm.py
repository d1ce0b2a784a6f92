"""Shared-memory regions for the same-host data path.

A client creates each region with ``memfd_create`` (anonymous memory: no name in ``/dev/shm``, so nothing leaks
when a client dies), sizes it, seals it against shrinking and growing (``F_SEAL_SHRINK | F_SEAL_GROW``, then
``F_SEAL_SEAL``) and writes a random 16-byte token at its start. The seals are what make the server's mapping safe:
without ``F_SEAL_SHRINK`` a client could ``ftruncate`` its memfd after registration and the server's next access
past the new end would die of SIGBUS; the server refuses any region that is not sealed so. The server maps it by
opening ``/proc/<pid>/fd/<fd>``, which works only on the same host, for the same user (or root) and in the same pid
namespace, and checks the token; any failure means "not same host" and the client uses message frames. A region
stays mapped by the server until the client unregisters it or the server stops (a client that dies without
unregistering leaves a mapping behind; the table is bounded and drops the least recently used region when full).

Data never lands in the first :data:`DATA_OFFSET` bytes (the token's page), and every placement is aligned to
:data:`~kvtier.server.protocol.ALIGN`.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kvtier.server.protocol import ALIGN, Loc, Meta, ProtocolError

TOKEN_BYTES = 16
#: Clients name their memfds so; the server maps nothing else (``/proc/.../fd`` links read ``/memfd:NAME``).
MEMFD_NAME = "kvtier-client"
MEMFD_PREFIX = f"/memfd:{MEMFD_NAME}"
#: Where data starts in a region: the first page holds the token.
DATA_OFFSET = 4096
#: Seals a client puts on each region; the server requires :data:`REQUIRED_SEALS` (its size can never change).
CLIENT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


class ClientRegion:
    """A memfd-backed region owned by a client; ``tensor`` is a ``uint8`` view of all of it."""

    def __init__(self, size: int) -> None:
        if size <= DATA_OFFSET:
            raise ValueError(f"region size must exceed {DATA_OFFSET} bytes, got {size}")
        self.size = size
        self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, CLIENT_SEALS)
            self.mmap = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.mmap[:TOKEN_BYTES] = self.token
        self.tensor = torch.frombuffer(self.mmap, dtype=torch.uint8)
        self.base = self.tensor.data_ptr()
        self.region_id = -1  # assigned by the server on registration

    def view(self, offset: int, meta_shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes].view(dtype).view(meta_shape)

    def contains(self, tensor: torch.Tensor) -> int | None:
        """The offset of ``tensor``'s data in this region if it lies wholly inside and is contiguous, else None."""
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            return None
        start = tensor.data_ptr() - self.base
        end = start + tensor.numel() * tensor.element_size()
        if start >= DATA_OFFSET and end <= self.size and start % ALIGN == 0:
            return start
        return None

    def close(self) -> None:
        """Release the fd and, unless a tensor still views it, the mapping (which then lives as long as that
        tensor: memory is never unmapped under a live view). Idempotent."""
        if self.fd < 0:
            return
        del self.tensor
        with contextlib.suppress(BufferError):
            self.mmap.close()
        os.close(self.fd)
        self.fd = -1


@dataclass
class _Mapped:
    mmap: mmap.mmap
    tensor: torch.Tensor
    size: int
    pid: int
    owner: bytes
    users: int = 0
    dead: bool = field(default=False)


class RegionTable:
    """The server's table of mapped client regions, thread-safe and bounded (LRU beyond ``max_regions``)."""

    def __init__(self, max_regions: int = 1024) -> None:
        self._regions: OrderedDict[int, _Mapped] = OrderedDict()
        self._lock = threading.Lock()
        self.max_regions = max_regions

    def register(self, owner: bytes, pid: int, fd: int, size: int, token: bytes) -> tuple[int, str]:
        """Map a client's region for connection ``owner``; returns ``(region id, "")`` or ``(-1, reason)``.

        Only a kvtier client's memfd is accepted (checked on the opened file, so the check and the mapping see the
        same file): a request naming any other file of any process is refused, never mapped. The memfd must be
        sealed against shrinking and growing (:data:`REQUIRED_SEALS`): its size is then fixed for the life of the
        mapping, so no client can pull pages from under the server. Region ids are random, and only ``owner`` can
        use or unregister its regions.
        """
        if size <= DATA_OFFSET or len(token) != TOKEN_BYTES or pid <= 0 or fd < 0:
            return -1, "invalid registration"
        path = f"/proc/{pid}/fd/{fd}"
        try:
            # Checked before opening too, so that no device, FIFO or socket of another process is ever opened.
            if not os.readlink(path).startswith(MEMFD_PREFIX):
                return -1, "not a kvtier client memory region"
            handle = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            return -1, f"cannot open the client's memory ({exc.strerror}); not on the same host?"
        try:
            if not os.readlink(f"/proc/self/fd/{handle}").startswith(MEMFD_PREFIX):
                return -1, "not a kvtier client memory region"
            # Seals first, size second: once sealed the size read below can no longer change.
            seals = fcntl.fcntl(handle, fcntl.F_GET_SEALS)
            if seals & REQUIRED_SEALS != REQUIRED_SEALS:
                return -1, (
                    "region is not sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW): "
                    "a client must seal its memfd before registering it"
                )
            if os.fstat(handle).st_size < size:
                return -1, "region is smaller than announced"
            mapped = mmap.mmap(handle, size)
        except OSError as exc:
            return -1, f"cannot map the client's memory ({exc.strerror})"
        finally:
            os.close(handle)
        if mapped[:TOKEN_BYTES] != token:
            mapped.close()
            return -1, "token mismatch: another process's memory, not the client's"
        entry = _Mapped(mapped, torch.frombuffer(mapped, dtype=torch.uint8), size, pid, owner)
        evicted: list[_Mapped] = []
        with self._lock:
            region_id = secrets.randbits(62) + 1
            while region_id in self._regions:
                region_id = secrets.randbits(62) + 1
            self._regions[region_id] = entry
            while len(self._regions) > self.max_regions:
                _, old = self._regions.popitem(last=False)
                evicted.append(old)
        for old in evicted:
            self._retire(old)
        return region_id, ""

    def unregister(self, owner: bytes, region_ids: list[int]) -> None:
        """Unmap ``owner``'s regions among ``region_ids`` (others' ids and unknown ids are ignored)."""
        with self._lock:
            mine = [r for r in region_ids if r in self._regions and self._regions[r].owner == owner]
            entries = [self._regions.pop(r) for r in mine]
        for entry in entries:
            self._retire(entry)

    def _retire(self, entry: _Mapped) -> None:
        with self._lock:
            entry.dead = True
            if entry.users:
                return  # the last user's release() unmaps it
        self._unmap(entry)

    @staticmethod
    def _unmap(entry: _Mapped) -> None:
        del entry.tensor
        with contextlib.suppress(BufferError):  # a view escaped (should not happen); freed with it
            entry.mmap.close()

    def acquire(self, owner: bytes, region_id: int) -> _Mapped:
        """Pin ``owner``'s region for the duration of a request; an unknown id, or another connection's, raises
        ProtocolError of kind ``region`` (the client registers its regions again and retries)."""
        with self._lock:
            entry = self._regions.get(region_id)
            if entry is None or entry.owner != owner:
                err = ProtocolError(f"unknown shared-memory region {region_id} (server restarted? register again)")
                err.kind = "region"
                raise err
            self._regions.move_to_end(region_id)
            entry.users += 1
            return entry

    def release(self, entry: _Mapped) -> None:
        with self._lock:
            entry.users -= 1
            unmap = entry.dead and entry.users == 0
        if unmap:
            self._unmap(entry)

    def view(self, entry: _Mapped, loc: Loc, meta: Meta) -> torch.Tensor:
        """The tensor ``meta`` at ``loc`` in ``entry``; every bound and alignment checked."""
        nbytes = meta.nbytes()
        dtype = meta.torch_dtype()
        if loc.nbytes != nbytes:
            raise ProtocolError(f"loc.nbytes {loc.nbytes} does not match the tensor's {nbytes} bytes")
        if loc.offset < DATA_OFFSET or loc.offset + nbytes > entry.size or loc.offset % ALIGN:
            raise ProtocolError(f"loc [{loc.offset}, +{nbytes}) is outside region {loc.region} or misaligned")
        return entry.tensor[loc.offset : loc.offset + nbytes].view(dtype).view(meta.shape)

    def __len__(self) -> int:
        with self._lock:
            return len(self._regions)

    def close(self) -> None:
        with self._lock:
            entries = list(self._regions.values())
            self._regions.clear()
        for entry in entries:
            self._retire(entry)
