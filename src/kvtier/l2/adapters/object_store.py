"""``{"type": "object_store", "url": "s3://BUCKET/PREFIX", ...}``: records as objects in S3, an S3-compatible
store, Google Cloud Storage (``gs://``) or Azure Blob Storage (``az://``), through one client library (obstore,
the Python binding of the Rust ``object_store`` crate).

Config (read with a :class:`~kvtier.config.ConfigReader`; a bad value fails at start naming the field):

* ``url`` (required): ``s3://BUCKET[/PREFIX]``, ``gs://BUCKET[/PREFIX]`` or ``az://CONTAINER[/PREFIX]``.
* ``options`` (``{}``): the store's settings as obstore names them: ``endpoint`` (or ``endpoint_url``),
  ``region``, ``access_key_id``, ``secret_access_key``, ``session_token``, ``service_account_key``,
  ``account_name``, ``account_key``, ... Anything not given comes from the usual environment (``AWS_*``,
  ``GOOGLE_*``, ``AZURE_*``) and instance metadata. An unknown key fails at start naming it. Option values are
  never logged, never in stats, never in ``repr``; error messages are scrubbed of them.
* ``shared`` (``false``): several kvtier servers use this prefix. Every lookup asks the store (a chunk stored
  through one server is a hit through every other), and capacity is left to the bucket's lifecycle rules:
  ``max_capacity_gb`` with ``shared`` is refused at start.
* ``max_capacity_gb`` (none): for a prefix that this server owns: a bound on the bytes of records, kept by the
  adapter's own index (rebuilt from a listing of the prefix on start), least recently used records evicted.
* ``tenant_quota_gb`` / ``tenant_quotas_gb`` (none): with an owned prefix, a bound on each tenant's
  (``cache_salt``'s) bytes and overrides by salt digest (:mod:`kvtier.tenants`); a tenant at its quota evicts its
  own least recently used records first. Refused with ``shared`` (this server sees only part of the prefix).
* ``max_concurrency`` (16): requests in flight per adapter (a batch's records go concurrently, bounded).
* ``multipart_threshold_mb`` (64), ``multipart_part_mb`` (16): records above the threshold are uploaded in
  parts of that size, several at once.
* ``timeout_s`` (30), ``connect_timeout_s`` (5), ``max_retries`` (3), ``retry_timeout_s`` (10): per request;
  transient failures (connection errors, timeouts, 5xx such as 503 SlowDown) are retried with exponential
  backoff by the client, at most ``max_retries`` times and ``retry_timeout_s`` in all, then fail the batch.

Naming. A record of ``ObjectKey(model, hash, rank, salt)`` is ``PREFIX/<model>/<salt digest>/<hash>.kvtr``
(``<hash>.r<rank>.kvtr`` for a rank above 0): a listing by ``PREFIX/<model>/`` finds a model's records, by
``PREFIX/<model>/<salt digest>/`` a tenant's (``_`` for the empty salt); the salt itself never appears in a name,
only its keyed digest (:attr:`kvtier.ObjectKey.salt_digest`). Any other key string maps to ``PREFIX/_/...``
(:func:`object_name` is the one place that maps).

Store. One object per record, one ``PUT`` of the whole record: a reader never sees half of one (multipart uploads
become visible only when completed). Keys are content-addressed, so a record is written once: a key this
server already holds is not uploaded again; otherwise the ``PUT`` is conditional (``If-None-Match: *``) and a
record that appeared meanwhile is kept as it is. A multipart upload cannot be conditional with this client, so
a large record is looked up first (``HEAD``). The record's buffers (header, tensor memory) go to the client as
they are, without a joined copy. When any record of a batch fails, the records the batch created are deleted
before the error is raised.

Loads. One ``GET`` per record, streamed into the caller's buffers as the body arrives: the client has no
read-into-a-buffer call, so it hands the body over in pieces of 256 KiB that it owns, each copied once into the
destination (no whole-record ``bytes`` in between, nothing allocated per record); a record larger than the
buffers is reported by its size without its body being read.
``read_heads`` is a ranged ``GET`` unless the head is known: in shared mode ``contains`` is a ranged ``GET`` of the
first bytes (a ``HEAD`` cannot tell a missing bucket from a missing key) and keeps them for the ``read_heads``
that follows; in owned mode the heads of the records this server stored are kept (bounded), so a lookup then
costs one round trip, the load itself.

Faults. Failures of the store (endpoint down, timeouts, throttling after the client's retries, credentials
refused, a missing bucket, which kvtier never creates) raise :class:`~kvtier.errors.L2Error`, counted in
:meth:`ObjectStoreAdapter.stats` and logged once per outage (when it starts and when it ends).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import quote

from kvtier.config import ConfigReader
from kvtier.errors import CapacityError, ConfigError, L2Error, MissingDependencyError
from kvtier.key_names import key_str, parse_key_str
from kvtier.l2.adapters.base import MISS, Buffer, KeyMatch, L2Adapter, Prepare, batched, scatter, total_length
from kvtier.l2.adapters.health import BackendHealth
from kvtier.tenants import TenantQuotas, UsageLedger, read_adapter_quotas

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20
T = TypeVar("T")
R = TypeVar("R")

SUFFIX = ".kvtr"
_SCHEMES = ("s3", "gs", "az")
# Bytes of a record's head kept for ``read_heads``: fetched by a shared-mode ``contains`` (a ranged GET of 4 KiB
# costs the same round trip as a HEAD) or known from a store (a record header is at most
# kvtier.l2.record.MAX_HEADER_SIZE, 1.5 KiB).
_PROBE_BYTES = 4096
# Heads kept from contains probes: bounded, oldest dropped (a lookup reads them back within the same call).
_HEAD_CACHE_ENTRIES = 1024
# The streamed body is handed over in pieces of at least this size: large enough to keep the per-piece
# overhead (a round through the client's runtime) small, small enough to stay in cache on the way to the caller.
# Measured against moto, client CPU-seconds per GB for 4 / 32 MiB objects: 64 KiB 0.64 / 0.72, 256 KiB 0.60 /
# 0.72, 1 MiB 0.69 / 0.74, 4 MiB 0.83 / 0.88; obstore's whole-body bytes() + a copy: 0.58 / 1.08.
_STREAM_PIECE = 256 * 1024
# In shared mode a record at least this large is looked up (HEAD) before its upload: a PUT sends its body
# even when ``If-None-Match`` then refuses it, and other servers often store the same chunk.
_PROBE_BEFORE_PUT = 1 * MiB
# Shared mode remembers the sizes of the records it stored or found, for used_bytes; bounded.
_SHARED_INDEX_ENTRIES = 100_000
# Strings that mark a missing bucket / container in a 404 (S3, GCS, Azure): an outage, not a missing key.
_NO_BUCKET = ("NoSuchBucket", "ContainerNotFound", "The specified bucket does not exist", "bucket does not exist")
_CREDENTIAL_MARKS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "status code: 401",
    "status code: 403",
)
_THROTTLE_MARKS = ("SlowDown", "status code: 503", "status code: 429", "ServerBusy", "rateLimitExceeded")
# Option values that are not secrets: error messages keep them (an endpoint in a message helps); all others are
# replaced by *** wherever they appear.
_PLAIN_OPTIONS = frozenset(
    {
        "endpoint",
        "endpoint_url",
        "aws_endpoint",
        "aws_endpoint_url",
        "azure_storage_endpoint",
        "region",
        "aws_region",
        "default_region",
        "aws_default_region",
        "account_name",
        "azure_storage_account_name",
        "use_emulator",
        "unsigned_payload",
        "virtual_hosted_style_request",
        "skip_signature",
    }
)
_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_\-+:][A-Za-z0-9._\-+:]{0,199}")
_SAFE_KEY = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,199}")
_SALT_DIGEST = re.compile(r"[0-9a-f]{32}")
_CHUNK_HASH = re.compile(r"[0-9a-f]{1,128}")


def _head_of(views: Sequence[memoryview]) -> bytes:
    """The first ``_PROBE_BYTES`` of a record given as buffers."""
    out = bytearray()
    for v in views:
        out += v[: _PROBE_BYTES - len(out)]
        if len(out) >= _PROBE_BYTES:
            break
    return bytes(out)


def _tenant_of_name(name: str) -> tuple[str, str]:
    """``(salt digest, model)`` of an object name made by :func:`object_name` (``("", "")`` for a name that is
    not a key's)."""
    parts = name.split("/")
    if len(parts) >= 3 and not (parts[0] == "_" and len(parts) == 3 and parts[1] in ("k", "x")):
        digest = parts[-2]
        if digest == "_" or _SALT_DIGEST.fullmatch(digest):
            return ("" if digest == "_" else digest), "/".join(parts[:-2])
    return "", ""


def object_name(key: str) -> str:
    """The object name (below the prefix) of the record of ``key``, an ``ObjectKey.to_str()`` string
    (``model@rank@saltdigest@hash``, the salt only as its keyed digest).

    ``<model>/<salt digest>/<hash>.kvtr`` (``<hash>.r<rank>.kvtr`` for a rank above 0; ``_`` stands for the digest
    of the empty salt), the model's ``/`` kept as path separators so that a listing by model or by tenant works. A
    string that is not an object key, or whose model name would not make clean path segments, maps under ``_/``:
    ``_/k/<key>.kvtr`` when the key is a safe name, else ``_/x/<hex of the key>.kvtr``. Distinct keys map to
    distinct names: a key's name has at least three segments below ``_/k`` or ``_/x``, a fallback name one.
    """
    f = parse_key_str(key)
    if (
        f is not None
        and quote(f.model_name, safe="") == f.quoted_model
        and (f.salt_digest == "" or _SALT_DIGEST.fullmatch(f.salt_digest))
        and _CHUNK_HASH.fullmatch(f.chunk_hash)
        and all(_SAFE_SEGMENT.fullmatch(s) for s in f.model_name.split("/"))
    ):
        ranked = "" if f.kv_rank == 0 else f".r{f.kv_rank}"
        return f"{f.model_name}/{f.salt_digest or '_'}/{f.chunk_hash}{ranked}{SUFFIX}"
    if _SAFE_KEY.fullmatch(key):
        return f"_/k/{key}{SUFFIX}"
    return f"_/x/{key.encode().hex()}{SUFFIX}"


def key_of_name(name: str) -> str | None:
    """The key string whose record :func:`object_name` names ``name`` (its inverse), or ``None`` for an object
    that is not a record name."""
    if not name.endswith(SUFFIX):
        return None
    segs = name[: -len(SUFFIX)].split("/")
    if len(segs) == 3 and segs[0] == "_" and segs[1] in ("k", "x"):
        if segs[1] == "k":
            return segs[2]
        try:
            return bytes.fromhex(segs[2]).decode()
        except ValueError:
            return None
    if len(segs) < 3:
        return None
    model, digest, leaf = "/".join(segs[:-2]), segs[-2], segs[-1]
    chunk_hash, ranked, rank = leaf.partition(".r")
    # object_name writes a rank above 0 only, in decimal digits without a leading zero: anything else is no record
    if ranked and not (rank.isascii() and rank.isdigit() and rank[0] != "0"):
        return None
    return key_str(model, int(rank or 0), "" if digest == "_" else digest, chunk_hash)


def list_prefixes(match: KeyMatch) -> list[str]:
    """The listing prefixes that together cover every record ``match`` selects: by model (and tenant) where the
    names allow it, plus the fallback names under ``_/`` (keys whose model makes no clean path segments)."""
    if match.model_name is None or not all(_SAFE_SEGMENT.fullmatch(s) for s in match.model_name.split("/")):
        return [""]
    if match.salt_digest is None:
        return [f"{match.model_name}/", "_/k/", "_/x/"]
    return [f"{match.model_name}/{match.salt_digest or '_'}/", "_/k/", "_/x/"]


def parse_url(url: str, where: str) -> tuple[str, str, str]:
    """``(scheme, bucket, prefix)`` of an ``s3://``, ``gs://`` or ``az://`` URL; errors name ``where.url``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ConfigError(
            f"{where}.url: expected s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX, got {url!r}"
        )
    bucket, _, prefix = rest.partition("/")
    if not bucket or any(c.isspace() or c in "?#@" for c in bucket):
        raise ConfigError(f"{where}.url: expected a bucket name after {scheme}://, got {url!r}")
    prefix = prefix.strip("/")
    if any(not seg or seg in (".", "..") for seg in prefix.split("/")) and prefix:
        raise ConfigError(f"{where}.url: the prefix must be plain path segments, got {prefix!r}")
    return scheme, bucket, prefix


_OUTAGE_KINDS = ("connection_errors", "timeouts", "throttled", "credential_errors", "missing_bucket")
_COUNTERS = (
    "capacity_errors",
    "evictions",
    "quota_evictions",
    "uploads",
    "uploads_skipped",
    "multipart_uploads",
    "head_cache_hits",
)


class ObjectStoreAdapter(L2Adapter):
    """Records as objects under ``url``'s prefix; see the module docstring for the whole contract."""

    def __init__(
        self,
        url: str,
        *,
        options: dict[str, Any] | None = None,
        shared: bool = False,
        capacity_bytes: int | None = None,
        max_concurrency: int = 16,
        multipart_threshold: int = 64 * MiB,
        multipart_part: int = 16 * MiB,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 3,
        retry_timeout_s: float = 10.0,
        where: str = "l2_adapter",
        quotas: TenantQuotas | None = None,
    ) -> None:
        super().__init__()
        if shared and capacity_bytes is not None:
            raise ConfigError(f"{where}.max_capacity_gb: not allowed with shared: true (use lifecycle rules)")
        if shared and quotas is not None and quotas.enabled:
            raise ConfigError(f"{where}.tenant_quota_gb: not allowed with shared: true (use lifecycle rules)")
        self.scheme, self.bucket, self.prefix = parse_url(url, where)
        self.url = url
        self.shared = shared
        self._options = dict(options or {})
        self._capacity = capacity_bytes
        self._concurrency = max_concurrency
        self._multipart_threshold = multipart_threshold
        self._multipart_part = multipart_part
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_retries = max_retries
        self._retry_timeout_s = retry_timeout_s
        self._health = BackendHealth(f"object store {url}", log, _OUTAGE_KINDS, _COUNTERS)
        self._store_obj: Any = None
        self._pool: ThreadPoolExecutor | None = None
        # Index: object name -> record bytes, least recently used first. Owned mode: every record under the
        # prefix (rebuilt from a listing on start). Shared mode: the records this server stored or found.
        self._index: OrderedDict[str, int] = OrderedDict()
        self._used = 0
        self._reserved = 0  # bytes of uploads in flight, counted against the capacity
        self._quotas = quotas or TenantQuotas()
        self._usage = UsageLedger(self._quotas, "LRU")  # per tenant and model: the index plus uploads in flight
        self._pins: dict[str, int] = {}  # names being read or written: never evicted
        self._lock = threading.Lock()
        self._heads: OrderedDict[str, bytes] = OrderedDict()  # record heads from contains() probes and stores
        self._secrets = sorted(
            (str(v) for k, v in self._options.items() if k.lower() not in _PLAIN_OPTIONS and len(str(v)) >= 4),
            key=len,
            reverse=True,
        )
        # Build the client once here to check the options (pure parsing, no connection), then drop it.
        self._build(where)

    # -- resources --------------------------------------------------------------------------------------------
    def _build(self, where: str) -> Any:
        try:
            from obstore.exceptions import UnknownConfigurationKeyError
            from obstore.store import from_url
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise MissingDependencyError("the object_store L2 adapter", "obstore", "object_store") from exc
        config = {str(k): (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in self._options.items()}
        names = ("endpoint", "endpoint_url", "aws_endpoint", "aws_endpoint_url", "azure_storage_endpoint")
        endpoint = next((config[k] for k in names if k in config), "")
        if self.scheme == "s3":
            # The body is not hashed into the signature: TLS protects it in transit and every record carries its
            # own checksum; hashing it costs the client about 0.4 CPU-seconds per GB (measured, BENCHMARKS.md).
            config.setdefault("unsigned_payload", "true")
        client = {
            "timeout": f"{int(self._timeout_s * 1000)}ms",
            "connect_timeout": f"{int(self._connect_timeout_s * 1000)}ms",
            # An http:// endpoint (a local S3-compatible server) is taken as asked for; https stays the default.
            # So is Azurite (``use_emulator``: the endpoint comes from AZURITE_BLOB_STORAGE_URL).
            "allow_http": endpoint.startswith("http://") or config.get("use_emulator", "").lower() == "true",
        }
        retry = {
            "max_retries": self._max_retries,
            "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=2), "base": 2},
            "retry_timeout": timedelta(seconds=self._retry_timeout_s),
        }
        url = f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        try:
            build: Any = from_url  # its typed overloads are per scheme; the config is checked by the client
            return build(url, config=config, client_options=client, retry_config=retry)
        except UnknownConfigurationKeyError as exc:
            bad = [k for k in config if k in str(exc)] or ["?"]
            raise ConfigError(f"{where}.options: unknown key {bad[0]!r} for {self.scheme}://") from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            # obstore raises plain ValueError / its own errors for bad settings, and for some keys its Rust core
            # panics (pyo3's PanicException derives from BaseException, not Exception): all are a bad config.
            # The message may quote a value: name the keys only.
            raise ConfigError(
                f"{where}.options: the {self.scheme}:// client refused the settings (keys {sorted(config)}): "
                f"{type(exc).__name__}"
            ) from None

    def new_client(self) -> Any:
        """A fresh obstore client with this adapter's settings (for benchmarks and tools: the same endpoint,
        credentials, timeouts and retries)."""
        return self._build("l2_adapter")

    def _start(self) -> None:
        self._store_obj = self._build("l2_adapter")
        self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="kvtier-objstore")
        try:
            if self.shared:
                # Check that the bucket is there (kvtier never creates one): a missing bucket is an outage.
                self._backend_call(lambda: next(iter(self._obs().list(self._store_obj, chunk_size=1)), None))
            else:
                self._backend_call(self._rebuild_index)
        except BaseException:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._store_obj = None

    @staticmethod
    def _obs() -> Any:
        import obstore

        return obstore

    def _rebuild_index(self) -> None:
        """Owned mode: the index of every record under the prefix, oldest first (by last modification)."""
        found: list[tuple[Any, str, int]] = []
        for batch in self._obs().list(self._store_obj, chunk_size=1000):
            for meta in batch:
                path = str(meta["path"])
                if path.endswith(SUFFIX):
                    found.append((meta["last_modified"], path, int(meta["size"])))
        found.sort(key=lambda t: (t[0], t[1]))
        with self._lock:
            self._index = OrderedDict()
            self._used = 0
            self._usage = UsageLedger(self._quotas, "LRU")
            for _, path, size in found:
                self._index_put(path, size)
            over: list[str] = []
            if self._quotas.enabled:  # a tenant's quota shrank since last run: its oldest records go now
                needs = {(t, ""): 0 for t in self._usage.tenants() if self._usage.excess(t, 0) > 0}
                over = self._make_tenant_room(needs, set())
                for name in over:
                    self._index_drop(name)
        if over:
            self._delete_names(over)
            self._health.count("evictions", len(over))
            self._health.count("quota_evictions", len(over))
        if found:
            log.info("L2 object store %s: %d record(s), %d bytes found", self.url, len(found), self._used)

    # -- errors -----------------------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        """``text`` without option values, cut to its first line (the client appends the whole request)."""
        line = text.split("\n", 1)[0][:500]
        for secret in self._secrets:
            line = line.replace(secret, "***")
        return line

    def _classify(self, exc: BaseException) -> str:
        """The kind of a client error, read from its text: obstore's exceptions carry the HTTP status and the
        transport error only there (``status: 503``, ``kind: Timeout``, ``kind: Connect``)."""
        from obstore import exceptions as ox

        text = str(exc)
        if isinstance(exc, ox.PermissionDeniedError | ox.UnauthenticatedError):
            return "credential_errors"
        if any(s in text for s in _NO_BUCKET):
            return "missing_bucket"
        if any(s in text for s in _CREDENTIAL_MARKS):
            return "credential_errors"
        if any(s in text for s in _THROTTLE_MARKS):
            return "throttled"
        if any(s in text for s in ("kind: Timeout", "TimedOut", "timed out")):  # not "retry_timeout"
            return "timeouts"
        if any(s in text for s in ("kind: Connect", "error sending request", "onnection refused", "onnection reset")):
            return "connection_errors"
        return "other_errors"

    def _backend_call(self, fn: Callable[[], T]) -> T:
        """Run one batch's work, translating the client's errors into L2Error (counted, logged once)."""
        from obstore.exceptions import BaseError

        try:
            result = fn()
        except L2Error as exc:  # raised by this adapter itself (a short body, ...)
            self._health.failed("other_errors", str(exc))
            raise
        except (BaseError, OSError) as exc:
            kind = self._classify(exc)
            message = f"{type(exc).__name__}: {self._scrub(str(exc))}"
            self._health.failed(kind, message)
            # `from None`: the client's error carries the whole response (a 403 body names the access key id);
            # the scrubbed first line above is what may reach logs.
            raise L2Error(f"object store {self.url}: {kind}: {message}") from None
        self._health.ok()
        return result

    def _is_missing(self, exc: BaseException) -> bool:
        """A 404 for the object itself (not for its bucket)."""
        return isinstance(exc, FileNotFoundError) and not any(s in str(exc) for s in _NO_BUCKET)

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items`` on the adapter's threads; waits for every call before returning or raising, so
        that no request still touches a caller's buffer afterwards. Raises the first error."""
        if len(items) == 1:
            return [fn(items[0])]
        assert self._pool is not None
        futures = [self._pool.submit(fn, item) for item in items]
        wait(futures)
        return [f.result() for f in futures]

    # -- capacity ---------------------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int | None:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes of records under the prefix (owned mode); in shared mode those this server stored or found."""
        with self._lock:
            return self._used

    def _index_put(self, name: str, size: int) -> None:
        """Record ``name`` as held (most recently used); caller holds ``_lock``."""
        self._index_drop(name)
        self._index[name] = size
        self._used += size
        tenant, model = _tenant_of_name(name)
        self._usage.insert(tenant, name)
        self._usage.change(tenant, model, size, 1)
        if self.shared:
            while len(self._index) > _SHARED_INDEX_ENTRIES:
                self._index_drop(next(iter(self._index)))

    def _index_drop(self, name: str) -> None:
        size = self._index.pop(name, None)
        if size is not None:
            self._used -= size
            tenant, model = _tenant_of_name(name)
            self._usage.remove(tenant, name)
            self._usage.change(tenant, model, -size, -1)

    def _reserve_tenants(self, needs: dict[tuple[str, str], int], sign: int) -> None:
        """Charge (``sign`` 1) or credit (-1) the tenants for the bytes of a batch's uploads in flight."""
        for (tenant, model), nbytes in needs.items():
            self._usage.change(tenant, model, sign * nbytes)

    def _make_tenant_room(self, needs: dict[tuple[str, str], int], batch: set[str]) -> list[str]:
        """Victims that bring each tenant of the batch within its quota: its own least recently used records (not
        of this batch, not pinned). Raises CapacityError, having taken nothing out of the index, when a tenant
        cannot fit. Caller holds ``_lock``."""
        totals: dict[str, int] = {}
        for (tenant, _), nbytes in needs.items():
            totals[tenant] = totals.get(tenant, 0) + nbytes
        victims: list[str] = []
        for tenant, nbytes in totals.items():
            quota = self._quotas.quota(tenant)
            if quota is None:
                continue
            excess = self._usage.excess(tenant, nbytes)
            for name in self._usage.victims(tenant):
                if excess <= 0:
                    break
                if name in batch or self._pins.get(name):
                    continue
                victims.append(name)
                excess -= self._index[name]
            if excess > 0:
                raise CapacityError(
                    f"object store {self.url}: {nbytes} bytes of tenant {tenant or '(no salt)'} do not fit in its "
                    f"quota of {quota} ({self._usage.bytes_of(tenant)} held or being written, the rest pinned)"
                )
        return victims

    def _make_room(self, need: int, batch: set[str], needs: dict[tuple[str, str], int]) -> tuple[list[str], int]:
        """Reserve ``need`` bytes, choosing victims: first the tenants' own over their quotas, then least recently
        used ones (not of this batch, not pinned) while the capacity is short; the victims leave the index at once
        and are returned for deletion, with how many of them (the first) were a tenant's. Caller holds ``_lock``."""
        victims = self._make_tenant_room(needs, batch) if self._quotas.enabled else []
        chosen = set(victims)
        by_quota = len(victims)
        if self._capacity is None:
            free = need
        else:
            free = self._capacity - self._used - self._reserved + sum(self._index[n] for n in victims)
        if need > free:
            for name, size in self._index.items():
                if need <= free:
                    break
                if name in batch or name in chosen or self._pins.get(name):
                    continue
                victims.append(name)
                free += size
        if need > free:  # nothing was taken out of the index yet: the failed batch changes nothing
            raise CapacityError(
                f"object store {self.url}: {need} bytes do not fit in {self._capacity} "
                f"({self._used} used, {self._reserved} being written, the rest pinned)"
            )
        for name in victims:
            self._index_drop(name)
        self._reserved += need
        self._reserve_tenants(needs, 1)
        return victims, by_quota

    def _pin(self, names: Sequence[str]) -> None:
        with self._lock:
            for n in names:
                self._pins[n] = self._pins.get(n, 0) + 1

    def _unpin(self, names: Sequence[str]) -> None:
        with self._lock:
            for n in names:
                left = self._pins[n] - 1
                if left:
                    self._pins[n] = left
                else:
                    del self._pins[n]

    # -- store ------------------------------------------------------------------------------------------------
    def _store(self, keys: Sequence[str], records: Sequence[Sequence[Buffer]]) -> None:
        # A key twice in a batch: the last record wins, as with the other adapters.
        latest: dict[str, list[memoryview]] = {}
        for key, record in zip(keys, records, strict=True):
            latest[object_name(key)] = [memoryview(b).cast("B") for b in record]
        sizes = {name: sum(v.nbytes for v in views) for name, views in latest.items()}
        with self._lock:
            todo = [n for n in latest if self.shared or n not in self._index]
            skipped = len(latest) - len(todo)
            for n in latest:
                if n in self._index:
                    self._index.move_to_end(n)
                    self._usage.access(_tenant_of_name(n)[0], n)
        if skipped:
            self._health.count("uploads_skipped", skipped)
        if not todo:
            return
        need = sum(sizes[n] for n in todo)
        needs: dict[tuple[str, str], int] = {}
        for n in todo:
            needs[_tenant_of_name(n)] = needs.get(_tenant_of_name(n), 0) + sizes[n]
        victims: list[str] = []
        by_quota = 0
        bounded = self._capacity is not None or self._quotas.enabled
        if bounded:
            if self._capacity is not None and need > self._capacity:
                exc = CapacityError(
                    f"object store {self.url}: batch of {need} bytes exceeds the capacity of {self._capacity}"
                )
                self._health.failed("capacity_errors", str(exc))
                raise exc
            try:
                with self._lock:
                    victims, by_quota = self._make_room(need, set(latest), needs)
            except CapacityError as exc:
                self._health.failed("capacity_errors", str(exc))
                raise
        self._pin(todo)
        created: list[str] = []
        created_lock = threading.Lock()
        try:
            if victims:
                self._backend_call(lambda: self._delete_names(victims))
                self._health.count("evictions", len(victims))
                self._evicted([k for k in map(key_of_name, victims) if k is not None])  # the Store's KV events
                if by_quota:
                    self._health.count("quota_evictions", by_quota)

            def upload(name: str) -> int:
                size = self._upload(name, latest[name], sizes[name])
                if size < 0:
                    with created_lock:
                        created.append(name)
                    return sizes[name]
                return size

            stored = self._backend_call(lambda: self._map(upload, todo))
        except BaseException:
            if bounded:
                with self._lock:
                    self._reserved -= need
                    self._reserve_tenants(needs, -1)
            self._unpin(todo)
            if created:
                self._delete_quietly(created)
            raise
        mine = set(created)
        with self._lock:
            if bounded:
                self._reserved -= need
                self._reserve_tenants(needs, -1)
            for name, size in zip(todo, stored, strict=True):
                self._index_put(name, size)
                if name in mine:  # its head is known: the layouts() of a later load needs no round trip
                    self._keep_head(name, _head_of(latest[name]))
                else:  # someone else's record: its head is whatever it is
                    self._heads.pop(name, None)
        self._unpin(todo)

    def _upload(self, name: str, views: list[memoryview], size: int) -> int:
        """Upload one record unless its object exists: -1 when this call created it, else the size of the object
        already there (kept as it is: the key names its content)."""
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        obs = self._obs()
        multipart = size > self._multipart_threshold
        if multipart or (self.shared and size >= _PROBE_BEFORE_PUT):
            try:
                existing = int(obs.head(self._store_obj, name)["size"])
            except FileNotFoundError as exc:
                if not self._is_missing(exc):
                    raise
            else:
                self._health.count("uploads_skipped")
                return existing
        if multipart:
            obs.put(
                self._store_obj,
                name,
                iter(views),
                use_multipart=True,
                chunk_size=self._multipart_part,
                max_concurrency=4,
            )
            self._health.count("multipart_uploads")
        else:
            try:
                # A single PUT of the buffers as they are (the client takes them without a joined copy),
                # conditional: an object that is already there is not replaced.
                obs.put(self._store_obj, name, iter(views), mode="create", use_multipart=False)
            except (AlreadyExistsError, PreconditionError):
                self._health.count("uploads_skipped")
                if self.shared:  # used_bytes is this server's estimate there: spare the round trip
                    return size
                return int(obs.head(self._store_obj, name)["size"])  # owned: the index must be exact
        self._health.count("uploads")
        return -1

    # -- load -------------------------------------------------------------------------------------------------
    def _load(self, keys: Sequence[str], dsts: Sequence[Sequence[Buffer]]) -> list[int]:
        names = [object_name(k) for k in keys]
        self._pin(names)
        try:
            lengths = self._backend_call(lambda: self._map(self._get_into, list(zip(names, dsts, strict=True))))
        finally:
            self._unpin(names)
        with self._lock:
            for name, n in zip(names, lengths, strict=True):
                if n == MISS:
                    self._index_drop(name)
                    self._heads.pop(name, None)
                elif self.shared or name in self._index:
                    self._index_put(name, n)  # most recently used; its size as read (exact from now on)
        return lengths

    def _load_with(self, keys: Sequence[str], head_size: int, prepare: Prepare) -> list[int]:
        """Header-first loads. On a prefix this server owns, a record it stored has its size in the index and its
        head in the head cache: the header is parsed from those and the record read with one ``GET``. Any other
        record takes the generic path (its head read first)."""
        names = [object_name(k) for k in keys]
        known: dict[int, tuple[bytes, int]] = {}
        if not self.shared:
            with self._lock:
                for i, name in enumerate(names):
                    head, size = self._heads.get(name), self._index.get(name)
                    if head is not None and size is not None and (len(head) >= head_size or len(head) >= size):
                        known[i] = (head, size)
        out = [MISS] * len(keys)
        later: list[tuple[int, Sequence[Buffer]]] = []
        for i, (head, size) in known.items():
            bufs = prepare(i, memoryview(head)[: min(head_size, size)], size)
            if bufs is None:
                out[i] = size
            elif size <= len(head):  # the whole record is the cached head
                scatter(memoryview(head)[:size], bufs)
                out[i] = size
            else:
                later.append((i, bufs))
        if later:
            got = self._load([keys[i] for i, _ in later], [bufs for _, bufs in later])
            for (i, _), n in zip(later, got, strict=True):
                out[i] = n
        rest = [i for i in range(len(keys)) if i not in known]
        if rest:
            sub = super()._load_with([keys[i] for i in rest], head_size, lambda j, h, n: prepare(rest[j], h, n))
            for i, n in zip(rest, sub, strict=True):
                out[i] = n
        return out

    def _get_into(self, item: tuple[str, Sequence[Buffer]]) -> int:
        """GET one record, its body streamed into the caller's buffers; its size, or MISS."""
        name, dst = item
        try:
            result = self._obs().get(self._store_obj, name)
        except FileNotFoundError as exc:
            if self._is_missing(exc):
                return MISS
            raise
        size = int(result.meta["size"])
        if size > total_length(dst):
            return size  # does not fit: the caller needs only the size; the body is never read
        views = [memoryview(b).cast("B") for b in dst]
        vi, off, got = 0, 0, 0
        for piece in result.stream(min_chunk_size=_STREAM_PIECE):
            src = memoryview(piece)
            pos = 0
            while pos < len(src):
                if vi >= len(views):
                    raise L2Error(f"object store {self.url}: {name} grew while it was read")
                view = views[vi]
                take = min(len(view) - off, len(src) - pos)
                view[off : off + take] = src[pos : pos + take]
                pos += take
                off += take
                if off == len(view):
                    vi, off = vi + 1, 0
            got += len(src)
        if got != size:
            raise L2Error(f"object store {self.url}: {name}: {got} of {size} bytes received")
        return size

    def _read_heads(self, keys: Sequence[str], size: int) -> list[bytes | None]:
        names = [object_name(k) for k in keys]
        out: list[bytes | None] = [None] * len(names)
        todo: list[int] = []
        with self._lock:
            for i, name in enumerate(names):
                # Shared mode: a head from contains() serves the one read that follows (others may delete and
                # rewrite the record). Owned mode: heads of records this server wrote stay while they are held.
                cached = self._heads.pop(name, None) if self.shared else self._heads.get(name)
                # A cached head serves when it holds `size` bytes or the whole (shorter) record.
                if cached is not None and (len(cached) >= size or len(cached) < _PROBE_BYTES):
                    out[i] = cached[:size]
                else:
                    todo.append(i)
        if len(todo) < len(names):
            self._health.count("head_cache_hits", len(names) - len(todo))
        if todo:
            heads = self._backend_call(lambda: self._map(lambda i: self._get_head(names[i], size), todo))
            with self._lock:
                for i, head in zip(todo, heads, strict=True):
                    out[i] = head
                    if head is None:  # gone (a lifecycle rule, a restarted test endpoint): forget it
                        self._index_drop(names[i])
                        self._heads.pop(names[i], None)
        return out

    def _get_head(self, name: str, size: int) -> bytes | None:
        """The first ``size`` bytes of an object (all of it when shorter), ``None`` when absent."""
        try:
            return bytes(self._obs().get_range(self._store_obj, name, start=0, length=max(size, 1)))[:size]
        except FileNotFoundError as exc:
            if self._is_missing(exc):
                return None
            raise
        except Exception as exc:
            # A range of an empty object is "not satisfiable" (416): the object is there and holds nothing.
            if "status code: 416" in str(exc) or "InvalidRange" in str(exc):
                return b""
            raise

    def _contains(self, keys: Sequence[str]) -> list[bool]:
        names = [object_name(k) for k in keys]
        if not self.shared:
            with self._lock:
                return [n in self._index for n in names]
        heads = self._backend_call(lambda: self._map(lambda n: self._get_head(n, _PROBE_BYTES), names))
        with self._lock:
            for name, head in zip(names, heads, strict=True):
                if head is not None:
                    self._keep_head(name, head)
        return [h is not None for h in heads]

    def _keep_head(self, name: str, head: bytes) -> None:
        """Remember a record's first bytes (bounded, oldest dropped); caller holds ``_lock``."""
        self._heads[name] = head
        self._heads.move_to_end(name)
        while len(self._heads) > _HEAD_CACHE_ENTRIES:
            self._heads.popitem(last=False)

    # -- delete -----------------------------------------------------------------------------------------------
    def _delete(self, keys: Sequence[str]) -> None:
        names = list(dict.fromkeys(object_name(k) for k in keys))
        self._backend_call(lambda: self._delete_names(names))

    def _delete_names(self, names: list[str]) -> None:
        with self._lock:
            for name in names:
                self._index_drop(name)
                self._heads.pop(name, None)
        obs = self._obs()
        for start in range(0, len(names), 1000):  # S3 deletes at most 1000 objects per request
            part = names[start : start + 1000]
            try:
                obs.delete(self._store_obj, part)
            except FileNotFoundError as exc:
                if not self._is_missing(exc):
                    raise
                # Azure reports the first absent blob of a bulk delete and no more: delete one by one, so that
                # neither an absent record nor another failure hides behind it.
                if len(part) > 1:
                    self._map(self._delete_one, part)

    def _delete_one(self, name: str) -> None:
        try:
            self._obs().delete(self._store_obj, name)
        except FileNotFoundError as exc:
            if not self._is_missing(exc):
                raise

    def _delete_quietly(self, names: list[str]) -> None:
        try:
            self._backend_call(lambda: self._delete_names(names))
        except L2Error as exc:
            log.warning(
                "L2 object store %s: could not remove %d record(s) of a failed batch: %s", self.url, len(names), exc
            )

    # -- enumeration ------------------------------------------------------------------------------------------
    def _list_keys(self, match: KeyMatch, batch_size: int) -> Iterator[list[str]]:
        """A listing of the store by ``PREFIX/<model>/`` (``PREFIX/<model>/<salt digest>/`` for a tenant of a
        model; the whole prefix for a tenant of every model): the store's own view, so records other servers
        stored under a shared prefix are found too. One list request per batch."""
        for prefix in list_prefixes(match):
            stream: Any = self._backend_call(functools.partial(self._list, prefix or None, batch_size))
            while True:
                page: Any = self._backend_call(functools.partial(next, stream, None))
                if page is None:
                    break
                keys = (key_of_name(str(meta["path"])) for meta in page)
                yield from batched([k for k in keys if k is not None and match.matches(k)], batch_size)

    def _list(self, prefix: str | None, batch_size: int) -> Any:
        return self._obs().list(self._store_obj, prefix=prefix, chunk_size=batch_size)

    # -- reporting --------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._health.lock:
            counts = dict(self._health.counts)
        with self._lock:
            records = len(self._index)
            tenants, models = self._usage.tenants(), self._usage.models()
        return {
            **super().stats(),
            "url": self.url,
            "shared": self.shared,
            "records": records,
            "reachable": self._health.down_since_failures == 0,
            **counts,
            "tenants": tenants,
            "models": models,
        }

    def __repr__(self) -> str:  # the config holds credentials: never print it
        return f"ObjectStoreAdapter({self.url!r}, shared={self.shared})"


def object_store_factory(config: dict[str, Any], where: str) -> ObjectStoreAdapter:
    reader = ConfigReader(config, where)
    url = reader.string("url")
    options = reader.raw("options", {})
    shared = reader.boolean("shared", False)
    gb = reader.number("max_capacity_gb", None, min=0.0)
    max_concurrency = reader.integer("max_concurrency", 16, min=1, max=1024)
    threshold_mb = reader.number("multipart_threshold_mb", 64.0, min=5.0)
    part_mb = reader.number("multipart_part_mb", 16.0, min=5.0, max=5120.0)
    timeout_s = reader.number("timeout_s", 30.0, min=0.001)
    connect_timeout_s = reader.number("connect_timeout_s", 5.0, min=0.001)
    max_retries = reader.integer("max_retries", 3, min=0, max=100)
    retry_timeout_s = reader.number("retry_timeout_s", 10.0, min=0.0)
    quotas = read_adapter_quotas(reader, where)
    reader.finish()
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ConfigError(f"{where}.options: expected a JSON object of settings, got {type(options).__name__}")
    for key, value in options.items():
        if not isinstance(value, str | bool | int | float) or value is None:
            raise ConfigError(f"{where}.options.{key}: expected a string, number or boolean")
    if shared and gb is not None:
        raise ConfigError(
            f"{where}.max_capacity_gb: not allowed with shared: true: several servers share the prefix, so no "
            "one of them can bound it; set lifecycle rules on the bucket instead (README: object store)"
        )
    if gb is not None and gb <= 0:
        raise ConfigError(f"{where}.max_capacity_gb: expected a value > 0, got {gb!r}")
    if shared and quotas.enabled:
        field = "tenant_quota_gb" if quotas.default is not None else "tenant_quotas_gb"
        raise ConfigError(
            f"{where}.{field}: not allowed with shared: true: several servers share the prefix, so no one of them "
            "can hold a tenant to a quota; set lifecycle rules on the bucket instead"
        )
    return ObjectStoreAdapter(
        url,
        options=options,
        shared=shared,
        capacity_bytes=None if gb is None else max(1, int(gb * GiB)),
        max_concurrency=max_concurrency,
        multipart_threshold=int(threshold_mb * MiB),
        multipart_part=int(part_mb * MiB),
        timeout_s=timeout_s,
        connect_timeout_s=connect_timeout_s,
        max_retries=max_retries,
        retry_timeout_s=retry_timeout_s,
        where=where,
        quotas=quotas,
    )
