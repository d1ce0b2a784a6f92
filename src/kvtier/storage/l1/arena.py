"""The L1 arena: one region of ``l1_size_gb`` bytes, mapped once, backed as the operator chooses.

Backings (``l1_backing``):

* ``anonymous`` (default): private anonymous memory. Nothing appears in ``/dev/shm`` or any filesystem, and the
  kernel takes every page back when the process ends, however it ends (SIGKILL included).
* ``memfd``: a ``memfd_create`` file (shared memory without a name in ``/dev/shm``, not limited by the size of a
  container's ``/dev/shm`` mount); also gone with the process.
* ``hugepages``: a ``memfd`` on hugetlbfs (2 MiB pages) when the kernel has enough huge pages reserved
  (``vm.nr_hugepages``); otherwise anonymous memory with transparent huge pages requested (``MADV_HUGEPAGE``),
  with a warning that says why. Never a mapping that could SIGBUS on first touch.

The region is mapped with ``MAP_NORESERVE`` and no page is touched until an object is written there, so a
100 GiB setting starts at once on a 24 GiB host: the memory the process holds tracks the bytes in use (see
:class:`MemoryBudget` for how the pool stays below what the host or the container can give).

Older kvtier versions kept L1 as a file ``/dev/shm/kvtier-l1-<pid>-<id>``, which a crashed process left behind;
:func:`remove_stale_shm_files` deletes those of processes that no longer exist, at every start.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import platform
import re
import time
from pathlib import Path

import torch

from kvtier.errors import ConfigError

log = logging.getLogger(__name__)

BACKINGS = ("anonymous", "memfd", "hugepages")
SHM_DIR = Path("/dev/shm")
_STALE_NAME = re.compile(r"kvtier-l1-(\d+)-[0-9a-f]+")
# Python's mmap module does not export MAP_NORESERVE before 3.13; its value is 0x4000 on x86 and Arm Linux.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if platform.machine() in {"x86_64", "aarch64", "arm64"} else 0)
_HUGE_PAGE = 2 << 20


class Arena:
    """``size`` bytes of lazily touched memory as one flat ``torch.uint8`` tensor (:attr:`buffer`).

    :meth:`release_pages` gives the pages of a byte range back to the kernel (the range then reads as zeros);
    the pool calls it for free memory on ``clear`` and when the host runs short.
    """

    def __init__(self, size: int, backing: str = "anonymous") -> None:
        if size < 1:
            raise ConfigError(f"l1_size_gb: the pool needs at least 1 byte, got {size} bytes")
        if backing not in BACKINGS:
            raise ConfigError(f"l1_backing: expected one of {list(BACKINGS)}, got {backing!r}")
        remove_stale_shm_files()
        self.size = size
        self.requested_backing = backing
        self._shared = backing != "anonymous"  # MADV_DONTNEED does not free shmem pages; MADV_REMOVE does
        self._mmap: mmap.mmap | None = None
        if backing == "hugepages":
            self._mmap, reason = self._map_hugetlb(size)
            if self._mmap is None:
                self._shared = False
                self._mmap = self._map_anonymous(size)
                self.backing = _request_thp(self._mmap, reason)
            else:
                self.backing = "hugepages"
        elif backing == "memfd":
            self._mmap = self._map_memfd(size, 0)
            self.backing = "memfd"
        else:
            self._mmap = self._map_anonymous(size)
            self.backing = "anonymous"
        self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8)

    # -- mappings ---------------------------------------------------------------------------------------------
    @staticmethod
    def _map_anonymous(size: int) -> mmap.mmap:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        try:
            return mmap.mmap(-1, size, flags=flags)
        except OSError as exc:
            # vm.overcommit_memory=2 (strict) ignores MAP_NORESERVE: the whole size must be committable.
            raise ConfigError(
                f"l1_size_gb: the kernel refused to map {size / (1 << 30):.2f} GiB ({exc.strerror}); with "
                "vm.overcommit_memory=2 the size must fit the commit limit"
            ) from exc

    @staticmethod
    def _map_memfd(size: int, extra_flags: int) -> mmap.mmap:
        fd = os.memfd_create("kvtier-l1", os.MFD_CLOEXEC | extra_flags)
        try:
            os.ftruncate(fd, size)  # sparse: pages are allocated when first written
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)  # the mapping keeps the file alive; nothing else can reach it

    def _map_hugetlb(self, size: int) -> tuple[mmap.mmap | None, str]:
        """A hugetlbfs memfd when enough huge pages are reserved for all of ``size``, else ``None`` and why."""
        free_pages = _meminfo().get("HugePages_Free", 0)
        rounded = -(-size // _HUGE_PAGE) * _HUGE_PAGE
        if free_pages * _HUGE_PAGE < rounded:
            return None, f"{free_pages} free huge pages of 2 MiB (vm.nr_hugepages), {rounded // _HUGE_PAGE} needed"
        try:
            # Without MAP_NORESERVE the kernel reserves every huge page now: a later fault cannot SIGBUS.
            return self._map_memfd(rounded, os.MFD_HUGETLB), ""
        except OSError as exc:
            return None, f"hugetlbfs refused the mapping ({exc.strerror})"

    # -- pages ------------------------------------------------------------------------------------------------
    def release_pages(self, start: int, end: int) -> int:
        """Give the whole pages inside ``[start, end)`` back to the kernel; returns the bytes released."""
        if self._mmap is None:
            return 0
        page = _HUGE_PAGE if self.backing == "hugepages" else mmap.PAGESIZE
        lo = -(-start // page) * page
        hi = min(end, self.size) // page * page
        if hi <= lo:
            return 0
        advice = mmap.MADV_REMOVE if self._shared else mmap.MADV_DONTNEED
        try:
            self._mmap.madvise(advice, lo, hi - lo)
        except OSError as exc:  # an old kernel without MADV_REMOVE for this file type: keep the pages
            log.debug("L1: madvise failed (%s); pages kept", exc)
            return 0
        return hi - lo

    def close(self) -> None:
        """Unmap; idempotent. Views handed out before must no longer be used."""
        if self._mmap is None:
            return
        self.buffer = torch.empty(0, dtype=torch.uint8)
        mm, self._mmap = self._mmap, None
        # A tensor view may still export the buffer; the mapping then goes when the last view is collected.
        with contextlib.suppress(BufferError):
            mm.close()


def _request_thp(mm: mmap.mmap, reason: str) -> str:
    """Ask for transparent huge pages on ``mm`` when the kernel allows it; returns the backing's name."""
    mode = _read_text("/sys/kernel/mm/transparent_hugepage/enabled")
    active = re.search(r"\[(\w+)\]", mode or "")
    if active and active.group(1) in {"always", "madvise"} and hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
        log.warning("l1_backing=hugepages: %s; using anonymous memory with transparent huge pages instead", reason)
        return "anonymous+thp"
    log.warning(
        "l1_backing=hugepages: %s, and transparent huge pages are off (%s); using anonymous memory with normal pages",
        reason,
        active.group(1) if active else "unavailable",
    )
    return "anonymous"


