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

Loads. A batch of ``GET`` commands is one pipeline (at most ``_LOAD_WINDOW`` bytes in flight) whose replies are
received from the socket straight into the caller's buffers: no ``bytes`` object per value, no copy. A tier load
(:meth:`RedisAdapter._load_with`) reads each value's header first and lets the tier choose the buffers for the rest
in the same reply stream: one round trip per batch.
A value of another type under a record key reads as an empty record, so the serde layer counts it damaged and
removes it.

Capacity. Two lines of defence, documented in README.md: ``max_capacity_gb`` bounds the record bytes (the
accounting script evicts LRU records atomically as it accounts a batch, so the accounted bytes never exceed the
bound; the server's memory holds at most one batch in flight above it), and the server's own ``maxmemory``
bounds its memory. With ``maxmemory-policy noeviction`` a full server answers
``OOM``: the batch fails with :class:`~kvtier.errors.CapacityError` and kvtier keeps serving; with
``allkeys-lru`` Redis may evict records itself, and the accounting of such a record is dropped when a load or an
eviction meets it.

Faults. Connection refused, timeouts and a server restart fail the batch at hand with
:class:`~kvtier.errors.L2Error` (as :class:`RedisUnreachable` / :class:`RedisTimeout`, also the builtin
``ConnectionError`` / ``TimeoutError``); any other failure of the server is an ``L2Error`` too. Counted in
:meth:`RedisAdapter.stats` and logged once per outage, not per batch or key. Every operation is idempotent, so a
batch that hits a dead pooled connection is retried once on a fresh one; after a restart of Redis the next batch
reconnects by itself.

Cluster. With ``cluster: true`` records spread over the cluster's nodes by key slot (redis-py's ``RedisCluster``
routes each command). A batch is a pipeline of ``SET``\\ s (each record atomic) whose keys are deleted again
when any fails; values are joined into one buffer first and loads go through redis-py's parser (its cluster
pipeline sends one buffer per value and owns the sockets). The accounting keys share one slot (hash tag
``{key_prefix:@}``) and are updated by a script after the records landed, so ``used_bytes`` holds; a script
cannot reach records on other slots, so ``max_capacity_gb`` is refused with a cluster: bound each node with
``maxmemory`` + ``allkeys-lru`` instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from kvtier.errors import BatchError, CapacityError, ConfigError, L2Error
from kvtier.l2.adapters.base import MISS, Buffer, KeyMatch, L2Adapter, Prepare, batched, scatter
from kvtier.l2.adapters.health import BackendHealth
from kvtier.l2.adapters.redis.config import redact_url
from kvtier.l2.adapters.redis.io import Packer, RespReader, is_wrong_type
from kvtier.l2.adapters.redis.scripts import ACCOUNT_SCRIPT, DELETE_SCRIPT, TOUCH_SCRIPT

log = logging.getLogger(__name__)

GiB = 1 << 30
T = TypeVar("T")

# A load pipeline fetches at most this many bytes of destinations at once: the server buffers the replies of a
# pipeline (and redis-py's cluster path holds each value as a fresh ``bytes``), so a batch of a hundred 32 MiB
# chunks must not be in flight at the same time.
_LOAD_WINDOW = 256 << 20


class RedisUnreachable(L2Error, ConnectionError):
    """The Redis server cannot be reached (refused, reset, closed): an :class:`L2Error` and a ``ConnectionError``."""


