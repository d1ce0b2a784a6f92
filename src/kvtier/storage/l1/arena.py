"""The L1 arena: one shared-memory region of ``l1_size_gb``, mapped once.

It is a file on the shared-memory filesystem (``/dev/shm``) sized with ``ftruncate``: no page is allocated until
it is first written, so a 100 GB setting starts instantly, and a same-host process (a server client) can map the
same file by its :attr:`Arena.path` to read objects without a copy through a socket. The file is removed by
:meth:`Arena.close`.

Because pages arrive lazily, a size larger than the shared-memory filesystem's free space would fail late (a
SIGBUS on first touch of a page that cannot be backed); such a size is refused at start instead.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import uuid
from pathlib import Path

import torch

from kvtier.errors import ConfigError

SHM_DIR = Path("/dev/shm")


class Arena:
    """``size`` bytes of shared memory as one flat ``torch.uint8`` tensor (:attr:`buffer`)."""

    def __init__(self, size: int, directory: Path | None = None) -> None:
        if size < 1:
            raise ConfigError(f"l1_size_gb: the pool needs at least 1 byte, got {size} bytes")
        base = directory or (SHM_DIR if SHM_DIR.is_dir() else Path(tempfile.gettempdir()))
        st = os.statvfs(base)
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise ConfigError(
                f"l1_size_gb: {size / (1 << 30):.2f} GiB asked, but {base} has only {free / (1 << 30):.2f} GiB free "
                "(the pool is shared memory there)"
            )
        self.size = size
        self.path = base / f"kvtier-l1-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: pages are allocated when first written
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def close(self) -> None:
        """Unmap and remove the file; idempotent. Views handed out before must no longer be used."""
        if self._mmap is None:
            return
        self.buffer = torch.empty(0, dtype=torch.uint8)
        mm, self._mmap = self._mmap, None
        # A tensor view may still export the buffer; the mapping then goes when the last view is collected.
        with contextlib.suppress(BufferError):
            mm.close()
        self.path.unlink(missing_ok=True)