class MemoryBudget:
    """How far the pool may grow: ``min(size, what the cgroup or the host can still give minus a headroom)``.

    The pool's pages below its high-water mark are already resident, so they never count against it; only the
    growth past it does. The answer is cached and re-read when the pool grows by more than :attr:`step` bytes
    or :attr:`interval` seconds have passed, so a busy pool reads two small proc files now and then, not per
    object.
    """

    step = 64 << 20
    interval = 1.0

    def __init__(self, size: int, headroom: int | None = None, reserved: bool = False) -> None:
        self.size = size
        self._headroom = headroom
        self._reserved = reserved  # hugetlbfs pages were reserved for all of it at mmap: nothing to check
        self._limit = size
        self._checked_at = -1e9
        self._checked_hw = -(1 << 62)

    def headroom(self, total: int) -> int:
        """Bytes left to the rest of the host: 5 % of the limit, at least 256 MiB."""
        return self._headroom if self._headroom is not None else max(256 << 20, total // 20)

    def limit(self, high_water: int) -> int:
        """The highest arena offset the pool may use now, given that ``[0, high_water)`` is already resident."""
        if self._reserved:
            return self.size
        now = time.monotonic()
        if now - self._checked_at < self.interval and high_water - self._checked_hw < self.step:
            return self._limit
        self._checked_at, self._checked_hw = now, high_water
        available, total = available_memory()
        room = max(0, available - self.headroom(total))
        self._limit = min(self.size, high_water + room)
        return self._limit

    def refresh(self) -> None:
        """Forget the cached answer (after pages were given back, or in tests)."""
        self._checked_at = -1e9


def available_memory() -> tuple[int, int]:
    """``(bytes this process may still take, the total they are part of)``: the tighter of the memory cgroup
    (v2 ``memory.max - memory.current``, v1 ``limit_in_bytes - usage_in_bytes``) and the host's
    ``MemAvailable``. Unlimited cgroups and unreadable files fall back to the host."""
    info = _meminfo()
    total = info.get("MemTotal", 0) * 1024 or (1 << 62)
    best = (info.get("MemAvailable", info.get("MemFree", 0)) * 1024 or total, total)
    for limit_file, usage_file in _cgroup_files():
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is None or usage is None or limit >= 1 << 60:
            continue
        if limit - usage < best[0]:
            best = (max(0, limit - usage), limit)
    return best


def _cgroup_files() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    text = _read_text("/proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.strip().lstrip("/")
        if controllers == "":  # cgroup v2
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                for base in {os.path.join(root, path), root}:
                    out.append((f"{base}/memory.max", f"{base}/memory.current"))
        elif "memory" in controllers.split(","):  # cgroup v1; inside a container the own group is the root
            for base in {os.path.join("/sys/fs/cgroup/memory", path), "/sys/fs/cgroup/memory"}:
                out.append((f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes"))
    return out


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read_text("/proc/meminfo") or "").splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0])  # kB, or a count for HugePages_*
    return out


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return 1 << 62
    return int(text) if text.isdigit() else None


def remove_stale_shm_files(directory: Path = SHM_DIR) -> int:
    """Remove ``kvtier-l1-<pid>-<id>`` files that older kvtier versions left in ``directory`` when their process
    died; returns how many bytes of memory that gave back. A file whose process still runs is kept.

    Removing the name of a file that is in fact still mapped (a process in another PID namespace sharing this
    ``/dev/shm``) is harmless: its mapping stays valid, and the memory goes when that process unmaps it."""
    freed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        m = _STALE_NAME.fullmatch(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        path = directory / name
        try:
            blocks = os.stat(path).st_blocks
            path.unlink()
        except OSError:  # another user's file, or removed by a concurrent start
            continue
        freed += blocks * 512
        log.info("L1: removed %s, left by a process that no longer runs", path)
    return freed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
