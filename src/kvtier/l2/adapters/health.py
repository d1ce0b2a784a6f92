"""How a networked L2 backend is doing: batches and failures counted by kind, logged sparingly.

An outage (a failure of one of the adapter's ``outage_kinds``: the backend cannot be reached, times out, ...) is
logged once when it starts and once when it ends, with the number of batches it failed; any other failure (a full
server fails every store) at most once a minute per kind, with the count of those left out. An operator then sees
one line per incident instead of one per request, and ``stats()`` still counts every failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

LOG_EVERY_S = 60.0


class BackendHealth:
    """Counters of one adapter (``counts``, read under ``lock``) and its outage state.

    ``label`` names the backend in log lines (already redacted: no password). ``log`` is the adapter's own
    logger, so that its lines keep their origin. ``counters`` are the adapter's other counters, kept here too so
    that ``stats()`` reads every counter in one place.
    """

    def __init__(
        self, label: str, log: logging.Logger, outage_kinds: Iterable[str], counters: Iterable[str] = ()
    ) -> None:
        self.label = label
        self.lock = threading.Lock()
        self.down_since_failures = 0
        self._log = log
        self._outage_kinds = frozenset(outage_kinds)
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.counts = dict.fromkeys(
            ("batches", "failed_batches", *sorted(self._outage_kinds), "other_errors", "outages", *counters), 0
        )

    @property
    def down(self) -> bool:
        """Whether the last batch failed with an outage kind (and none has succeeded since)."""
        return self.down_since_failures > 0

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def ok(self) -> None:
        """A batch succeeded: an outage in progress ends, logged once with the number of batches it failed."""
        with self.lock:
            self.counts["batches"] += 1
            failures, self.down_since_failures = self.down_since_failures, 0
        if failures:
            self._log.warning("L2 %s: reachable again after %d failed batch(es)", self.label, failures)

    def failed(self, kind: str, message: str) -> None:
        """A batch failed with ``kind`` (a counter name); ``message`` (redacted) says how, for the log line."""
        now = time.monotonic()
        with self.lock:
            self.counts["batches"] += 1
            self.counts["failed_batches"] += 1
            self.counts[kind] += 1
            outage = kind in self._outage_kinds
            if outage:
                first = self.down_since_failures == 0
                if first:
                    self.counts["outages"] += 1
                self.down_since_failures += 1
                suppressed = 0
            else:
                first = now - self._last_logged.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S
                suppressed = self._suppressed.get(kind, 0)
                if first:
                    self._last_logged[kind] = now
                    self._suppressed[kind] = 0
                else:
                    self._suppressed[kind] = suppressed + 1
        if not first:
            return
        if outage:
            self._log.warning("L2 %s: %s (%s); its batches fail until it is back", self.label, kind, message)
        else:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            self._log.warning("L2 %s: batch failed, %s: %s%s", self.label, kind, message, more)
