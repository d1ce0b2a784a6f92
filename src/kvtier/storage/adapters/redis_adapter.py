"""``{"type": "redis", "url": "redis://HOST:PORT/DB", ...}``: records in Redis or Valkey, shared by every kvtier
server that points at the same server and ``key_prefix``.

Config (read with a :class:`~kvtier.config.ConfigReader`; a bad value fails at start naming the field):

* ``url`` (required): ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://...`` (TLS) or
  ``unix:///path/redis.sock[?db=N]``. Password, TLS and query options (``?ssl_cert_reqs=none``,
  ``?ssl_ca_certs=...``) go to redis-py as they are. The password never appears in logs or stats.
* ``cluster`` (``false``): a Redis Cluster behind ``url`` (any node); see "Cluster" below.
* ``key_prefix`` (``"kvtier"``): every record is ``{key_prefix}:{ObjectKey.to_str()}``; the object key carries
  model name, kv rank, ``cache_salt`` and chunk hash, so one Redis serves several models and tenants.
* ``max_capacity_gb`` (none): bound on the bytes of records under ``key_prefix``, shared by every kvtier server
  using that prefix; the least recently stored or loaded records are evicted past it.
* ``timeout_s`` (10), ``connect_timeout_s`` (5): socket timeouts; ``max_connections`` (64): the pool's size.

Layout in Redis. Records are plain string values under ``PREFIX:KEY``. Next to them kvtier keeps its accounting
under ``{PREFIX:@}`` (literal braces: a cluster hash tag, so that the four share a slot): ``{PREFIX:@}sizes``
(hash: record key -> bytes), ``{PREFIX:@}used`` (their sum), ``{PREFIX:@}lru`` (sorted set by recency) and
``{PREFIX:@}clock``. A prefix has no braces, so no record key can clash with them.

Atomicity. A store batch is one pipeline: a ``SET`` per record, then a Lua script that accounts the records that
landed and evicts. A record is one ``SET`` of the whole record, so a reader never sees half of one. When any
command of the batch fails (``OOM`` under ``maxmemory``, ...), the records of the batch that did land are deleted
with their accounting before the error is raised: a failed batch leaves nothing (a reader that looked in between
saw whole, valid records). ``MULTI``/``EXEC`` would hide even that moment, but measured 15-20 % slower for 4 MiB
values on this machine, and buys nothing a reader can use. Each value is sent from its own buffers (record header
and tensor memory) straight to the socket: no joined copy on the client. If the connection drops mid-batch the
outcome is unknown to the client: the batch is reported failed and its keys are deleted at the next chance (by
the serde layer); whatever is found meanwhile is whole, checked records.

Loads. A batch of ``GET`` commands is one pipeline (at most ``_LOAD_WINDOW`` bytes of destinations in flight) whose
replies are received from the socket straight into the caller's buffers: no ``bytes`` object per value, no copy.
A value of another type under a record key reads as an empty record, so the serde layer counts it damaged and
removes it.

Capacity. Two lines of defence, documented in README.md: ``max_capacity_gb`` bounds the record bytes (the
accounting script evicts LRU records atomically as it accounts a batch, so the accounted bytes never exceed the
bound; the server's memory holds at most one batch in flight above it), and the server's own ``maxmemory``
bounds its memory. With ``maxmemory-policy noeviction`` a full server answers
``OOM``: the batch fails with :class:`~kvtier.errors.CapacityError` and kvtier keeps serving; with
``allkeys-lru`` Redis may evict records itself, and the accounting of such a record is dropped when a load or an
eviction meets it.

Faults. Connection refused, timeouts and a server restart fail the batch at hand with the builtin
``ConnectionError`` / ``TimeoutError`` (both ``OSError``), counted in :meth:`RedisAdapter.stats` and logged once
per outage, not per batch or key. Every operation is idempotent, so a batch that hits a dead pooled connection is
retried once on a fresh one; after a restart of Redis the next batch reconnects by itself.

Cluster. With ``cluster: true`` records spread over the cluster's nodes by key slot (redis-py's ``RedisCluster``
routes each command). A batch is a pipeline of ``SET``\\ s (each record atomic) whose keys are deleted again
when any fails; values are joined into one buffer first and loads go through redis-py's parser (its cluster
pipeline sends one buffer per value and owns the sockets). The accounting keys share one slot (hash tag
``{key_prefix:@}``) and are updated by a script after the records landed, so ``used_bytes`` holds; a script
cannot reach records on other slots, so ``max_capacity_gb`` is refused with a cluster: bound each node with
``maxmemory`` + ``allkeys-lru`` instead.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from kvtier.config import ConfigReader
from kvtier.errors import BatchError, CapacityError, ConfigError
from kvtier.storage.adapters.base import MISS, Buffer, L2Adapter, scatter, total_length

log = logging.getLogger(__name__)

GiB = 1 << 30
T = TypeVar("T")

# Values above this many bytes go to the socket as their own buffer; smaller pieces are coalesced into one send.
_INLINE_LIMIT = 16 * 1024
# Failures other than an outage (a full server fails every store) are logged at most this often per kind.
_LOG_EVERY_S = 60.0
# A load pipeline fetches at most this many bytes of destinations at once: the server buffers the replies of a
# pipeline (and redis-py's cluster path holds each value as a fresh ``bytes``), so a batch of a hundred 32 MiB
# chunks must not be in flight at the same time.
_LOAD_WINDOW = 256 << 20

# KEYS: used, sizes, lru, clock. ARGV: capacity (-1: none), local (1: records share this node, 0: a cluster),
# n, then n pairs (record key, size). Accounts the records the same pipeline just SET (on one node: those that
# landed; a cluster script may not touch keys of other slots, and it runs only after every SET succeeded), then
# evicts least recently used records (never one of this batch) until the bound holds (one node only).
# Returns {records evicted, bytes used}.
_ACCOUNT_SCRIPT = """
local used_k, sizes_k, lru_k, clock_k = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local cap = tonumber(ARGV[1])
local here = ARGV[2] == '1'
local n = tonumber(ARGV[3])
local clock = redis.call('INCRBY', clock_k, n) - n
local batch = {}
for i = 0, n - 1 do
  local key, size = ARGV[4 + 2 * i], tonumber(ARGV[5 + 2 * i])
  local old = redis.call('HGET', sizes_k, key)
  if old then redis.call('DECRBY', used_k, old) end
  if not here or redis.call('EXISTS', key) == 1 then
    redis.call('HSET', sizes_k, key, size)
    redis.call('INCRBY', used_k, size)
    redis.call('ZADD', lru_k, clock + i + 1, key)
    batch[key] = true
  elseif old then
    redis.call('HDEL', sizes_k, key)
    redis.call('ZREM', lru_k, key)
  end
