"""The server's configuration: a YAML or JSON file, then command-line flags on top, checked once at start-up.

Keys (file) and flags (command line) are the same names, ``_`` in files and ``-`` on the command line:

=====================  ===========================  ========================================================
key                    flag                         meaning
=====================  ===========================  ========================================================
``l1_size_gb``         ``--l1-size-gb``             L1 pool size in GiB (required, > 0)
``l1_backing``         ``--l1-backing``             ``anonymous`` (default) | ``memfd`` | ``hugepages``
``eviction_policy``    ``--eviction-policy``        L1 eviction policy name (default ``LRU``)
``l1_quota_gb``        ``--l1-quota-gb``            L1 GiB each tenant (``cache_salt``) may hold (default: none)
``l1_quotas_gb``       ``--l1-quota DIGEST=GB``     per-tenant overrides by salt digest (GiB, or ``none`` for
                                                    no quota); the flag repeats and replaces the file's mapping
``l2_adapters``        ``--l2-adapter JSON``        list of L2 adapter configs, in order; the flag repeats
``chunk_size``         ``--chunk-size``             tokens per chunk (default 256)
``host``               ``--host``                   address to listen on (default ``127.0.0.1``)
``port``               ``--port``                   ZeroMQ port (default 5555)
``http_port``          ``--http-port``              admin HTTP port (default 8555)
``workers``            ``--workers``                request worker threads (default 4)
``max_message_mb``     ``--max-message-mb``         largest accepted request in MB (default 2048)
``log_level``          ``--log-level``              ``debug`` | ``info`` | ``warning`` | ``error``
``log_format``         ``--log-format``             ``json`` (one object per line) | ``text``
``admin_token``        ``--admin-token``            token required by state-changing admin calls (POST
                                                    /clear); also ``KVTIER_ADMIN_TOKEN``; default: none
``events_port``        ``--events-port``            publish KV events on a ZeroMQ PUB socket at ``host``:this
                                                    port (default: none, off); see :mod:`kvtier.events`
``events_hwm``         ``--events-hwm``             messages queued per events subscriber before batches
                                                    are dropped for it (default 1024)
=====================  ===========================  ========================================================

A flag given on the command line replaces the file's value; ``--l2-adapter`` given at least once replaces the
file's whole ``l2_adapters`` list. Every error is a :class:`~kvtier.errors.ConfigError` naming the field and
what was expected. Every check here runs before anything imports torch, so that a wrong flag costs no start-up time.

Secrets (the admin token, Redis passwords in URLs, key files) never leave through :meth:`ServerConfig.to_json`
(redacted) and :meth:`ServerConfig.secrets` lists them for :func:`kvtier.config.scrub`.

A Redis adapter whose host name does not resolve is refused at start (a typo or a missing DNS entry would
otherwise start a server that fails every L2 batch while reporting the tier as reachable); a host that resolves
but does not answer is not an error at start: Redis may come up later, and the adapter reports it unreachable
once a batch fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvtier.config import ConfigReader, redact_config, redact_url, secret_values
from kvtier.errors import ConfigError
from kvtier.storage.admission import admission_of
from kvtier.tenants import TenantQuotas, parse_quota_flag

#: The environment variable that gives the admin token when neither the flag nor the file does.
ADMIN_TOKEN_ENV = "KVTIER_ADMIN_TOKEN"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
L1_BACKINGS = ("anonymous", "memfd", "hugepages")  # kvtier.storage.l1.BACKINGS, without importing torch here


@dataclass(frozen=True, repr=False)
class ServerConfig:
    """The checked configuration of ``kvtier server``."""

    l1_size_gb: float
    eviction_policy: str = "LRU"
    l2_adapters: list[dict[str, Any]] = field(default_factory=list)
    chunk_size: int = 256
    host: str = "127.0.0.1"
    port: int = 5555
    http_port: int = 8555
    workers: int = 4
    max_message_mb: float = 2048.0
    log_level: str = "info"
    log_format: str = "json"
    l1_backing: str = "anonymous"
    admin_token: str | None = field(default=None, repr=False)
    l1_quota_gb: float | None = None
    l1_quotas_gb: dict[str, float | None] = field(default_factory=dict)
    events_port: int | None = None
    events_hwm: int = 1024

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1e6)

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def store_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``kvtier.Store`` (the same keys as the flags)."""
        return {
            "l1_size_gb": self.l1_size_gb,
            "eviction_policy": self.eviction_policy,
            "l2_adapters": [dict(a) for a in self.l2_adapters],
            "chunk_size": self.chunk_size,
            "l1_backing": self.l1_backing,
            "l1_quota_gb": self.l1_quota_gb,
            "l1_quotas_gb": dict(self.l1_quotas_gb),
        }

    def to_json(self) -> dict[str, Any]:
        """The config as JSON data, secrets redacted: the only form that is logged or reported."""
        doc: dict[str, Any] = redact_config(asdict(self))
        return doc

    def __repr__(self) -> str:
        # A config in a traceback or a debug line must not carry its secrets either.
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_json().items())
        return f"ServerConfig({fields})"

    def secrets(self) -> list[str]:
        """Every secret string of this config (and the key material its ``key_env`` fields name)."""
        return secret_values(asdict(self), os.environ)

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> ServerConfig:
        """Check every field of ``data`` (a dict as read from a file, with flags already merged in)."""
        r = ConfigReader(data, where)
        adapters = r.raw("l2_adapters", [])
        if not isinstance(adapters, list):
            raise ConfigError(f"{where}.l2_adapters: expected a list of JSON objects, got {adapters!r}")
        for i, adapter in enumerate(adapters):
            if not isinstance(adapter, dict):
                raise ConfigError(f"l2_adapters[{i}]: expected a JSON object, got {redact_config(adapter)!r}")
            if not isinstance(adapter.get("type"), str):
                raise ConfigError(
                    f"l2_adapters[{i}].type: expected an adapter type name (a string), "
                    f"got {redact_config(adapter.get('type'))!r}"
                )
            admission_of(adapter, f"l2_adapters[{i}]")  # before torch loads: a wrong policy fails at once
        quota_gb = r.raw("l1_quota_gb", None)
        quotas_gb = r.raw("l1_quotas_gb", None)
        TenantQuotas.parse(quota_gb, quotas_gb, "l1_quota_gb", "l1_quotas_gb")  # checked here, before torch loads
        config = cls(
            l1_size_gb=r.number("l1_size_gb", min=1e-6),
            eviction_policy=r.string("eviction_policy", "LRU"),
            l2_adapters=adapters,
            chunk_size=r.integer("chunk_size", 256, min=1, max=1 << 20),
            host=r.string("host", "127.0.0.1"),
            port=r.integer("port", 5555, min=1, max=65535),
            http_port=r.integer("http_port", 8555, min=1, max=65535),
            workers=r.integer("workers", 4, min=1, max=256),
            max_message_mb=r.number("max_message_mb", 2048.0, min=0.001),
            log_level=r.string("log_level", "info", choices=LOG_LEVELS),
            log_format=r.string("log_format", "json", choices=LOG_FORMATS),
            l1_backing=r.string("l1_backing", "anonymous", choices=L1_BACKINGS),
            admin_token=_admin_token(r),
            l1_quota_gb=None if quota_gb is None else float(quota_gb),
            l1_quotas_gb={k: None if v is None else float(v) for k, v in (quotas_gb or {}).items()},
            events_port=r.integer("events_port", None, min=1, max=65535),
            events_hwm=r.integer("events_hwm", 1024, min=1, max=1 << 20),
        )
        r.finish()
        if config.port == config.http_port:
            raise ConfigError(f"http_port: expected a port other than port ({config.port})")
        if config.events_port in (config.port, config.http_port):
            raise ConfigError(f"events_port: expected a port other than port and http_port ({config.events_port})")
        return config


