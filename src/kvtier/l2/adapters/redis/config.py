"""The Redis adapter's config: URL and key-prefix checks (pure parsing, no connection) and the factory that reads
``{"type": "redis", ...}`` with a :class:`~kvtier.config.ConfigReader`, so a bad value fails at start naming the
field. The password never appears in logs, stats or errors (:func:`redact_url`)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kvtier.errors import ConfigError


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
    """Reject a prefix that could clash with the accounting keys or another tool's keys, naming the field."""
    if not 1 <= len(prefix) <= 200 or any(c.isspace() or not c.isprintable() or c in "{}@" for c in prefix):
        raise ConfigError(
            f"{where}.key_prefix: expected 1-200 printable characters without spaces, '{{', '}}' or '@', got {prefix!r}"
        )
