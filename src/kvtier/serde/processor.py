"""Runs a serializer / deserializer pair over batches on a thread pool.

A batch succeeds or fails as a whole: :class:`BatchResult` says which items failed and why, and
:meth:`AsyncSerdeProcessor.serialize_batch` raises :class:`~kvtier.errors.BatchError` if any did. The pool is
created on the first batch, so a processor that is configured but never used costs no threads.

**One item on several workers.** A stage that can cut its work into independent slices (``split_serialize`` /
``split_deserialize``: fp8) has a large item run as slices on the pool's threads, with bytes identical to the
whole item's. The rule, so that splitting never oversubscribes the machine: the pool never has more than
``max_workers`` threads, and an item is split only into workers that are idle when its batch is submitted
(``max_workers`` less the tasks in flight on this processor, less the batch's own items), and only when it holds
at least ``split_min_bytes`` of tensor data (default 8 MiB), into parts of at least half that. A batch of
``max_workers`` chunks or more runs them whole, one per worker, as before; so does a chunk submitted while the
Store's write path keeps every worker busy with other chunks. A single chunk on an otherwise idle pool (a load,
a lone store) gets every worker.
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
from kvtier.serde.base import Deserializer, RecordContext, Serializer, deserialize_with, serialize_with
from kvtier.types import LayoutDesc

DEFAULT_SPLIT_MIN_BYTES = 8 << 20  # 8 MiB items are split into parts of 4 MiB: ~1 ms of work against a hand-off of µs


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
    def of_config(cls, config: Any, stages: Sequence[Serializer] | None = None) -> SerdeIdentity:
        """The identity of a serde config. ``max_workers`` is left out: the thread count does not change a byte
        of output, so changing it must not turn every stored record into a foreign one.

        ``stages``: the serializer stages built from ``config`` (a chain's implicit raw first stage included);
        each one's :meth:`~kvtier.serde.base.Serializer.identity_config` then rewrites its part (aesgcm replaces
        where its key lives by which key it is; a stage of format version > 1 adds its version).
        """
        if config is None:
            return cls("none", config_hash(None))
        items = config if isinstance(config, list) else [config]
        items = [
            {k: v for k, v in stage.items() if k != "max_workers"} if isinstance(stage, dict) else stage
            for stage in items
        ]
        if stages is not None and len(stages) >= len(items):
            offset = len(stages) - len(items)  # a chain of bytes stages only got raw put first
            items = [
                (stages[offset + i].identity_config(item) or item) if isinstance(item, dict) else item
                for i, item in enumerate(items)
            ]
        name = "+".join(str(stage.get("type", "?")) if isinstance(stage, dict) else "?" for stage in items)
        return cls(name, config_hash(items if isinstance(config, list) else items[0]))

    @classmethod
    def of_stages(cls, serializers: Sequence[Serializer], deserializers: Sequence[Deserializer]) -> SerdeIdentity:
        """The identity of stages built directly: the hash of their ``identity_config(None)`` (``get_config()``
        plus format version). Raises ConfigError when a stage cannot describe itself or its halves disagree."""
        items: list[dict[str, Any]] = []
        for i, (ser, deser) in enumerate(zip(serializers, deserializers, strict=True)):
            mine = ser.identity_config(None)
            theirs = mine if id(deser) == id(ser) else deser.identity_config(None)  # one typed stage: both halves
            if mine is not None and theirs is not None and canonical_json(mine) != canonical_json(theirs):
                raise ConfigError(
                    f"serde stage {i}: {type(ser).__name__} and {type(deser).__name__} describe different configs "
                    f"({mine} vs {theirs})"
                )
            got = mine if mine is not None else theirs
            if got is None:
                raise ConfigError(
                    f"serde stage {i} ({type(ser).__name__}, {type(deser).__name__}) has no identity: it was built "
                    "without a config and neither half implements get_config(); build the processor with "
                    "create_serde_processor() from a registered factory, or implement get_config()"
                )
            items.append(got)
        name = "+".join(str(item.get("type", "?")) for item in items)
        return cls(name, config_hash(items if len(items) > 1 else items[0]))


class AsyncSerdeProcessor:
    """Runs ``serializer`` and ``deserializer`` over batches on up to ``max_workers`` threads.

    ``config`` is the JSON config the processor was built from (set by
    :func:`~kvtier.serde.registry.create_serde_processor`); two processors are equal when their configs are.
    """

    def __init__(
        self,
        serializer: Serializer,
        deserializer: Deserializer,
        max_workers: int = 1,
        *,
        split_min_bytes: int = DEFAULT_SPLIT_MIN_BYTES,
    ) -> None:
        if not isinstance(serializer, Serializer):
            raise ConfigError(f"serializer: expected a kvtier.serde.Serializer, got {type(serializer).__name__}")
        if not isinstance(deserializer, Deserializer):
            raise ConfigError(f"deserializer: expected a kvtier.serde.Deserializer, got {type(deserializer).__name__}")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError(f"max_workers: expected an integer >= 1, got {max_workers!r}")
        if isinstance(split_min_bytes, bool) or not isinstance(split_min_bytes, int) or split_min_bytes < 2:
            raise ConfigError(f"split_min_bytes: expected an integer >= 2, got {split_min_bytes!r}")
        self.split_min_bytes = split_min_bytes
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
        self._active = 0  # tasks submitted to the pool and not finished (under _timing_lock): what splitting sees

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def identity(self) -> SerdeIdentity:
        """The pipeline identity written into every record; two pipelines that write different bytes differ.

        From the config the processor was created from when it has one (a registered factory), else from its
        stages' ``get_config()`` and format versions (built directly). A processor with neither raises
        :class:`~kvtier.errors.ConfigError`: storage asks for it when it is configured and refuses such a serde.
        """
        serializers, deserializers = self._stage_lists()
        if self.config is not None:
            return SerdeIdentity.of_config(self.config, serializers)
        return SerdeIdentity.of_stages(serializers, deserializers)

    @property
    def stages(self) -> list[Serializer]:
        """The stages in order (a chain's, or the serializer alone); a typed stage is both halves."""
        return self._stage_lists()[0]

    def _stage_lists(self) -> tuple[list[Serializer], list[Deserializer]]:
        ser_stages = getattr(self.serializer, "stages", None)
        deser_stages = getattr(self.deserializer, "stages", None)
        if isinstance(ser_stages, list) and isinstance(deser_stages, list) and len(ser_stages) == len(deser_stages):
            return ser_stages, deser_stages
        return [self.serializer], [self.deserializer]

    def _display_name(self) -> str:
        try:
            return self.identity.name
        except ConfigError:
            return type(self.serializer).__name__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AsyncSerdeProcessor):
            return NotImplemented
        if self.config is None or other.config is None:
            return self is other
        return canonical_json(self.config) == canonical_json(other.config)

    def __hash__(self) -> int:
        return hash(canonical_json(self.config)) if self.config is not None else id(self)

    def __repr__(self) -> str:
        return f"AsyncSerdeProcessor({self._display_name()}, max_workers={self.max_workers})"

    # -- sizes ----------------------------------------------------------------------------------------------
    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return self.serializer.estimate_serialized_size(layout_desc)

    # -- batches --------------------------------------------------------------------------------------------
    # ``contexts[i]`` (optional) is the RecordContext of item ``i``: handed to every stage that declares
    # ``takes_context`` (see kvtier.serde.base); without it such stages run for the empty salt, no associated data.
    def submit_serialize(
        self,
        srcs: Sequence[torch.Tensor],
        dsts: Sequence[torch.Tensor],
        contexts: Sequence[RecordContext] | None = None,
    ) -> Future[BatchResult]:
        """Serialize ``srcs[i]`` into ``dsts[i]`` on the pool; the future never raises, it holds a BatchResult."""
        serializer = self.serializer

        def whole(src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None) -> int:
            return serialize_with(serializer, src, dst, context)

        split = None if serializer.takes_context else getattr(serializer, "split_serialize", None)
        return self._submit("serialize", whole, split, srcs, dsts, contexts, srcs)

    def submit_deserialize(
        self,
        srcs: Sequence[torch.Tensor],
        dsts: Sequence[torch.Tensor],
        contexts: Sequence[RecordContext] | None = None,
    ) -> Future[BatchResult]:
        """Deserialize ``srcs[i]`` into ``dsts[i]`` on the pool; the future holds a BatchResult."""
        deserializer = self.deserializer

        def whole(src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None) -> int:
            deserialize_with(deserializer, src, dst, context)
            return 0

        split_deserialize = None if deserializer.takes_context else getattr(deserializer, "split_deserialize", None)
        split = None
        if split_deserialize is not None:

            def split(src: torch.Tensor, dst: torch.Tensor, parts: int) -> tuple[int, list[Any]]:
                return 0, split_deserialize(src, dst, parts)

        return self._submit("deserialize", whole, split, srcs, dsts, contexts, dsts)

    def deserialize_now(self, src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None = None) -> None:
        """Deserialize one item on the calling thread, not the pool, and raise what the stage raises: for work
        that must not queue in front of the pool's loads (a second decode that makes L1's own copy of a hit).
        Counted in :meth:`stats` like the pool's items."""
        start = time.perf_counter()
        try:
            deserialize_with(self.deserializer, src, dst, context)
        except BaseException:
            self._record("deserialize", time.perf_counter() - start, 1, 1)
            raise
        self._record("deserialize", time.perf_counter() - start, 1, 0)

    def _record(self, op: str, seconds: float, items: int, failures: int) -> None:
        with self._timing_lock:
            entry = self._timing[op]
            entry[0] += seconds
            entry[1] += items
            entry[2] += failures

    def _task(self, op: str, fn: Any, *args: Any) -> Any:
        """Run one pool task, adding its busy time to ``op``'s; releases its place in :attr:`_active`."""
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            elapsed = time.perf_counter() - start
            with self._timing_lock:
                self._timing[op][0] += elapsed
                self._active -= 1

    def stats(self) -> dict[str, float | int]:
        """Busy seconds, items and failed items of each op since the processor was built (summed over workers)."""
        with self._timing_lock:
            out: dict[str, float | int] = {}
            for op, (seconds, items, failures) in self._timing.items():
                out[f"{op}_seconds_total"] = round(seconds, 6)
                out[f"{op}_items_total"] = items
                out[f"{op}_failures_total"] = failures
            return out

    def serialize_batch(
        self,
        srcs: Sequence[torch.Tensor],
        dsts: Sequence[torch.Tensor],
        contexts: Sequence[RecordContext] | None = None,
    ) -> list[int]:
        """Serialize a batch and wait; returns bytes written per item, raises BatchError if any item failed."""
        result = self.submit_serialize(srcs, dsts, contexts).result()
        result.raise_if_failed("serialize batch")
        return result.sizes

    def deserialize_batch(
        self,
        srcs: Sequence[torch.Tensor],
        dsts: Sequence[torch.Tensor],
        contexts: Sequence[RecordContext] | None = None,
    ) -> None:
        """Deserialize a batch and wait; raises BatchError if any item failed."""
        self.submit_deserialize(srcs, dsts, contexts).result().raise_if_failed("deserialize batch")

    def _split_counts(self, tensors: Sequence[torch.Tensor], splittable: bool) -> list[int]:
        """How many parts each item runs as (see the module docstring): idle workers only, large items only.
        Reserves the batch's tasks in :attr:`_active`."""
        counts = [1] * len(tensors)
        with self._timing_lock:
            spare = self.max_workers - self._active - len(tensors)
            if splittable and spare > 0:
                part_min = self.split_min_bytes // 2
                for i, tensor in enumerate(tensors):
                    nbytes = tensor.numel() * tensor.element_size()
                    if spare <= 0 or nbytes < self.split_min_bytes:
                        continue
                    counts[i] = min(1 + spare, nbytes // part_min)
                    spare -= counts[i] - 1
            self._active += sum(counts)
        return counts

    def _submit(  # noqa: PLR0917 (one private helper for both directions)
        self,
        op: str,
        whole: Any,
        split: Any,
        srcs: Sequence[torch.Tensor],
        dsts: Sequence[torch.Tensor],
        contexts: Sequence[RecordContext] | None,
        sized: Sequence[torch.Tensor],
    ) -> Future[BatchResult]:
        if len(srcs) != len(dsts):
            raise ValueError(f"batch has {len(srcs)} sources but {len(dsts)} destinations")
        if contexts is not None and len(contexts) != len(srcs):
            raise ValueError(f"batch has {len(srcs)} sources but {len(contexts)} record contexts")
        outer: Future[BatchResult] = Future()
        outer.set_running_or_notify_cancel()
        n = len(srcs)
        result = BatchResult(sizes=[0] * n)
        if n == 0:
            outer.set_result(result)
            return outer
        pool = self._get_pool()
        counts = self._split_counts(sized, split is not None)
        remaining = [n]
        lock = threading.Lock()

        def item_done(index: int, size: int, exc: BaseException | None) -> None:
            self._record(op, 0.0, 1, 0 if exc is None else 1)
            with lock:
                if exc is not None:
                    result.errors[index] = exc
                else:
                    result.sizes[index] = size
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                outer.set_result(result)

        def on_done(index: int, fut: Future[int]) -> None:
            exc = fut.exception()
            item_done(index, 0 if exc is not None else fut.result(), exc)

        # One task per item (a chunk is megabytes: the hand-off costs microseconds against milliseconds of work),
        # or one per part of a split item.
        for i, (src, dst) in enumerate(zip(srcs, dsts, strict=True)):
            if counts[i] > 1:
                try:
                    size, calls = split(src, dst, counts[i])
                except Exception as exc:  # a caller's bad item fails that item, as its task would have
                    self._release(counts[i])
                    item_done(i, 0, exc)
                    continue
                if len(calls) > 1:
                    self._release(counts[i] - len(calls))
                    self._submit_parts(pool, op, i, size=size, calls=calls, item_done=item_done)
                    continue
                self._release(counts[i] - 1)
            context = None if contexts is None else contexts[i]
            fut: Future[int] = pool.submit(self._task, op, whole, src, dst, context)
            fut.add_done_callback(functools.partial(on_done, i))
        return outer

    def _release(self, tasks: int) -> None:
        if tasks:
            with self._timing_lock:
                self._active -= tasks

    def _submit_parts(
        self, pool: ThreadPoolExecutor, op: str, index: int, *, size: int, calls: list[Any], item_done: Any
    ) -> None:
        """Run the parts of item ``index``; it is done when all are, failed with the lowest failing part's error
        (the parts are in tensor order, so that error names the item's first bad element)."""
        left = [len(calls)]
        errors: dict[int, BaseException] = {}
        lock = threading.Lock()

        def part_done(part: int, fut: Future[Any]) -> None:
            exc = fut.exception()
            with lock:
                if exc is not None:
                    errors[part] = exc
                left[0] -= 1
                last = left[0] == 0
            if last:
                item_done(index, size, errors[min(errors)] if errors else None)

        for part, call in enumerate(calls):
            fut: Future[Any] = pool.submit(self._task, op, call)
            fut.add_done_callback(functools.partial(part_done, part))

    def _get_pool(self) -> ThreadPoolExecutor:
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._closed:
                raise RuntimeError("serde processor is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.max_workers, thread_name_prefix=f"kvtier-serde-{self._display_name()}"
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