def _admin_token(r: ConfigReader) -> str | None:
    token = r.raw("admin_token", None)
    if token is None:
        return None
    # Never echo the value: it is a secret even when it is malformed.
    if not isinstance(token, str) or not 16 <= len(token) <= 512 or not token.isprintable() or " " in token:
        raise ConfigError(
            f"admin_token: expected 16-512 printable characters without spaces (e.g. from `openssl rand -hex 32`), "
            f"got a {type(token).__name__} of length {len(token) if isinstance(token, str) else '?'}"
        )
    return token


# The flags that map onto config keys; argparse dests equal the keys.
_FLAG_KEYS = (
    "l1_size_gb",
    "eviction_policy",
    "chunk_size",
    "host",
    "port",
    "http_port",
    "workers",
    "max_message_mb",
    "log_level",
    "log_format",
    "l1_backing",
    "admin_token",
    "l1_quota_gb",
    "events_port",
    "events_hwm",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``kvtier server``. Defaults are None so that only given flags override the file."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file with the same keys as the flags")
    parser.add_argument(
        "--l1-size-gb", type=float, metavar="GB", help="L1 memory pool size in GiB (2**30 bytes; required)"
    )
    parser.add_argument("--eviction-policy", metavar="NAME", help="L1 eviction policy (default: LRU)")
    parser.add_argument(
        "--l1-quota-gb",
        type=float,
        metavar="GB",
        help="L1 GiB each tenant (cache_salt; requests without one are one tenant) may hold; a tenant at its quota "
        "evicts its own chunks first (default: no quota)",
    )
    parser.add_argument(
        "--l1-quota",
        action="append",
        metavar="DIGEST=GB",
        help='a tenant\'s own L1 quota, by salt digest (printf %%s "$SALT" | python -m kvtier.tenants digest); '
        "GB 'none' exempts it from --l1-quota-gb; repeat for more tenants (replaces the file's l1_quotas_gb)",
    )
    parser.add_argument(
        "--l1-backing",
        choices=L1_BACKINGS,
        help="L1 memory: anonymous (default; nothing in /dev/shm, gone with the process), memfd, or hugepages "
        "(falls back to transparent huge pages with a warning when none are reserved)",
    )
    parser.add_argument(
        "--l2-adapter",
        action="append",
        metavar="JSON",
        help='an L2 adapter config, e.g. \'{"type": "fs", "base_path": "/data/kvtier"}\'; repeat for more '
        "tiers, in order (replaces the file's l2_adapters)",
    )
    parser.add_argument("--chunk-size", type=int, metavar="TOKENS", help="tokens per chunk (default: 256)")
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, help="ZeroMQ request port (default: 5555)")
    parser.add_argument("--http-port", type=int, help="admin HTTP port: /health /stats /metrics /clear (default: 8555)")
    parser.add_argument("--workers", type=int, help="request worker threads (default: 4)")
    parser.add_argument("--max-message-mb", type=float, metavar="MB", help="largest accepted request (default: 2048)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default: info)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, help="json lines or plain text (default: json)")
    parser.add_argument(
        "--events-port",
        type=int,
        help="publish KV events (stored / evicted / purged per chunk) on a ZeroMQ PUB socket at --host:PORT, for "
        "KV-aware routers (default: off)",
    )
    parser.add_argument(
        "--events-hwm",
        type=int,
        metavar="MESSAGES",
        help="event messages queued per subscriber before batches are dropped for it (default: 1024)",
    )
    parser.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help=f"require 'Authorization: Bearer TOKEN' for state-changing admin calls (POST /clear); prefer "
        f"${ADMIN_TOKEN_ENV} or the config file, which other users cannot read in the process list",
    )


