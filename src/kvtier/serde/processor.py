"""Runs a serializer / deserializer pair over batches on a thread pool.

A batch succeeds or fails as a whole: :class:`BatchResult` says which items failed and why, and
:meth:`AsyncSerdeProcessor.serialize_batch` raises :class:`~kvtier.errors.BatchError` if any did. The pool is
created on the first batch, so a processor that is configured but never used costs no threads.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.config import canonical_json, config_hash
from kvtier.errors import BatchError, ConfigError
from kvtier.serde.base import Deserializer, Serializer
from kvtier.types import LayoutDesc


@dataclass
class BatchResult:
    """Outcome of one batch. ``sizes[i]`` is the byte count item ``i`` wrote (serialize; 0 for deserialize)."""

    sizes: list[int]
    errors: dict[int, BaseException] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_failed(self, what: str = "serde batch") -> None:
        if self.errors:
            raise BatchError(f"{what} failed", self.errors)


@dataclass(frozen=True)
class SerdeIdentity:
    """Names a serde pipeline in every record it writes: ``name`` (e.g. ``fp8+zstd``) and a config hash."""

    name: str
    config_hash: bytes

    @classmethod
    def of_config(cls, config: Any) -> SerdeIdentity:
        """The identity of a serde config. ``max_workers`` is left out: the thread count does not change a byte
        of output, so changing it must not turn every stored record into a foreign one."""
        if config is None:
            return cls("none", config_hash(None))
        stages = config if isinstance(config, list) else [config]
        stages = [
            {k: v for k, v in stage.items() if k != "max_workers"} if isinstance(stage, dict) else stage
            for stage in stages
        ]
        name = "+".join(str(stage.get("type", "?")) if isinstance(stage, dict) else "?" for stage in stages)
        return cls(name, config_hash(stages if isinstance(config, list) else stages[0]))


class AsyncSerdeProcessor:
    """Runs ``serializer`` and ``deserializer`` over batches on up to ``max_workers`` threads.

    ``config`` is the JSON config the processor was built from (set by
    :func:`~kvtier.serde.registry.create_serde_processor`); two processors are equal when their configs are.
    """

    def __init__(self, serializer: Serializer, deserializer: Deserializer, max_workers: int = 1) -> None:
        if not isinstance(serializer, Serializer):
            raise ConfigError(f"serializer: expected a kvtier.serde.Serializer, got {type(serializer).__name__}")
        if not isinstance(deserializer, Deserializer):
            raise ConfigError(f"deserializer: expected a kvtier.serde.Deserializer, got {type(deserializer).__name__}")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError(f"max_workers: expected an integer >= 1, got {max_workers!r}")
        self.serializer = serializer
        self.deserializer = deserializer
        self.max_workers = max_workers
        self.config: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        # Busy time and item counts per op, for /stats and /metrics (one lock per item: microseconds against the
        # milliseconds of a chunk).
        self._timing_lock = threading.Lock()
        self._timing = {op: [0.0, 0, 0] for op in ("serialize", "deserialize")}  # seconds, items, failures

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def identity(self) -> SerdeIdentity:
        """The pipeline identity written into every record (``custom`` when built without a config)."""
        if self.config is None:
            return SerdeIdentity(type(self.serializer).__name__, config_hash(type(self.serializer).__qualname__))
        return SerdeIdentity.of_config(self.config)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AsyncSerdeProcessor):
            return NotImplemented
        if self.config is None or other.config is None:
            return self is other
        return canonical_json(self.config) == canonical_json(other.config)

    def __hash__(self) -> int:
        return hash(canonical_json(self.config)) if self.config is not None else id(self)

    def __repr__(self) -> str:
        return f"AsyncSerdeProcessor({self.identity.name}, max_workers={self.max_workers})"

    # -- sizes ----------------------------------------------------------------------------------------------
    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return self.serializer.estimate_serialized_size(layout_desc)

    # -- batches --------------------------------------------------------------------------------------------
    def submit_serialize(self, srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> Future[BatchResult]:
        """Serialize ``srcs[i]`` into ``dsts[i]`` on the pool; the future never raises, it holds a BatchResult."""
        return self._submit(self._timed("serialize", self.serializer.serialize), srcs, dsts)

    def submit_deserialize(self, srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> Future[BatchResult]:
        """Deserialize ``srcs[i]`` into ``dsts[i]`` on the pool; the future holds a BatchResult."""

        def run(src: torch.Tensor, dst: torch.Tensor) -> int:
            self.deserializer.deserialize(src, dst)
            return 0

        return self._submit(self._timed("deserialize", run), srcs, dsts)

    def _timed(self, op: str, fn: Any) -> Any:
        def call(src: torch.Tensor, dst: torch.Tensor) -> int:
            start = time.perf_counter()
            ok = False
            try:
                result = fn(src, dst)
                ok = True
                return int(result)
            finally:
                elapsed = time.perf_counter() - start
                with self._timing_lock:
                    entry = self._timing[op]
                    entry[0] += elapsed
                    entry[1] += 1
                    if not ok:
                        entry[2] += 1

        return call

    def stats(self) -> dict[str, float | int]:
        """Busy seconds, items and failed items of each op since the processor was built (summed over workers)."""
        with self._timing_lock:
            out: dict[str, float | int] = {}
            for op, (seconds, items, failures) in self._timing.items():
                out[f"{op}_seconds_total"] = round(seconds, 6)
                out[f"{op}_items_total"] = items
                out[f"{op}_failures_total"] = failures
            return out

    def serialize_batch(self, srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> list[int]:
        """Serialize a batch and wait; returns bytes written per item, raises BatchError if any item failed."""
        result = self.submit_serialize(srcs, dsts).result()
        result.raise_if_failed("serialize batch")
        return result.sizes

    def deserialize_batch(self, srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> None:
        """Deserialize a batch and wait; raises BatchError if any item failed."""
        self.submit_deserialize(srcs, dsts).result().raise_if_failed("deserialize batch")

    def _submit(self, fn: Any, srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> Future[BatchResult]:
        if len(srcs) != len(dsts):
            raise ValueError(f"batch has {len(srcs)} sources but {len(dsts)} destinations")
        outer: Future[BatchResult] = Future()
        outer.set_running_or_notify_cancel()
        n = len(srcs)
        result = BatchResult(sizes=[0] * n)
        if n == 0:
            outer.set_result(result)
            return outer
        pool = self._get_pool()
        remaining = [n]
        lock = threading.Lock()

        def on_done(index: int, fut: Future[int]) -> None:
            exc = fut.exception()
            with lock:
                if exc is not None:
                    result.errors[index] = exc
                else:
                    result.sizes[index] = fut.result()
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                outer.set_result(result)

        # One task per item: a chunk is megabytes, so the hand-off costs microseconds against milliseconds
        # of work, and items spread over the workers without a scheduler of our own.
        for i, (src, dst) in enumerate(zip(srcs, dsts, strict=True)):
            fut: Future[int] = pool.submit(fn, src, dst)
            fut.add_done_callback(functools.partial(on_done, i))
        return outer

    def _get_pool(self) -> ThreadPoolExecutor:
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._closed:
                raise RuntimeError("serde processor is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.max_workers, thread_name_prefix=f"kvtier-serde-{self.identity.name}"
                )
            return self._pool

    @property
    def started(self) -> bool:
        """Whether the thread pool exists (it is created by the first batch)."""
        return self._pool is not None

    def close(self) -> None:
        """Wait for running batches and stop the pool. Idempotent."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> AsyncSerdeProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