class RedisTimeout(L2Error, TimeoutError):
    """A Redis command timed out: an :class:`L2Error` and a ``TimeoutError``."""


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
        self._url = redact_url(url)  # the URL as logs and stats may show it
        self._health = BackendHealth(
            f"redis {self._url}", log, ("connection_errors", "timeouts"), ("oom_errors", "evictions")
        )
        self._client: Any = None
        self._last_used = 0
        self._largest_seen = 0  # bytes of the largest record loaded so far

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
                self._health.failed("timeouts", str(exc))
                raise RedisTimeout(f"redis {self._url}: {exc}") from exc
            except rx.ConnectionError as exc:
                # After a server restart the pool may hand out a socket that is already dead: one fresh try.
                if attempt == 0 and not isinstance(exc, rx.AuthenticationError):
                    continue
                self._health.failed("connection_errors", str(exc))
                raise RedisUnreachable(f"redis {self._url}: {exc}") from exc
            except CapacityError as exc:
                self._health.failed("oom_errors", str(exc))
                raise
            except (rx.RedisError, BatchError) as exc:
                if _is_oom(exc):
                    self._health.failed("oom_errors", str(exc))
                    raise CapacityError(f"redis {self._url} is out of memory: {exc}") from exc
                self._health.failed("other_errors", str(exc))
                raise L2Error(f"redis {self._url}: {exc}") from exc
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
        exc = CapacityError(f"redis {self._url}: batch of {need} bytes exceeds the capacity of {self._capacity}")
        self._health.failed("oom_errors", str(exc))
        return exc

    def _store_pipeline(self, full: list[str], views: list[list[memoryview]], sizes: list[int]) -> int:
        """One pipeline: SET per record, then the accounting script; packed by hand so that each value is sent
        from its own buffers (redis-py packs one buffer per argument: header + payload would need a joined copy).
        Returns the number of records evicted."""
        out = Packer()
        for key, parts in zip(full, views, strict=True):
            out.command([b"SET", key.encode(), parts])
        cap = -1 if self._capacity is None else self._capacity
        args = [str(cap), "1", str(len(full))]
        for key, size in zip(full, sizes, strict=True):
            args += [key, str(size)]
        script = [ACCOUNT_SCRIPT.encode(), b"4", *(k.encode() for k in self._meta), *(a.encode() for a in args)]
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
            _, used = self._client.eval(ACCOUNT_SCRIPT, 4, *self._meta, *args)
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
        self._last_used = int(self._client.eval(DELETE_SCRIPT, 3, *self._meta[:3], "0", *full))

    def _delete_cluster_quietly(self, full: list[str]) -> None:
        from redis import exceptions as rx

        try:
            self._delete_cluster(full)
        except rx.RedisError as exc:
            log.warning("L2 redis %s: could not remove %d record(s) of a failed batch: %s", self._url, len(full), exc)

    def _load(self, keys: Sequence[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        """Through the one read path (:meth:`_load_with`): each value received straight into its buffers, as far
        as they reach (a longer one's length tells the caller it did not fit)."""
        return self._load_with(keys, 0, lambda i, _head, _length: dsts[i])

    def _load_with(self, keys: Sequence[str], head_size: int, prepare: Prepare) -> list[int]:
        """One pipelined ``GET`` per record, each value received header first into ``prepare``'s buffers."""
        full = [self._key(k) for k in keys]
        out: list[int] = []
        # Sizes are unknown before the replies come: bound the bytes in flight by the largest record seen so far.
        window = max(1, _LOAD_WINDOW // (self._largest_seen or 32 << 20))  # a 32 MiB chunk until one is seen
        for start in range(0, len(full), window):
            part = full[start : start + window]

            def at(j: int, head: memoryview, length: int, base: int = start) -> Sequence[Buffer] | None:
                self._largest_seen = max(self._largest_seen, length)
                return prepare(base + j, head, length)

            if self.cluster:
                out += self._run(lambda: self._get_cluster_with(part, head_size, at))  # noqa: B023 - runs right here
            else:
                out += self._run(lambda: self._get_with(part, head_size, at))  # noqa: B023 - runs right here
        return out

    def _get_with(self, full: list[str], head_size: int, prepare: Prepare) -> list[int]:
        out = Packer()
        for key in full:
            out.command([b"GET", key.encode()])
        out.command(
            [b"EVAL", TOUCH_SCRIPT.encode(), b"4", *(k.encode() for k in self._meta), *(k.encode() for k in full)]
        )
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(out.finish())
            reader = RespReader(conn)
            lengths = [reader.bulk_with(j, head_size, prepare) for j in range(len(full))]
            self._last_used = reader.integer()
        except BaseException:
            conn.disconnect()  # the stream may be mid-reply: this socket must not serve another batch
            raise
        finally:
            pool.release(conn)
        return lengths

    def _get_cluster_with(self, full: list[str], head_size: int, prepare: Prepare) -> list[int]:
        pipe = self._client.pipeline(transaction=False)
        for key in full:
            pipe.get(key)
        out = []
        missing = []
        for j, (key, value) in enumerate(zip(full, pipe.execute(raise_on_error=False), strict=True)):
            if isinstance(value, Exception):
                if not is_wrong_type(value):
                    raise value
                out.append(0)  # not a string: unusable, so the tier counts a damaged record and removes it
                continue
            if value is None:
                out.append(MISS)
                missing.append(key)
                continue
            bufs = prepare(j, memoryview(value)[:head_size], len(value))
            if bufs is not None:
                scatter(value, bufs)
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
                    if isinstance(r, Exception) and not is_wrong_type(r):
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
        self._last_used = int(self._client.eval(DELETE_SCRIPT, 3, *self._meta[:3], "1", *full))

    def scan_pattern(self, match: KeyMatch) -> str:
        """The ``SCAN MATCH`` glob selecting ``match``'s records: a superset (results are checked exactly), with
        every glob metacharacter of the prefix, model and digest escaped so that they match only themselves."""
        model = glob_escape(match.quoted_model) if match.model_name is not None else "*"
        rest = "*" if match.salt_digest is None else f"*@{glob_escape(match.salt_digest)}@*"
        return f"{glob_escape(self._prefix)}{model}@{rest}"

    def _list_keys(self, match: KeyMatch, batch_size: int) -> Iterator[list[str]]:
        """``SCAN`` by pattern (one call per batch, so other commands interleave; on a cluster every primary in
        turn). A key may be reported twice (SCAN's guarantee); deleting it twice is harmless."""
        pattern = self.scan_pattern(match)
        n = len(self._prefix)

        def ours(raw: list[Any]) -> list[str]:
            names = (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in raw)
            return [name[n:] for name in names if name.startswith(self._prefix) and match.matches(name[n:])]

        if self.cluster:
            it = self._client.scan_iter(match=pattern, count=batch_size)
            while True:
                chunk = self._run(lambda: [k for _, k in zip(range(batch_size), it, strict=False)])
                yield from batched(ours(chunk), batch_size)
                if len(chunk) < batch_size:
                    return
        cursor = 0
        while True:
            cursor, raw = self._run(functools.partial(self._client.scan, cursor, match=pattern, count=batch_size))
            yield from batched(ours(raw), batch_size)
            if int(cursor) == 0:
                return

    def stats(self) -> dict[str, Any]:
        with self._health.lock:
            counts = dict(self._health.counts)
        return {
            **super().stats(),
            "url": self._url,
            "key_prefix": self.key_prefix,
            "cluster": self.cluster,
            "reachable": self._health.down_since_failures == 0,
            **counts,
        }


def glob_escape(text: str) -> str:
    """``text`` as a Redis glob that matches only itself (``*``, ``?``, ``[``, ``]`` and ``\\`` escaped)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _is_oom(exc: BaseException) -> bool:
    from redis import exceptions as rx

    if isinstance(exc, rx.OutOfMemoryError) or str(exc).startswith("OOM"):
        return True
    if isinstance(exc, BatchError):
        return any(_is_oom(e) for e in exc.errors.values())
    return False
