"""Structured logs for the server: one JSON object per line on stderr (or plain text), with levels.

Every record carries ``ts`` (UTC, ISO 8601), ``level``, ``logger`` and ``msg``; fields passed as
``log.info("...", extra={"fields": {...}})`` are merged into the object, so that log pipelines can filter on them
(``op``, ``port``, ``pending_l2``, ...).

Every line goes through :func:`kvtier.config.scrub` with the config's secrets before it is written: whatever a
message quotes (an exception from a backend, a config value), a password, token or key never reaches the log.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from kvtier.config import scrub, scrub_tree

LOGGER_NAME = "kvtier"
#: Refused and failed requests are logged at most once per kind per this many seconds (with a count of the rest).
ERROR_LOG_INTERVAL_S = 60.0


class _Scrubbing(logging.Formatter):
    """A formatter that keeps the config's secrets out of what it writes."""

    secrets: Sequence[str] = ()

    def format(self, record: logging.LogRecord) -> str:
        return scrub(self.render(record), self.secrets)

    def render(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class JsonFormatter(_Scrubbing):
    """A log record as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        # Scrubbed value by value, before encoding: scrubbing the encoded line could cut a JSON escape in two.
        return json.dumps(scrub_tree(self.document(record), self.secrets), default=str)

    def document(self, record: logging.LogRecord) -> dict[str, Any]:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        doc: dict[str, Any] = {
            "ts": ts,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return doc

    def render(self, record: logging.LogRecord) -> str:
        return json.dumps(self.document(record), default=str)


class TextFormatter(_Scrubbing):
    """``ts level logger: msg key=value ...``."""

    def render(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "fields", None)
        extra = "".join(f" {k}={v}" for k, v in fields.items()) if isinstance(fields, dict) else ""
        line = f"{ts} {record.levelname.lower():7s} {record.name}: {record.getMessage()}{extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "json", secrets: Sequence[str] = ()) -> logging.Logger:
    """Configure the ``kvtier`` logger tree to write to stderr, ``secrets`` scrubbed from every line; returns it.
    Safe to call again."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    formatter: _Scrubbing = JsonFormatter() if fmt == "json" else TextFormatter()
    formatter.secrets = tuple(secrets)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: ``log.info("bound", extra=fields(port=5555))``."""
    return {"fields": values}


class RateLimitedLog:
    """Logs a kind of event at most once per ``interval_s``; the next report says how many were left out.

    A client that sends garbage in a loop must not turn the server's log into a copy of its traffic.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = ERROR_LOG_INTERVAL_S) -> None:
        self._log = logger
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, level: int, kind: str, msg: str, exc_info: bool = False, **values: Any) -> bool:
        """Log ``msg`` with ``values`` unless ``kind`` was logged within the interval; True when logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            values["suppressed_since_last"] = suppressed
        self._log.log(level, msg, exc_info=exc_info, extra=fields(kind=kind, **values))
        return True
