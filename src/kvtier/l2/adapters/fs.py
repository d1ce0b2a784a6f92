"""``{"type": "fs", "base_path": DIR, "max_capacity_gb": N, "durability": "fsync" | "none",
"eviction_policy": "LRU", "tenant_quota_gb": N, "tenant_quotas_gb": {DIGEST: N}}``: one record file per key on a
local filesystem.

* **Crash safety.** A record is written to a temporary name in its final directory, fsynced (``durability:
  "fsync"``, the default), the key's old record removed, the new one renamed to the final name, and the directory
  fsynced. A crash at any point leaves either the old record, the new one, or no record: never a torn one. Leftover
  temporary files are removed at start. Syncs are batched: a store batch writes all its files, syncs their data,
  renames them, then syncs the names: a batch of ``SYNCFS_MIN_BATCH`` files or more with two ``syncfs(2)`` calls
  (two journal commits per batch, not two per file; they also flush other dirty data of that filesystem, so a
  dedicated filesystem for L2 is best), a smaller one with one ``fdatasync`` per file and one ``fsync`` per
  directory. Durability: with ``"fsync"``, a batch whose store returned is on stable storage (the Store counts it in
  ``l2_written`` only then, and ``Store.flush()`` returns after it); with ``"none"`` it is as durable as the page
  cache.
* **Bounded.** ``max_capacity_gb`` bounds the bytes of records; the eviction policy picks victims.
  ``tenant_quota_gb`` bounds each tenant's (``cache_salt``'s) bytes, ``tenant_quotas_gb`` overrides it by salt
  digest (:mod:`kvtier.tenants`): a tenant at its quota evicts its own records first, in policy order.
* **Recovery.** The index (key, size) is rebuilt at start from each file's record header (``MAX_HEADER_SIZE``
  bytes read per file). A file whose header does not parse, whose size disagrees with its header, or whose
  name is not the one its key maps to, is removed. Payload checksums are checked by every load.
* **Disk full.** A batch that meets ``ENOSPC`` removes its temporary files and raises ``CapacityError``;
  records already stored keep loading.

* **One process per directory.** ``base_path`` holds a lock file (``.kvtier.lock``, ``flock``) taken by the
  first operation and held until ``close()``: the index lives in memory, so a second process (or a second
  adapter in this one) on the same ``base_path`` would evict and account behind its back. It is refused with a
  :class:`~kvtier.errors.ConfigError` naming the path and the holder's pid; share one kvtier server instead.

File names are ``<2 hex>/<32 hex>.kvtr``: a hash of the key (a key can be longer than a file name may be); the
record header holds the key itself, so a load checks it. A key carries only its salt's digest, so no file name
or record reveals a ``cache_salt``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3

from kvtier.config import ConfigReader
from kvtier.errors import CapacityError, ConfigError, IntegrityError
from kvtier.l2.adapters.base import (
    MISS,
    Buffer,
    KeyMatch,
    L2Adapter,
    Prepare,
    Progress,
    batched,
    scatter,
    total_length,
)
from kvtier.l2.record import MAX_HEADER_SIZE, parse_header
from kvtier.storage.policies import POLICIES, create_policy
from kvtier.tenants import TenantQuotas, UsageLedger, read_adapter_quotas, tenant_of_key_str

log = logging.getLogger(__name__)
GiB = 1 << 30
SUFFIX = ".kvtr"
TMP_SUFFIX = ".tmp"
LOCK_NAME = ".kvtier.lock"


#: Unlinks a purge keeps in flight (see FSAdapter._purge).
PURGE_THREADS = 16


def file_name(key: str) -> str:
    digest = blake3.blake3(key.encode()).hexdigest(length=16)
    return f"{digest[:2]}/{digest}{SUFFIX}"


class FSAdapter(L2Adapter):
    """Records as files under ``base_path``; see the module docstring."""

    #: batches the Store writes at once: renames and syncs block in the kernel (the GIL released) and overlap; 8
    #: kept up with 8 soak clients on a 2-vCPU VM where 4 fell behind (BENCHMARKS.md, issue 16)
    store_writers = 8

    def __init__(
        self,
        base_path: Path,
        capacity_bytes: int | None,
        durability: str = "fsync",
        eviction_policy: str = "LRU",
        quotas: TenantQuotas | None = None,
    ) -> None:
        super().__init__()
        self.base_path = base_path
        self._capacity = capacity_bytes
        self.fsync = durability == "fsync"
        self._policy = create_policy(eviction_policy, "eviction_policy")
        self._index: dict[str, int] = {}  # key -> record bytes on disk
        self._usage = UsageLedger(quotas, eviction_policy)  # per tenant and model: indexed records plus reservations
        self._used = 0  # bytes of indexed records plus room reserved by batches being written
        self._lock = threading.Lock()
        self._tmp_ids = itertools.count()
        self._lock_fd: int | None = None
        self.counts = {"evictions": 0, "removed_at_start": 0, "disk_full": 0, "quota_evictions": 0}

    @property
    def capacity_bytes(self) -> int | None:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        self._ensure_started()  # usage is known once the index is rebuilt
        return self._used

    def path_for(self, key: str) -> Path:
        """The file a key's record lives in (for tools and benchmarks that drop its pages from the cache)."""
        return self.base_path / file_name(key)

    # -- start: rebuild the index from the record headers -----------------------------------------------------
    def _start(self) -> None:
        self.base_path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        found: list[tuple[float, str, int]] = []
        for shard in sorted(self.base_path.iterdir()):
            if not shard.is_dir() or len(shard.name) != 2:
                continue
            for path in shard.iterdir():
                if path.name.endswith(TMP_SUFFIX):  # a write that a crash cut short: never renamed, never visible
                    self._remove(path, "unfinished write")
                    continue
                if not path.name.endswith(SUFFIX):
                    continue
                entry = self._read_index_entry(path)
                if entry is not None:
                    found.append(entry)
        # Oldest first, so the policy's order after a restart follows the files' ages.
        for _, key, size in sorted(found):
            self._add_locked(key, size)
        if self._capacity is not None and self._used > self._capacity:  # the capacity shrank since last run
            with self._lock:
                self._evict_locked(self._used - self._capacity)
        if self._usage.quotas.enabled:  # a tenant's quota shrank since last run: its oldest records go now
            with self._lock:
                for tenant in [t for t in self._usage.tenants() if self._usage.excess(t, 0) > 0]:
                    self._make_quota_room_locked({(tenant, ""): (0, 0)}, set())

    def _take_lock(self) -> None:
        fd = os.open(self.base_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"fs L2: base_path {str(self.base_path)!r} is in use by another kvtier adapter (pid {holder}); "
                "give each process its own base_path, or share one kvtier server"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _read_index_entry(self, path: Path) -> tuple[float, str, int] | None:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                head = f.read(MAX_HEADER_SIZE)
            meta, _, _ = parse_header(head, total_size=st.st_size)
            if file_name(meta.key) != f"{path.parent.name}/{path.name}":
                raise IntegrityError(f"record of key {meta.key!r} is under another key's name")
        except IntegrityError as exc:
            self._remove(path, str(exc))
            return None
        except OSError as exc:
            log.warning("fs L2: cannot read %s, skipped: %r", path, exc)
            return None
        return st.st_mtime, meta.key, st.st_size

    def _remove(self, path: Path, why: str) -> None:
        log.warning("fs L2: removing %s (%s)", path, why)
        self.counts["removed_at_start"] += 1
        path.unlink(missing_ok=True)

    # -- store ------------------------------------------------------------------------------------------------
    def _store(self, keys: Sequence[str], records: Sequence[Sequence[Buffer]]) -> None:
        sizes = [total_length(r) for r in records]
        need = sum(sizes)
        latest = sum(dict(zip(keys, sizes, strict=True)).values())  # a key twice in a batch: the last one stays
        if self._capacity is not None and latest > self._capacity:
            raise CapacityError(f"fs L2: batch of {latest} bytes exceeds max_capacity_gb ({self._capacity} bytes)")
        by_tenant = self._tenant_needs(keys, sizes)
        with self._lock:
            if self._usage.quotas.enabled:
                self._make_quota_room_locked(by_tenant, set(keys))
            if self._capacity is not None:
                # A record this batch replaces frees its bytes when the new one lands: credit them now, and never
                # pick one of the batch's own keys as a victim, so a re-store at full capacity evicts nothing else.
                replaced = sum(self._index.get(k, 0) for k in set(keys))
                self._evict_locked(self._used + latest - replaced - self._capacity, protect=set(keys))
            self._used += need  # reserved now, so concurrent batches cannot overshoot the capacity together
            for (tenant, model), (reserved, _) in by_tenant.items():
                self._usage.change(tenant, model, reserved)
        temps: list[tuple[Path, Path]] = []
        fds: list[int] = []
        try:
            # The whole batch is written before anything is synced, and each directory is synced once per batch
            # (not once per file): the kernel writes the batch back together, and the syncs of a batch find most
            # of it on disk already. Data before rename, rename before directory sync: a crash shows the old
            # record, the new one or none, never a torn one; when this returns with fsync, the batch is durable.
            for key, record in zip(keys, records, strict=True):
                final = self.path_for(key)
                tmp = final.with_name(f".{final.name}.{os.getpid()}.{next(self._tmp_ids)}{TMP_SUFFIX}")
                temps.append((tmp, final))
                fds.append(self._write_file(tmp, record))
            whole_fs = self.fsync and len(fds) >= SYNCFS_MIN_BATCH and _syncfs is not None
            if whole_fs:
                _sync_filesystem(fds[0])  # every file's data at once, before any of them gets its name
            elif self.fsync:
                for fd in fds:
                    os.fdatasync(fd)  # the data and the size that reads it back; the name is the directory's
            while fds:
                os.close(fds.pop())
            dirs = set()
            for tmp, final in temps:
                # The old record is removed, then the new one renamed to its name, rather than renamed over it:
                # ext4 (``auto_da_alloc``, on by default) writes back a file renamed over an existing one inside
                # the rename, which cost each store of a changed record its write to disk on the writer's time
                # (``durability: "none"``: 0.9 s instead of 0.45 s per GiB here). A load between the two steps
                # misses; a crash between them leaves no record (the data is already synced with "fsync").
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
                os.replace(tmp, final)
                dirs.add(final.parent)
            if whole_fs:
                _sync_dir_entries(self.base_path)  # every rename at once
            elif self.fsync:
                for d in dirs:  # the rename itself must survive a power cut
                    _fsync_dir(d)
        except BaseException as exc:
            for fd in fds:
                os.close(fd)
            for tmp, final in temps:
                for path in (tmp, final):  # renamed ones too: a failed batch leaves none of its keys
                    try:
                        path.unlink(missing_ok=True)
                    except OSError as cleanup:
                        log.warning("fs L2: cannot remove %s: %r", path, cleanup)
            with self._lock:
                self._used -= need
                for (tenant, model), (reserved, _) in by_tenant.items():
                    self._usage.change(tenant, model, -reserved)
                for key in keys:
                    self._drop_locked(key)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.counts["disk_full"] += 1
                raise CapacityError(f"fs L2: disk full under {self.base_path}: {exc}") from exc
            raise
        with self._lock:
            self._used -= need
            for (tenant, model), (reserved, _) in by_tenant.items():
                self._usage.change(tenant, model, -reserved)
            for key, size in zip(keys, sizes, strict=True):
                self._drop_locked(key)  # an overwritten record frees its old size
                self._add_locked(key, size)

    @staticmethod
    def _tenant_needs(keys: Sequence[str], sizes: Sequence[int]) -> dict[tuple[str, str], tuple[int, int]]:
        """Per (tenant, model) of a batch: the bytes it reserves (every record) and the bytes it will hold (the
        last record of each key)."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        latest = dict(zip(keys, sizes, strict=True))
        for key, size in zip(keys, sizes, strict=True):
            tm = tenant_of_key_str(key)
            reserved, kept = out.get(tm, (0, 0))
            out[tm] = (reserved + size, kept)
        for key, size in latest.items():
            tm = tenant_of_key_str(key)
            reserved, kept = out[tm]
            out[tm] = (reserved, kept + size)
        return out

    def _make_quota_room_locked(self, by_tenant: dict[tuple[str, str], tuple[int, int]], batch: set[str]) -> None:
        """Evict each tenant's own records (policy order, never one of the batch) until what the batch keeps of it
        fits its quota; a tenant whose batch alone exceeds its quota fails the whole batch (CapacityError)."""
        needs: dict[str, int] = {}
        for (tenant, _), (_, kept) in by_tenant.items():
            needs[tenant] = needs.get(tenant, 0) + kept
        for tenant, kept in needs.items():
            quota = self._usage.quotas.quota(tenant)
            if quota is None:
                continue
            if kept > quota:
                raise CapacityError(
                    f"fs L2: batch of {kept} bytes of tenant {tenant or '(no salt)'} exceeds its quota ({quota} bytes)"
                )
            replaced = sum(self._index.get(k, 0) for k in batch if tenant_of_key_str(k)[0] == tenant)
            excess = self._usage.bytes_of(tenant) + kept - replaced - quota
            evicted = []
            for key in self._usage.victims(tenant):
                if excess <= 0:
                    break
                if key in batch:
                    continue
                excess -= self._index.get(key, 0)
                self.path_for(key).unlink(missing_ok=True)
                self._drop_locked(key)
                self.counts["evictions"] += 1
                self.counts["quota_evictions"] += 1
                evicted.append(key)
            self._evicted(evicted)
            if excess > 0:  # the rest is this tenant's batches being written right now
                raise CapacityError(
                    f"fs L2: tenant {tenant or '(no salt)'} has no room for {kept} more bytes in its quota ({quota} "
                    "bytes): the rest is being written"
                )

    def _write_file(self, path: Path, record: Sequence[Buffer]) -> int:
        """Write ``record`` to a new file at ``path``; return its descriptor, still open (the caller syncs and
        closes it)."""
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            views = [memoryview(b).cast("B") for b in record]
            views = [v for v in views if len(v)]
            while views:  # writev may write less than asked (signals, large sizes): continue where it stopped
                _advance(views, os.writev(fd, views))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _forget_if_gone_locked(self, key: str) -> None:
        """A load found no file for ``key`` (removed behind our back, or a store between removing the old record
        and renaming the new one): forget the key unless its file is there now. A store updates the index under
        this lock after its rename, so a record renamed in since the load's open is never forgotten."""
        if not self.path_for(key).exists():
            self._drop_locked(key)

    def _drop_locked(self, key: str) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size
            self._policy.remove(key)
            tenant, model = tenant_of_key_str(key)
            self._usage.remove(tenant, key)
            self._usage.change(tenant, model, -size, -1)

    def _add_locked(self, key: str, size: int) -> None:
        self._index[key] = size
        self._used += size
        self._policy.insert(key)
        tenant, model = tenant_of_key_str(key)
        self._usage.insert(tenant, key)
        self._usage.change(tenant, model, size, 1)

    def _evict_locked(self, need: int, protect: set[str] | None = None) -> None:
        """Remove records, policy order, until ``need`` bytes are free; never one of ``protect``."""
        if need <= 0:
            return
        evicted = []
        for key in self._policy.victims():  # a walk that allows removals: no copy of the whole order
            if need <= 0:
                break
            if protect and key in protect:
                continue
            size = self._index.get(key, 0)
            self.path_for(key).unlink(missing_ok=True)
            self._drop_locked(key)
            self.counts["evictions"] += 1
            evicted.append(key)
            need -= size
        self._evicted(evicted)

    # -- load and the rest ------------------------------------------------------------------------------------
    def _load(self, keys: Sequence[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        with self._opened(keys) as fds:
            out = []
            for key, dst, maybe_fd in zip(keys, dsts, fds, strict=True):
                if maybe_fd is None:
                    with self._lock:
                        self._forget_if_gone_locked(key)
                    out.append(MISS)
                    continue
                size = os.fstat(maybe_fd).st_size
                if size <= total_length(dst):
                    _read_exact(maybe_fd, dst, size)
                with self._lock:
                    self._access_locked(key)
                out.append(size)
            return out

    def _load_with(self, keys: Sequence[str], head_size: int, prepare: Prepare) -> list[int]:
        """One read per record: ``pread`` of the head, ``prepare``, then ``preadv`` of the rest straight into the
        buffers it gave (a raw payload lands in its destination tensor); the file is opened once."""
        with self._opened(keys) as fds:
            out = []
            for i, (key, maybe_fd) in enumerate(zip(keys, fds, strict=True)):
                if maybe_fd is None:
                    with self._lock:
                        self._forget_if_gone_locked(key)
                    out.append(MISS)
                    continue
                size = os.fstat(maybe_fd).st_size
                head = os.pread(maybe_fd, min(head_size, size), 0)
                bufs = prepare(i, memoryview(head), size)
                got = size
                if bufs is not None:
                    scatter(head, bufs)
                    if len(head) < size:
                        # a file cut short under us (by hand: our own writes replace whole files) reads short: the
                        # caller sees the length differ, a miss, instead of a failed batch
                        end = min(size, total_length(bufs))
                        reached = _read_exact(maybe_fd, bufs, end, start=len(head), eof_ok=True)
                        got = size if reached == end else reached
                with self._lock:
                    self._access_locked(key)
                out.append(got)
            return out

    def _access_locked(self, key: str) -> None:
        self._policy.access(key)
        if key in self._index:
            self._usage.access(tenant_of_key_str(key)[0], key)

    @contextlib.contextmanager
    def _opened(self, keys: Sequence[str]) -> Iterator[list[int | None]]:
        """The batch's files opened for reading (``None``: no such file), closed on the way out. The kernel is
        asked to start reading all of them now: the disk then works on the next records while this thread checks
        and decodes the current one."""
        fds: list[int | None] = []
        try:
            for key in keys:
                try:
                    fd = os.open(self.path_for(key), os.O_RDONLY)
                except FileNotFoundError:
                    fds.append(None)
                    continue
                fds.append(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            yield fds
        finally:
            for open_fd in fds:
                if open_fd is not None:
                    os.close(open_fd)

    def _will_load(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                fd = os.open(self.path_for(key), os.O_RDONLY)
            except OSError:
                continue  # a miss or an unreadable file: the load itself will say so
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def _read_heads(self, keys: Sequence[str], size: int) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            try:
                with open(self.path_for(key), "rb") as f:
                    out.append(f.read(size))
            except FileNotFoundError:
                out.append(None)
        return out

    def _contains(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def _delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.path_for(key).unlink(missing_ok=True)
            with self._lock:
                self._drop_locked(key)

    def _list_keys(self, match: KeyMatch, batch_size: int) -> Iterator[list[str]]:
        # The index is the directory scan made at start (every record file's header read and checked) kept up to
        # date since: listing it finds every record without reading a directory again. The base_path lock makes
        # this adapter the directory's only writer, so nothing is on disk that the index does not name.
        with self._lock:
            snapshot = list(self._index)
        return batched((k for k in snapshot if match.matches(k)), batch_size)

    def _purge(self, match: KeyMatch, batch_size: int, progress: Progress | None) -> int:
        deleted = 0
        # A batch's unlinks go in parallel: one at a time, a busy ext4 disk here unlinked 470 files a second; with
        # 16 in flight, 19,000 (each waits on the journal; different shard directories do not serialize).
        with ThreadPoolExecutor(PURGE_THREADS, thread_name_prefix="kvtier-fs-purge") as pool:
            for batch in self._list_keys(match, batch_size):
                list(pool.map(self._unlink, batch))
                with self._lock:
                    for key in batch:
                        self._drop_locked(key)
                if self.fsync:  # a purged record must not come back after a crash: make the unlinks durable
                    list(pool.map(_fsync_dir, {self.path_for(k).parent for k in batch}))
                deleted += len(batch)
                if progress is not None:
                    progress(deleted, batch)
        return deleted

    def _unlink(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        self._ensure_started()
        with self._lock:
            records = len(self._index)
            tenants, models = self._usage.tenants(), self._usage.models()
        return {**super().stats(), "records": records, **self.counts, "tenants": tenants, "models": models}


def _read_exact(fd: int, dst: Sequence[Buffer], size: int, start: int = 0, eof_ok: bool = False) -> int:
    """Fill bytes ``[start, size)`` of the concatenation of ``dst`` from the same bytes of ``fd`` (preadv,
    continued after short reads); return the offset reached. An early end of file raises ``EIO``, or with
    ``eof_ok`` ends the read there."""
    views = []
    skip = start
    left = size - start
    for b in dst:
        v = memoryview(b).cast("B")
        if left <= 0:
            break
        if skip >= len(v):
            skip -= len(v)
            continue
        v = v[skip:]
        skip = 0
        views.append(v[: min(len(v), left)])
        left -= len(views[-1])
    offset = start
    while views:
        n = os.preadv(fd, views, offset)
        if n == 0:
            if eof_ok:
                return offset
            raise OSError(errno.EIO, "record file shrank while being read")
        offset += n
        _advance(views, n)
    return offset


def _advance(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes from a list of I/O vectors, after a short writev / preadv."""
    while n and views:
        if n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][n:]
            n = 0


#: a batch of at least this many files is synced with two syncfs(2) calls (data, then names) instead of one
#: fdatasync per file and one fsync per directory: two journal commits per batch instead of two per file
SYNCFS_MIN_BATCH = 4


def _load_syncfs() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):  # not Linux / not glibc: per-file fsync it is
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def _sync_filesystem(fd: int) -> None:
    """syncfs(2) of the filesystem holding ``fd``: all its dirty data and metadata written and waited for (ctypes
    releases the GIL for the call)."""
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def _sync_dir_entries(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _sync_filesystem(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fs_factory(config: dict[str, Any], where: str) -> FSAdapter:
    reader = ConfigReader(config, where)
    base = reader.string("base_path")
    if not base:
        raise ConfigError(f"{where}.base_path: expected a directory path, got an empty string")
    gb = reader.number("max_capacity_gb", None, min=0.0)
    durability = reader.string("durability", "fsync", choices=("fsync", "none"))
    policy = reader.string("eviction_policy", "LRU", choices=list(POLICIES))
    quotas = read_adapter_quotas(reader, where)
    reader.finish()
    path = Path(base).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where}.base_path: {str(path)!r} exists and is not a directory")
    capacity = None if gb is None else max(1, int(gb * GiB))
    return FSAdapter(path, capacity, durability, policy, quotas)