end
local evicted = 0
if cap >= 0 and here then
  while tonumber(redis.call('GET', used_k) or '0') > cap do
    local victim = redis.call('ZRANGE', lru_k, 0, 0)[1]
    if not victim or batch[victim] then break end
    redis.call('ZREM', lru_k, victim)
    local size = redis.call('HGET', sizes_k, victim)
    if size then
      redis.call('HDEL', sizes_k, victim)
      redis.call('DECRBY', used_k, size)
    end
    redis.call('UNLINK', victim)
    evicted = evicted + 1
  end
end
return {evicted, tonumber(redis.call('GET', used_k) or '0')}
"""

# KEYS: used, sizes, lru. ARGV: unlink (1: delete the records too, 0: only their accounting, as a cluster must),
# then record keys. Returns the bytes used.
_DELETE_SCRIPT = """
local used_k, sizes_k, lru_k = KEYS[1], KEYS[2], KEYS[3]
local unlink = ARGV[1] == '1'
for i = 2, #ARGV do
  local key = ARGV[i]
  if unlink then redis.call('UNLINK', key) end
  local size = redis.call('HGET', sizes_k, key)
  if size then
    redis.call('HDEL', sizes_k, key)
    redis.call('DECRBY', used_k, size)
  end
  redis.call('ZREM', lru_k, key)