def read_config_file(path: str) -> dict[str, Any]:
    """A config file as a dict: JSON when it ends in ``.json``, YAML otherwise (YAML also reads JSON)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r} ({exc.strerror}); expected a readable file") from exc
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise ConfigError(f"--config: {path!r} is not valid {kind} ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_adapter_flag(text: str, index: int) -> dict[str, Any]:
    """One ``--l2-adapter`` value: a JSON object with a ``type``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--l2-adapter #{index + 1}: invalid JSON ({exc.msg} at character {exc.pos}); expected an object "
            f'like \'{{"type": "fs", "base_path": "/data/kvtier"}}\', got {text!r}'
        ) from exc
    if not isinstance(value, dict):
        raise ConfigError(f"--l2-adapter #{index + 1}: expected a JSON object, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Merge ``--config FILE`` and the flags (flags win) and check the result."""
    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    for key in _FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    if args.l2_adapter:
        data["l2_adapters"] = [parse_adapter_flag(text, i) for i, text in enumerate(args.l2_adapter)]
    if getattr(args, "l1_quota", None):
        data["l1_quotas_gb"] = dict(parse_quota_flag(text, "--l1-quota") for text in args.l1_quota)
    if "admin_token" not in data and os.environ.get(ADMIN_TOKEN_ENV):
        data["admin_token"] = os.environ[ADMIN_TOKEN_ENV]
    config = ServerConfig.from_dict(data)
    check_types(config)
    check_base_paths(config)
    check_redis_hosts(config)
    return config


#: The adapter and serde types that ship with kvtier, so that a misspelt ``type`` is found before torch loads
#: (the registries live beside torch-importing code). A test holds them equal to the registries' built-ins.
BUILTIN_ADAPTER_TYPES = frozenset({"fs", "memory", "faulty", "redis", "object_store"})
BUILTIN_SERDE_TYPES = frozenset({"raw", "fp8", "lz4", "zstd", "aesgcm", "checksum"})


def _plugin_names() -> set[str]:
    """Names that packages register in any ``kvtier.*`` entry-point group (plugins may add adapters or serdes)."""
    import importlib.metadata

    groups = [g for g in importlib.metadata.entry_points().groups if g.startswith("kvtier")]
    return {ep.name for g in groups for ep in importlib.metadata.entry_points(group=g)}


def check_types(config: ServerConfig) -> None:
    """Every adapter's and serde stage's ``type`` names a built-in or a plugin (the rest of their fields is
    checked by their factories when the Store is built)."""
    plugins: set[str] | None = None

    def known(name: Any, builtins: frozenset[str]) -> bool:
        nonlocal plugins
        if not isinstance(name, str) or name in builtins:
            return True  # not a string: the registry names the problem
        if plugins is None:
            plugins = _plugin_names()
        return name in plugins

    for i, adapter in enumerate(config.l2_adapters):
        if not known(adapter["type"], BUILTIN_ADAPTER_TYPES):
            raise ConfigError(
                f"l2_adapters[{i}].type: unknown L2 adapter {redact_config(adapter['type'])!r}; known adapters are "
                f"{sorted(BUILTIN_ADAPTER_TYPES | (plugins or set()))}"
            )
        serde = adapter.get("serde")
        stages = serde if isinstance(serde, list) else [serde] if isinstance(serde, dict) else []
        for j, stage in enumerate(stages):
            name = stage.get("type") if isinstance(stage, dict) else None
            if not known(name, BUILTIN_SERDE_TYPES):
                where = f"l2_adapters[{i}].serde" + (f"[{j}]" if isinstance(serde, list) else "")
                raise ConfigError(
                    f"{where}.type: unknown serde {redact_config(name)!r}; known serdes are "
                    f"{sorted(BUILTIN_SERDE_TYPES | (plugins or set()))}"
                )


def check_redis_hosts(config: ServerConfig) -> None:
    """Every Redis adapter's host name must resolve (see the module docstring). Only the host is named in the
    error, never the URL (it may carry a password)."""
    from urllib.parse import urlsplit

    for i, adapter in enumerate(config.l2_adapters):
        url = adapter.get("url")
        if adapter.get("type") != "redis" or not isinstance(url, str) or not url.startswith(("redis://", "rediss://")):
            continue  # unix sockets and other adapters: nothing to resolve; the adapter checks the rest
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port or 6379
        except ValueError:
            continue  # malformed: the adapter's own URL check names the problem
        if not host:
            continue
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
            raise ConfigError(
                f"l2_adapters[{i}].url: the Redis host {host!r} does not resolve ({reason}); expected a host name "
                f"this machine can resolve (in {redact_url(url)!r})"
            ) from None


def check_base_paths(config: ServerConfig) -> None:
    """Every adapter's ``base_path`` must be a directory the server can create and write (checked now, since
    adapters create their resources lazily and the first write would fail long after start-up)."""
    for i, adapter in enumerate(config.l2_adapters):
        if "base_path" not in adapter:
            continue
        path = adapter["base_path"]
        if not isinstance(path, str) or not path:
            raise ConfigError(f"l2_adapters[{i}].base_path: expected a directory path (a string), got {path!r}")
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".kvtier-probe-"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"l2_adapters[{i}].base_path: cannot write to {path!r} ({exc.strerror}); expected a writable directory"
            ) from exc
