"""Chains of serde stages: one tensor->bytes stage first (raw when none is given), then bytes->bytes stages.

The order is checked when the chain is built (zarr's ``codecs_from_list`` habit), never when data first flows:
a compressor before a quantizer would otherwise only fail on the first store.

Intermediate results live in per-thread scratch buffers that grow to the largest size seen and are then reused,
so a chain allocates nothing per chunk once warm.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from kvtier.errors import ConfigError, IntegrityError, SerdeError
from kvtier.serde.base import (
    BytesBytesStage,
    BytesDeserializer,
    Deserializer,
    RecordContext,
    Serializer,
    TensorBytesStage,
    as_byte_view,
    deserialize_with,
    serialize_with,
)
from kvtier.serde.processor import AsyncSerdeProcessor
from kvtier.serde.raw import RawDeserializer, RawSerializer, RawStage
from kvtier.types import LayoutDesc


def check_chain_order(serializers: Sequence[Serializer], names: Sequence[str]) -> None:
    """Raise ConfigError unless the chain is: at most one tensor stage, first, then bytes stages."""
    if not serializers:
        raise ConfigError("serde: a chain needs at least one stage")
    for i, (ser, name) in enumerate(zip(serializers, names, strict=True)):
        if ser.consumes == "tensor" and i > 0:
            first = names[0]
            why = (
                f"{first!r} already turned the tensor into bytes"
                if serializers[0].consumes == "tensor"
                else "a tensor stage must come before every bytes stage"
            )
            raise ConfigError(
                f"serde[{i}]: {name!r} takes a tensor, but {why}; "
                "put at most one tensor stage (raw, fp8, ...) first, then bytes stages (lz4, zstd, aesgcm, ...)"
            )


class _Scratch(threading.local):
    """Per-thread reusable byte buffers, one per chain position."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}


class ScratchPool:
    """Hands each thread a reusable uint8 buffer per slot, grown when too small; counts the bytes held."""

    def __init__(self) -> None:
        self._local = _Scratch()
        self._lock = threading.Lock()
        self.bytes_held = 0

    def get(self, slot: int, size: int) -> torch.Tensor:
        buf = self._local.buffers.get(slot)
        if buf is None or buf.numel() < size:
            old = 0 if buf is None else buf.numel()
            # Round up so that a slightly larger chunk later does not force another allocation.
            capacity = max(size, 4096) + (max(size, 4096) >> 3)
            buf = torch.empty(capacity, dtype=torch.uint8)
            self._local.buffers[slot] = buf
            with self._lock:
                self.bytes_held += capacity - old
        return buf[:size]


class ChainSerializer(Serializer):
    """Runs stages in order; the last one writes into the caller's ``dst``.

    The first stage always takes the tensor (the registry puts raw first when a chain has none). The record
    context goes to every stage that takes one.
    """

    takes_context = True

    def __init__(self, stages: Sequence[Serializer], scratch: ScratchPool) -> None:
        self.stages = list(stages)
        self._scratch = scratch

    def _bounds(self, layout_desc: LayoutDesc) -> list[int]:
        bounds = []
        layout = layout_desc
        for stage in self.stages:
            bound = stage.estimate_serialized_size(layout)
            bounds.append(bound)
            layout = LayoutDesc((bound,), torch.uint8)
        return bounds

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return self._bounds(layout_desc)[-1]

    def serialize(self, src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None = None) -> int:
        bounds = self._bounds(LayoutDesc.of(src))
        cur = src
        last = len(self.stages) - 1
        first = 0
        if last > 0 and isinstance(self.stages[0], RawSerializer):
            # raw before a bytes stage is the tensor's own memory: hand its byte view on instead of copying it
            # into scratch (a 32 MiB memcpy per chunk, a third of an aesgcm store's time).
            cur, first = as_byte_view(src), 1
        written = 0
        for i in range(first, last + 1):
            stage = self.stages[i]
            out = dst if i == last else self._scratch.get(i, bounds[i])
            written = serialize_with(stage, cur, out, context)
            if written > out.numel():
                raise SerdeError(f"serde stage {i} wrote {written} bytes into a {out.numel()}-byte buffer")
            cur = out[:written]
        return written


