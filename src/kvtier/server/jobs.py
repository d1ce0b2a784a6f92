"""Invalidations (purge, delete, clear) that the server runs off its request loop, as jobs.

A purge of a model on a large L2 walks millions of records; run on a request worker it would hold that worker (and
a client's request timeout) for as long. So each invalidation gets its own thread; the request that started it is
answered when the job is done or after a short wait, with its progress, and the client polls (``JobStatus``)
until it is done. The Store's batches interleave with the other workers' requests, so serving goes on. Progress is
in the reply and in ``/stats`` (``server.invalidations``) while it runs. Finished jobs are kept for a while so a
poll that comes late still gets the result.

A job's documents hold a model name and a salt's *digest*, never a salt.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvtier.errors import CapacityError, NotFoundError
from kvtier.server.logs import fields

log = logging.getLogger("kvtier.server")

#: Invalidations that may run at once; another one is refused (``capacity``) until one ends.
MAX_RUNNING = 4
#: Finished jobs kept for late polls (oldest dropped).
KEEP_FINISHED = 64
#: The longest a request waits for a job before answering with its progress.
MAX_WAIT_S = 5.0

Progress = Callable[[dict[str, Any]], None]


@dataclass(eq=False)
class Job:
    id: int
    what: dict[str, Any]  # op and selector, secrets left out
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)


class Jobs:
    """The invalidation jobs of one server."""

    def __init__(self, max_running: int = MAX_RUNNING) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._jobs: OrderedDict[int, Job] = OrderedDict()
        self._max_running = max_running

    def start(self, what: dict[str, Any], run: Callable[[Progress], dict[str, Any]]) -> Job:
        """Run ``run(progress)`` on its own thread; raises CapacityError when too many run already."""
        with self._lock:
            running = sum(1 for j in self._jobs.values() if not j.done.is_set())
            if running >= self._max_running:
                raise CapacityError(f"{running} invalidations are running; retry when one has finished")
            job = Job(next(self._ids), dict(what), progress={**what, "state": "starting"})
            self._jobs[job.id] = job
            finished = [j.id for j in self._jobs.values() if j.done.is_set()]
            for old in finished[: max(0, len(finished) - KEEP_FINISHED)]:
                del self._jobs[old]

        def progress(doc: dict[str, Any]) -> None:
            job.progress = {**what, **doc}

        def body() -> None:
            try:
                result = run(progress)
            except Exception as exc:  # reported to the poller; the job never takes the server down
                log.warning("invalidation failed", extra=fields(job=job.id, error=f"{type(exc).__name__}: {exc}"))
                result = {"errors": [f"{type(exc).__name__}: {exc}"]}
            job.result = {**what, **result, "elapsed_s": round(time.monotonic() - job.started, 3)}
            job.progress = {**job.progress, "state": "done"}
            job.done.set()
            log.info("invalidation done", extra=fields(job=job.id, **_loggable(job.result)))

        threading.Thread(target=body, name=f"kvtier-invalidate-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: int) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no invalidation job {job_id} (finished long ago, or never started)")
        return job

    @staticmethod
    def wait(job: Job, wait_s: float) -> bool:
        wait = min(max(float(wait_s), 0.0), MAX_WAIT_S)
        return job.done.wait(wait)

    def running(self) -> list[dict[str, Any]]:
        """Progress of the jobs running now (for ``/stats``)."""
        with self._lock:
            return [{"job": j.id, **j.progress} for j in self._jobs.values() if not j.done.is_set()]


def _loggable(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k in ("op", "model_name", "salt_digest", "l1", "l2_deleted", "errors")}