end
return tonumber(redis.call('GET', used_k) or '0')
"""

# KEYS: used, sizes, lru, clock. ARGV: record keys just loaded. A present record becomes the most recently used;
# the accounting of an absent one (evicted by the server's own policy, deleted by hand) is dropped. Returns the
# bytes used.
_TOUCH_SCRIPT = """
local used_k, sizes_k, lru_k, clock_k = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local clock = redis.call('INCRBY', clock_k, #ARGV) - #ARGV
for i, key in ipairs(ARGV) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('ZADD', lru_k, 'XX', clock + i, key)
  else
    local size = redis.call('HGET', sizes_k, key)
    if size then
      redis.call('HDEL', sizes_k, key)
      redis.call('DECRBY', used_k, size)
      redis.call('ZREM', lru_k, key)
    end
  end
end
return tonumber(redis.call('GET', used_k) or '0')
"""


def redact_url(url: str) -> str:
    """``url`` without its password (for logs, stats and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_url(url: str, cluster: bool, where: str) -> None:
    """Reject a URL redis-py would not accept, naming the field; pure parsing, no connection."""
    from redis.connection import parse_url

    field = f"{where}.url"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{field}: expected a redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH URL, "
            f"got scheme {scheme!r} in {redact_url(url)!r}"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
        kwargs: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc} in {redact_url(url)!r}") from exc
    if scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{field}: a unix:// URL needs a socket path, got {redact_url(url)!r}")
        if cluster:
            raise ConfigError(f"{field}: a cluster is reached over TCP (redis:// or rediss://), not a unix socket")
    else:
        if not parts.hostname:
            raise ConfigError(f"{field}: expected a host name in {redact_url(url)!r}")
        if port == 0:
            raise ConfigError(f"{field}: expected a port in 1-65535, got 0")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ConfigError(f"{field}: the path must be a database number (/0, /1, ...), got {parts.path!r}")
    db = kwargs.get("db", 0)
    if not isinstance(db, int) or db < 0:
        raise ConfigError(f"{field}: expected a database number >= 0, got {db!r}")
    if cluster and db != 0:
        raise ConfigError(f"{field}: a Redis Cluster has only database 0, got {db}")


def check_key_prefix(prefix: str, where: str) -> None:
    if not 1 <= len(prefix) <= 200 or any(c.isspace() or not c.isprintable() or c in "{}@" for c in prefix):
        raise ConfigError(
            f"{where}.key_prefix: expected 1-200 printable characters without spaces, '{{', '}}' or '@', got {prefix!r}"
        )


class _Outage:
    """Counts failures by kind and logs an outage once, when it starts and when it ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.down_since_failures = 0
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.counts = {
            "batches": 0,
            "failed_batches": 0,
            "connection_errors": 0,
            "timeouts": 0,
            "oom_errors": 0,
            "other_errors": 0,
            "outages": 0,
            "evictions": 0,
        }

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    def ok(self) -> None:
        with self._lock:
            self.counts["batches"] += 1
            failures, self.down_since_failures = self.down_since_failures, 0
        if failures:
            log.warning("L2 redis %s: reachable again after %d failed batch(es)", self.name, failures)

    @property
    def down(self) -> bool:
        return self.down_since_failures > 0

    def failed(self, kind: str, exc: BaseException) -> None:
        """Count a failed batch and log it sparingly: an outage once when it starts (and once when it ends, in
        :meth:`ok`); other failures (a full server fails every store) at most once a minute per kind."""
        now = time.monotonic()
        with self._lock:
            self.counts["batches"] += 1
            self.counts["failed_batches"] += 1
            self.counts[kind] += 1
            unreachable = kind in ("connection_errors", "timeouts")
            if unreachable:
                first = self.down_since_failures == 0
                if first:
                    self.counts["outages"] += 1
                self.down_since_failures += 1
                suppressed = 0
            else:
                first = now - self._last_logged.get(kind, -_LOG_EVERY_S) >= _LOG_EVERY_S
                suppressed = self._suppressed.get(kind, 0)
                if first:
                    self._last_logged[kind] = now
                    self._suppressed[kind] = 0
                else:
                    self._suppressed[kind] = suppressed + 1
        if not first:
            return
        if unreachable:
            log.warning("L2 redis %s: unreachable (%s); its batches fail until it is back", self.name, exc)
        else:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            log.warning("L2 redis %s: batch failed: %s%s", self.name, exc, more)


class RedisAdapter(L2Adapter):
    """Records as Redis string values under ``{key_prefix}:``; see the module docstring for the whole contract."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        key_prefix: str = "kvtier",
        capacity_bytes: int | None = None,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        super().__init__()
        if cluster and capacity_bytes is not None:
            raise ConfigError("max_capacity_gb is not supported with cluster: true (use maxmemory per node)")
        self.url = url
        self.cluster = cluster
        self.key_prefix = key_prefix
        self._capacity = capacity_bytes
        self._timeout = timeout_s
        self._connect_timeout = connect_timeout_s
        self._max_connections = max_connections
        self._prefix = f"{key_prefix}:"
        # The hash tag puts the accounting keys in one cluster slot, so one script can update them together.
        meta = "{" + key_prefix + ":@}"
        self._meta = [f"{meta}used", f"{meta}sizes", f"{meta}lru", f"{meta}clock"]
        self._health = _Outage(redact_url(url))
        self._client: Any = None
        self._last_used = 0

    # -- resources --------------------------------------------------------------------------------------------
    def _start(self) -> None:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # kvtier retries once itself (every operation is idempotent); redis-py's own default retries with
        # exponential backoff would stretch each failed batch of an outage to seconds.
        options: dict[str, Any] = {
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            # RESP2 unless the URL asks otherwise (?protocol=3): no out-of-band push messages can come between the
            # replies that the load path reads itself.
            "protocol": 2,
        }
        if self.cluster:
            from redis.cluster import RedisCluster

            self._client = RedisCluster.from_url(self.url, max_connections=self._max_connections, **options)
        else:
            from redis import BlockingConnectionPool, Redis

            pool = BlockingConnectionPool.from_url(
                self.url, max_connections=self._max_connections, timeout=self._timeout, **options
            )
            self._client = Redis(connection_pool=pool)

    def _close(self) -> None:
        if self.cluster:
            self._client.close()
        else:
            self._client.connection_pool.disconnect()

    # -- error handling ---------------------------------------------------------------------------------------
    def _run(self, op: Callable[[], T]) -> T:
        """Run one batch operation: retry once on a dead connection, translate and count errors."""
        from redis import exceptions as rx

        for attempt in (0, 1):
            try:
                result = op()
            except rx.TimeoutError as exc:
                self._health.failed("timeouts", exc)
                raise TimeoutError(f"redis {self._health.name}: {exc}") from exc
            except rx.ConnectionError as exc:
                # After a server restart the pool may hand out a socket that is already dead: one fresh try.
                if attempt == 0 and not isinstance(exc, rx.AuthenticationError):
                    continue
                self._health.failed("connection_errors", exc)
                raise ConnectionError(f"redis {self._health.name}: {exc}") from exc
            except CapacityError as exc:
                self._health.failed("oom_errors", exc)
                raise
            except (rx.RedisError, BatchError) as exc:
                if _is_oom(exc):
                    self._health.failed("oom_errors", exc)
                    raise CapacityError(f"redis {self._health.name} is out of memory: {exc}") from exc
                self._health.failed("other_errors", exc)
                if isinstance(exc, BatchError):
                    raise
                raise BatchError(f"redis {self._health.name}: {exc}") from exc
            self._health.ok()
            return result
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    # -- the bytes contract -----------------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return self._prefix + key

    @property
    def accounting_keys(self) -> list[str]:
        """The Redis keys of this prefix's accounting (used, sizes, lru, clock): what remains of the prefix once
        its records are deleted; drop them to remove every trace of a prefix."""
        return list(self._meta)

    @property
    def capacity_bytes(self) -> int | None:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes of records under the prefix, shared by every server using it; the last value seen while the
        server is unreachable (stats must not fail during an outage)."""
        if not self.started or self._closed or self._health.down:
            return self._last_used  # no connect attempt (up to connect_timeout_s) while the server is known down
        from redis import exceptions as rx

        try:
            value = self._client.get(self._meta[0])
        except rx.RedisError:
            return self._last_used
        self._last_used = int(value or 0)
        return self._last_used

    def _store(self, keys: Sequence[str], records: Sequence[Sequence[Buffer]]) -> None:
        full = [self._key(k) for k in keys]
        views = [[memoryview(b).cast("B") for b in r] for r in records]
        sizes = [sum(v.nbytes for v in r) for r in views]
        if self._capacity is not None:
            need = sum(dict(zip(full, sizes, strict=True)).values())  # a key twice in a batch: the last wins
            if need > self._capacity:
                raise self._capacity_error(need)
        if self.cluster:
            self._run(lambda: self._store_cluster(full, views, sizes))
        else:
            evicted = self._run(lambda: self._store_pipeline(full, views, sizes))
            if evicted:
                self._health.count("evictions", evicted)

    def _capacity_error(self, need: int) -> CapacityError:
        exc = CapacityError(
            f"redis {self._health.name}: batch of {need} bytes exceeds the capacity of {self._capacity}"
        )
        self._health.failed("oom_errors", exc)
        return exc

    def _store_pipeline(self, full: list[str], views: list[list[memoryview]], sizes: list[int]) -> int:
        """One pipeline: SET per record, then the accounting script; packed by hand so that each value is sent
        from its own buffers (redis-py packs one buffer per argument: header + payload would need a joined copy).
        Returns the number of records evicted."""
        out = _Packer()
        for key, parts in zip(full, views, strict=True):
            out.command([b"SET", key.encode(), parts])
        cap = -1 if self._capacity is None else self._capacity
        args = [str(cap), "1", str(len(full))]
        for key, size in zip(full, sizes, strict=True):
            args += [key, str(size)]
        script = [_ACCOUNT_SCRIPT.encode(), b"4", *(k.encode() for k in self._meta), *(a.encode() for a in args)]
        out.command([b"EVAL", *script])
        replies = self._send(out.finish(), len(full) + 1)
        errors: dict[int, BaseException] = {i: r for i, r in enumerate(replies) if isinstance(r, Exception)}
        if errors:
            # Some SETs may have landed (whole records, each SET is atomic): remove them and their accounting
            # before reporting the batch failed, so that it leaves nothing.
            self._delete_records(full)
            raise BatchError("redis store failed", errors)
        evicted, used = replies[-1]
        self._last_used = int(used)
        return int(evicted)

    def _send(self, buffers: list[Buffer], n_replies: int) -> list[Any]:
        """Send packed commands on one pooled connection and read their replies (errors as values)."""
        from redis import exceptions as rx

        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(buffers)
            replies: list[Any] = []
            for _ in range(n_replies):
                try:
                    replies.append(conn.read_response())
                except rx.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            conn.disconnect()  # replies may be left unread: this socket must not serve another batch
            raise
        finally:
            pool.release(conn)
        return replies

    def _store_cluster(self, full: list[str], views: list[list[memoryview]], sizes: list[int]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, parts in zip(full, views, strict=True):
            pipe.set(key, parts[0] if len(parts) == 1 else b"".join(parts))
        try:
            results = pipe.execute(raise_on_error=False)
            errors: dict[int, BaseException] = {i: r for i, r in enumerate(results) if isinstance(r, Exception)}
            if errors:
                raise BatchError("redis cluster store failed", errors)
            args: list[str] = ["-1", "0", str(len(full))]
            for key, size in zip(full, sizes, strict=True):
                args += [key, str(size)]
            _, used = self._client.eval(_ACCOUNT_SCRIPT, 4, *self._meta, *args)
            self._last_used = int(used)
        except BaseException:
            self._delete_cluster_quietly(full)
            raise

    def _delete_cluster(self, full: list[str]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key in full:
            pipe.unlink(key)
        pipe.execute(raise_on_error=True)
        self._drop_accounting(full)

    def _drop_accounting(self, full: list[str]) -> None:
        self._last_used = int(self._client.eval(_DELETE_SCRIPT, 3, *self._meta[:3], "0", *full))

    def _delete_cluster_quietly(self, full: list[str]) -> None:
        from redis import exceptions as rx

        try:
            self._delete_cluster(full)
        except rx.RedisError as exc:
            log.warning(
                "L2 redis %s: could not remove %d record(s) of a failed batch: %s", self._health.name, len(full), exc
            )

    def _load(self, keys: Sequence[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        full = [self._key(k) for k in keys]
        out: list[int] = []
        start = 0
        while start < len(full):
            end, window = start, 0
            while end < len(full) and (end == start or window + total_length(dsts[end]) <= _LOAD_WINDOW):
                window += total_length(dsts[end])
                end += 1
            part_keys, part_dsts = full[start:end], dsts[start:end]
            if self.cluster:
                out += self._run(lambda: self._get_cluster(part_keys, part_dsts))  # noqa: B023 - runs right here
            else:
                out += self._run(lambda: self._get_into(part_keys, part_dsts))  # noqa: B023 - runs right here
            start = end
        return out

    def _get_into(self, full: list[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        """Pipelined GETs whose values are received straight into the caller's buffers (no ``bytes`` per value,
        no copy), then the recency / accounting touch."""
        out = _Packer()
        for key in full:
            out.command([b"GET", key.encode()])
        out.command(
            [b"EVAL", _TOUCH_SCRIPT.encode(), b"4", *(k.encode() for k in self._meta), *(k.encode() for k in full)]
        )
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(out.finish())
            reader = _RespReader(conn)
            lengths = [reader.bulk_into(dst) for dst in dsts]
            self._last_used = reader.integer()
        except BaseException:
            conn.disconnect()  # the stream may be mid-reply: this socket must not serve another batch
            raise
        finally:
            pool.release(conn)
        return lengths

    def _get_cluster(self, full: list[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        pipe = self._client.pipeline(transaction=False)
        for key in full:
            pipe.get(key)
        out = []
        missing = []
        for key, value, dst in zip(full, pipe.execute(raise_on_error=False), dsts, strict=True):
            if isinstance(value, Exception):
                if not _is_wrong_type(value):
                    raise value
                out.append(0)  # not a string: unusable, so the serde layer counts a damaged record and removes it
                continue
            if value is None:
                out.append(MISS)
                missing.append(key)
                continue
            if len(value) <= total_length(dst):
                scatter(value, dst)
            out.append(len(value))
        if missing:  # evicted by a node's own policy, or deleted by hand: drop their accounting
            self._drop_accounting(missing)
        return out

    def _read_heads(self, keys: Sequence[str], size: int) -> list[bytes | None]:
        full = [self._key(k) for k in keys]

        def op() -> list[bytes | None]:
            # EXISTS tells an absent record from an empty one; a transaction keeps each pair consistent.
            pipe = self._client.pipeline(transaction=not self.cluster)
            for key in full:
                pipe.exists(key)
                pipe.getrange(key, 0, max(size, 1) - 1)
            res = pipe.execute(raise_on_error=False)
            heads: list[bytes | None] = []
            for i in range(len(full)):
                exists, head = res[2 * i], res[2 * i + 1]
                for r in (exists, head):
                    if isinstance(r, Exception) and not _is_wrong_type(r):
                        raise r
                if isinstance(exists, Exception) or not exists:
                    heads.append(None)
                else:  # a value of another type under our key reads as an empty, unusable record
                    heads.append(b"" if isinstance(head, Exception) else bytes(head)[:size])
            return heads

        return self._run(op)

    def _contains(self, keys: Sequence[str]) -> list[bool]:
        full = [self._key(k) for k in keys]

        def op() -> list[bool]:
            pipe = self._client.pipeline(transaction=False)
            for key in full:
                pipe.exists(key)
            return [bool(n) for n in pipe.execute(raise_on_error=True)]

        return self._run(op)

    def _delete(self, keys: Sequence[str]) -> None:
        full = [self._key(k) for k in keys]
        if self.cluster:
            self._run(lambda: self._delete_cluster(full))
        else:
            self._run(lambda: self._delete_records(full))

    def _delete_records(self, full: list[str]) -> None:
        self._last_used = int(self._client.eval(_DELETE_SCRIPT, 3, *self._meta[:3], "1", *full))

    def stats(self) -> dict[str, Any]:
        with self._health._lock:
            counts = dict(self._health.counts)
        return {
            **super().stats(),
            "url": self._health.name,
            "key_prefix": self.key_prefix,
            "cluster": self.cluster,
            "reachable": self._health.down_since_failures == 0,
            **counts,
        }


class _Packer:
    """RESP commands as a list of buffers: small pieces coalesced, large values referenced, never copied."""

    def __init__(self) -> None:
        self.buffers: list[Buffer] = []
        self._small = bytearray()

    def command(self, args: Sequence[bytes | Sequence[memoryview]]) -> None:
        self._small += b"*%d\r\n" % len(args)
        for arg in args:
            parts: Sequence[Buffer] = [arg] if isinstance(arg, bytes) else arg
            self._small += b"$%d\r\n" % sum(memoryview(p).nbytes for p in parts)
            for part in parts:
                if memoryview(part).nbytes > _INLINE_LIMIT:
                    self.buffers.append(bytes(self._small))
                    self._small.clear()
                    self.buffers.append(part)
                else:
                    self._small += part
            self._small += b"\r\n"

    def finish(self) -> list[Buffer]:
        """The buffers to send, in order."""
        if self._small:
            self.buffers.append(bytes(self._small))
            self._small.clear()
        return self.buffers


class _RespReader:
    """Reads RESP replies from a redis-py connection's socket, bulk strings straight into caller buffers.

    redis-py returns every bulk reply as a fresh ``bytes`` built through several intermediate copies; a 32 MiB
    chunk would be copied three times before reaching its tensor. The pool hands out a connection only after
    checking that nothing is pending on it, the reader consumes exactly the replies of the commands just sent,
    and the caller drops the connection on any error, so redis-py's own parser never sees a half-read stream.
    """

    _READ_AHEAD = 64 * 1024

    def __init__(self, conn: Any) -> None:
        from redis import exceptions as rx

        self._rx = rx
        sock = getattr(conn, "_sock", None)
        if sock is None:
            raise rx.ConnectionError("connection closed before the replies were read")
        self._sock: socket.socket = sock
        self._buf = bytearray()
        self._pos = 0

    def _recv_more(self) -> None:
        chunk = self._recv(lambda: self._sock.recv(self._READ_AHEAD))
        del self._buf[: self._pos]
        self._pos = 0
        self._buf += chunk

    def _recv(self, fn: Callable[[], T]) -> T:
        try:
            result = fn()
        except TimeoutError as exc:  # socket.timeout
            raise self._rx.TimeoutError("Timeout reading from socket") from exc
        except OSError as exc:
            raise self._rx.ConnectionError(f"Error while reading from socket: {exc}") from exc
        if not result:
            raise self._rx.ConnectionError("Connection closed by server.")
        return result

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n", self._pos)
            if end >= 0:
                line = bytes(self._buf[self._pos : end])
                self._pos = end + 2
                if line[:1] == b"-":
                    message = line[1:].decode(errors="replace")
                    if message.startswith("OOM"):
                        raise self._rx.OutOfMemoryError(message)
                    raise self._rx.ResponseError(message)
                return line
            self._recv_more()

    def _fill(self, view: memoryview) -> None:
        """Fill ``view`` exactly: first from the read-ahead, then straight from the socket."""
        have = min(len(self._buf) - self._pos, len(view))
        if have:
            view[:have] = self._buf[self._pos : self._pos + have]
            self._pos += have
        while have < len(view):
            have += self._recv(lambda: self._sock.recv_into(view[have:]))  # noqa: B023 - called at once

    def bulk_into(self, dst: Sequence[Buffer]) -> int:
        """Read one bulk reply into ``dst`` (in order, as far as it reaches); its length, or MISS for nil."""
        try:
            line = self._line()
        except self._rx.ResponseError as exc:
            if _is_wrong_type(exc):
                return 0  # not a string: unusable, so the serde layer counts a damaged record and removes it
            raise
        if line == b"_":  # RESP3 null
            return MISS
        if line[:1] == b"!":  # RESP3 blob error
            message = self._blob(int(line[1:])).decode(errors="replace")
            raise (self._rx.OutOfMemoryError if message.startswith("OOM") else self._rx.ResponseError)(message)
        if line[:1] != b"$":
            raise self._rx.InvalidResponse(f"expected a bulk string, got {line[:40]!r}")
        n = int(line[1:])
        if n < 0:
            return MISS
        left = n
        for buf in dst:
            view = memoryview(buf).cast("B")
            take = min(len(view), left)
            self._fill(view[:take])
            left -= take
        scratch = memoryview(bytearray(min(left, self._READ_AHEAD)))
        while left:  # the record is larger than the buffers: the caller only needs its length
            take = min(left, len(scratch))
            self._fill(scratch[:take])
            left -= take
        self._fill(memoryview(bytearray(2)))  # the CRLF after the value
        return n

    def _blob(self, n: int) -> bytes:
        data = bytearray(n + 2)
        self._fill(memoryview(data))
        return bytes(data[:n])

    def integer(self) -> int:
        line = self._line()
        if line[:1] != b":":
            raise self._rx.InvalidResponse(f"expected an integer, got {line[:40]!r}")
        return int(line[1:])


def _is_wrong_type(exc: BaseException) -> bool:
    """A reply saying the key holds another type than a string (someone else's data under our prefix)."""
    return str(exc).startswith("WRONGTYPE")


def _is_oom(exc: BaseException) -> bool:
    from redis import exceptions as rx

    if isinstance(exc, rx.OutOfMemoryError) or str(exc).startswith("OOM"):
        return True
    if isinstance(exc, BatchError):
        return any(_is_oom(e) for e in exc.errors.values())
    return False


def redis_factory(config: dict[str, Any], where: str) -> RedisAdapter:
    reader = ConfigReader(config, where)
    url = reader.string("url")
    cluster = reader.boolean("cluster", False)
    key_prefix = reader.string("key_prefix", "kvtier")
    gb = reader.number("max_capacity_gb", None, min=0.0)
    timeout_s = reader.number("timeout_s", 10.0, min=0.001)
    connect_timeout_s = reader.number("connect_timeout_s", 5.0, min=0.001)
    max_connections = reader.integer("max_connections", 64, min=1)
    reader.finish()
    check_url(url, cluster, where)
    check_key_prefix(key_prefix, where)
    if cluster and gb is not None:
        raise ConfigError(
            f"{where}.max_capacity_gb: not supported with cluster: true "
            "(the accounting script cannot reach records on other slots); bound each node with maxmemory "
            "and allkeys-lru"
        )
    if gb is not None and gb <= 0:
        raise ConfigError(f"{where}.max_capacity_gb: expected a value > 0, got {gb!r}")
    return RedisAdapter(
        url,
        cluster=cluster,
        key_prefix=key_prefix,
        capacity_bytes=None if gb is None else max(1, int(gb * GiB)),
        timeout_s=timeout_s,
        connect_timeout_s=connect_timeout_s,
        max_connections=max_connections,
    )