class ChainDeserializer(Deserializer):
    """Undoes the bytes stages last-to-first into scratch buffers, then the first stage into ``dst``.

    ``serializers`` (the chain's serializer stages; typed stages are their own) give the size bound of every
    intermediate result for ``dst``'s layout: a bytes stage's decoded size is read from its own framing, so a
    damaged header could otherwise ask for a scratch buffer of terabytes. A size above the bound is an
    IntegrityError before anything is allocated.
    """

    takes_context = True

    def __init__(
        self, stages: Sequence[Deserializer], scratch: ScratchPool, serializers: Sequence[Serializer] | None = None
    ) -> None:
        self.stages = list(stages)
        for i, stage in enumerate(self.stages[1:], start=1):
            if not isinstance(stage, BytesDeserializer):
                raise ConfigError(f"serde[{i}]: a bytes stage's deserializer must be a BytesDeserializer")
        self._scratch = scratch
        if serializers is None and all(isinstance(stage, Serializer) for stage in self.stages):
            serializers = [stage for stage in self.stages if isinstance(stage, Serializer)]
        if serializers is not None and len(serializers) != len(self.stages):
            raise ConfigError(f"serde chain: {len(serializers)} serializers for {len(self.stages)} deserializers")
        self._sizer = None if serializers is None else ChainSerializer(serializers, scratch)

    def _bounds(self, dst: torch.Tensor) -> list[int] | None:
        if self._sizer is None:
            return None
        try:
            return self._sizer._bounds(LayoutDesc.of(dst))
        except (ValueError, TypeError, KeyError) as exc:  # a stage that cannot size this layout: decode fails
            raise SerdeError(f"serde chain: cannot size {tuple(dst.shape)} {dst.dtype}: {exc}") from exc

    def deserialize(self, src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None = None) -> None:
        cur = src
        # With raw first, the stage after it decodes straight into dst's memory (no scratch, no final copy).
        into_dst = len(self.stages) > 1 and isinstance(self.stages[0], RawDeserializer)
        bounds = self._bounds(dst) if len(self.stages) > 2 or not into_dst else None
        for i in range(len(self.stages) - 1, 0, -1):
            stage = self.stages[i]
            assert isinstance(stage, BytesDeserializer)  # checked in __init__
            size = stage.decoded_size(cur)
            if bounds is not None and size > bounds[i - 1]:
                raise IntegrityError(
                    f"serde stage {i} says its payload decodes to {size} bytes, more than the {bounds[i - 1]} "
                    "the stage before can have written for this layout"
                )
            if i == 1 and into_dst:
                out = as_byte_view(dst)
                if size != out.numel():
                    raise SerdeError(f"payload decodes to {size} bytes, the destination needs {out.numel()}")
                deserialize_with(stage, cur, out, context)
                return
            out = self._scratch.get(100 + i, size)
            deserialize_with(stage, cur, out, context)
            cur = out
        deserialize_with(self.stages[0], cur, dst, context)


def pipeline_of(stages: Sequence[TensorBytesStage | BytesBytesStage], max_workers: int = 1) -> AsyncSerdeProcessor:
    """A processor running typed ``stages`` in order (raw put first when the first takes bytes), order checked.

    Its identity comes from the stages' ``get_config()`` and format versions, as for any processor built
    without a config: ``pipeline_of([Fp8Stage(...), ZstdStage...])`` and the equal config give records that
    each accepts only when the stages write the same bytes.
    """
    if not stages:
        raise ConfigError("serde: a chain needs at least one stage")
    for i, stage in enumerate(stages):
        if not isinstance(stage, TensorBytesStage | BytesBytesStage):
            raise ConfigError(f"serde[{i}]: expected a typed stage, got {type(stage).__name__}")
    chain: list[TensorBytesStage | BytesBytesStage] = list(stages)
    check_chain_order(chain, [s.name or type(s).__name__ for s in chain])
    if chain[0].consumes == "bytes":
        chain.insert(0, RawStage())
    if len(chain) == 1:
        return AsyncSerdeProcessor(chain[0], chain[0], max_workers=max_workers)
    scratch = ScratchPool()
    return AsyncSerdeProcessor(
        ChainSerializer(chain, scratch), ChainDeserializer(chain, scratch, chain), max_workers=max_workers
    )
