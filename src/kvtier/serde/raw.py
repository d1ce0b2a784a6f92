"""The raw serde (the tensor's own bytes) and FastSerializer / FastDeserializer for callers that keep the
shape and dtype elsewhere.

raw ``serialize`` is one copy into the caller's buffer and ``deserialize`` one copy out of it: nothing is
allocated per chunk.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from kvtier.config import ConfigReader
from kvtier.errors import SerdeError
from kvtier.serde.base import TensorBytesStage, as_byte_view, check_dst_capacity
from kvtier.serde.processor import AsyncSerdeProcessor
from kvtier.types import LayoutDesc, parse_dtype


class RawStage(TensorBytesStage):
    """The tensor's own bytes: ``serialize`` copies them into ``dst`` (exact size), ``deserialize`` copies them
    back; a length mismatch is an error, never a partial fill."""

    name = "raw"

    def serialize(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        data = as_byte_view(src)
        n = data.numel()
        check_dst_capacity(dst, n)
        dst[:n].copy_(data)
        return n

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return layout_desc.nbytes

    def deserialize(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        out = as_byte_view(dst)
        if src.numel() != out.numel():
            raise SerdeError(f"raw payload has {src.numel()} bytes, the destination needs {out.numel()}")
        out.copy_(src)


# The names of the two halves before stages were typed: one object is both now.
RawSerializer = RawStage
RawDeserializer = RawStage


def raw_factory(config: dict[str, Any]) -> AsyncSerdeProcessor:
    """``{"type": "raw"}``: no parameters."""
    ConfigReader(config, "serde 'raw'").finish()
    stage = RawStage()
    return AsyncSerdeProcessor(stage, stage)


class FastSerializer:
    """``to_bytes(tensor) -> bytes``: the tensor's bytes in one copy, any shape and dtype."""

    def to_bytes(self, tensor: torch.Tensor) -> bytes:
        data = as_byte_view(tensor.detach().cpu().contiguous())
        return data.numpy().tobytes()


class FastDeserializer:
    """Rebuilds a flat 1-D tensor of ``dtype`` from bytes that :class:`FastSerializer` wrote."""

    def __init__(self, dtype: torch.dtype | str) -> None:
        self.dtype = parse_dtype(dtype)
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()

    def _check(self, data: bytes | bytearray | memoryview) -> int:
        n = memoryview(data).nbytes
        if n % self.itemsize:
            raise SerdeError(f"{n} bytes is not a whole number of {self.dtype} elements ({self.itemsize} bytes)")
        return n

    def from_bytes(self, data: bytes | bytearray | memoryview) -> torch.Tensor:
        """A flat tensor that shares memory with ``data`` (no copy). Read-only input gives a tensor that must
        not be written to; use :meth:`from_bytes_normal` for a writable copy."""
        if self._check(data) == 0:
            return torch.empty(0, dtype=self.dtype)
        with warnings.catch_warnings():
            # torch warns that a read-only buffer gives a tensor that must not be written: that is the
            # documented contract of this zero-copy call.
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(data, dtype=torch.uint8).view(self.dtype)

    def from_bytes_normal(self, data: bytes | bytearray | memoryview) -> torch.Tensor:
        """A flat, writable tensor that owns a copy of ``data``."""
        if self._check(data) == 0:
            return torch.empty(0, dtype=self.dtype)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.dtype)
