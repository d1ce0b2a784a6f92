"""The serde contract: what a serializer and a deserializer must do.

A serde turns a KV tensor into bytes for an L2 adapter and back. It is written as two *synchronous* objects;
:class:`~kvtier.serde.processor.AsyncSerdeProcessor` runs them on a thread pool, batch by batch.

Buffers are the caller's. A serializer never allocates its output: it writes into ``dst``, a 1-D
``torch.uint8`` tensor at least :meth:`Serializer.estimate_serialized_size` long, and returns how many bytes
it wrote. A deserializer writes into ``dst``, a preallocated tensor of the original shape and dtype. This is
what makes a serde fast on this class of machine: a copy into a reused buffer runs at 10-15 GB/s, a copy into a
fresh 32 MiB buffer at 1.5-2 GB/s, so a per-chunk allocation costs more than most transforms.

Stages come in two kinds, told apart by :attr:`Serializer.consumes`:

* ``"tensor"`` stages (raw, fp8, a user's own) turn a KV tensor into bytes; a chain holds at most one, first;
* ``"bytes"`` stages (lz4, zstd, aesgcm, checksum) turn bytes into bytes and may be stacked after it. Their
  deserializers subclass :class:`BytesDeserializer`, which also tells the exact decoded size of a payload,
  so that a chain can size the buffer for the stage before it.

Contract for every implementation:

* ``serialize(src, dst) -> int``: ``src`` is a contiguous CPU tensor (or, for a bytes stage, a 1-D uint8 tensor);
  returns the number of bytes written to ``dst[:n]``; must not keep references to either.
* ``estimate_serialized_size(layout) -> int``: an upper bound of what ``serialize`` writes for any tensor of
  that layout (exact where the format allows; compressors return their worst-case bound).
* ``deserialize(src, dst) -> None``: ``src`` holds exactly the bytes ``serialize`` wrote; fills ``dst``
  completely or raises. Bad input raises (:class:`~kvtier.errors.IntegrityError` for data that fails a check,
  :class:`~kvtier.errors.SerdeError` otherwise); it never fills ``dst`` with garbage silently.
* Both may be called from several threads at once; state shared across calls must be thread-safe.

**Typed stages, config and format version** (zarr v3's ArrayBytes / BytesBytes codecs). The built-in stages are
single objects that are both halves: :class:`TensorBytesStage` (tensor -> bytes: raw, fp8) and
:class:`BytesBytesStage` (bytes -> bytes: lz4, zstd, checksum, aesgcm). Each has a registry ``name``, a
``format_version`` and :meth:`Serializer.get_config`, the JSON dict that says what its output is. A pipeline's
identity (written into every record, see :attr:`~kvtier.serde.processor.AsyncSerdeProcessor.identity`) is the
hash of its stages' configs plus format versions, so two pipelines that write different bytes never accept each
other's records. A seed-style serde (a plain ``Serializer`` / ``Deserializer`` pair) needs no ``get_config``
when it is built by a registered factory: the config it was created from names it then.

* ``get_config() -> dict | None``: ``{"type": name, **params}``, plain JSON, with every parameter that changes a
  byte of output; ``None`` (the default) when the stage cannot tell. A secret is never in it: a stage whose
  output depends on one (aesgcm's key) gives a fingerprint derived from the secret that reveals nothing.
* ``format_version``: bump it when the stage's bytes change for the same config (old records then become
  foreign, a miss, instead of decoding into garbage); add a golden fixture of the new version beside the old.
* ``identity_config(config)``: the dict hashed into the identity; by default the registry config the stage was
  built from (or ``get_config()`` when built directly), with the format version when it is not 1. Stages that
  read a secret from a location (a key file) override it to replace the location by the fingerprint.

**Record context.** A stage that binds its bytes to the record (aesgcm: per-salt key, associated data) declares
it with ``takes_context = True`` and accepts a third argument: ``serialize(src, dst, context)`` and
``deserialize(src, dst, context)``, where ``context`` is a :class:`RecordContext` or ``None`` (direct use: the
empty salt, no associated data). The pipeline passes the context only to stages that declare it, so the seed's
two-argument ``serialize(src, dst)`` stays the whole contract of every other stage; a chain passes it on to each
of its stages that takes it. Use :func:`serialize_with` / :func:`deserialize_with` to call any stage this way.

Failures: :class:`~kvtier.errors.IntegrityError` for damaged data, :class:`~kvtier.errors.ForeignRecordError`
for intact data that is not ours (e.g. an authentication tag that fails under our key and this context: another
deployment's key, or a record relabelled under another key or salt); the storage layer removes the first and
leaves the second in place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from kvtier.errors import SerdeError
from kvtier.types import LayoutDesc

StageInput = Literal["tensor", "bytes"]


@dataclass(frozen=True, slots=True)
class RecordContext:
    """What the L2 tier tells a serde stage about the record being encoded or decoded.

    Most stages ignore it (the seed's ``serialize(src, dst)`` stays their whole contract). Stages that bind their
    output to the record use it: an authenticated stage (AES-GCM) derives its key from ``cache_salt`` and takes
    ``associated_data`` (the header fields fixed before encoding: key, layout, serde identity) as AEAD associated
    data, so a record moved under another key, salt or layout fails authentication.

    ``cache_salt`` is the tenant's raw salt: a secret, held in memory only, never written, logged or counted.
    """

    cache_salt: str
    associated_data: bytes

    def __repr__(self) -> str:  # never show the salt
        return f"RecordContext(associated_data={len(self.associated_data)} bytes)"


class _StageInfo:
    """What both halves of a serde stage may declare: format version, context, config (see the module doc)."""

    #: bump when the bytes written for the same config change (see the module docstring)
    format_version: ClassVar[int] = 1
    #: ``True``: ``serialize`` / ``deserialize`` take a third argument, the :class:`RecordContext` (or None)
    takes_context: ClassVar[bool] = False

    def get_config(self) -> dict[str, Any] | None:
        """``{"type": name, **params}``: every parameter that changes the bytes; ``None`` when unknown."""
        return None

    def identity_config(self, config: dict[str, Any] | None) -> dict[str, Any] | None:
        """The dict hashed into the pipeline identity, given the registry config this stage was built from
        (``None`` when built directly: then :meth:`get_config`). The format version joins it when it is not 1,
        so that the identities of every version-1 stage stay those of the configs alone."""
        base = config if config is not None else self.get_config()
        if base is None:
            return None
        if self.format_version != 1:
            base = {**base, "format_version": self.format_version}
        return base


class Serializer(_StageInfo, ABC):
    """Turns a tensor (or bytes, for a bytes stage) into bytes written into a caller-owned buffer."""

    #: what ``serialize`` takes as ``src``: a KV tensor, or the bytes of the stage before.
    consumes: ClassVar[StageInput] = "tensor"

    @abstractmethod
    def serialize(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        """Write the serialized form of ``src`` into ``dst`` (1-D uint8); return the number of bytes written."""

    @abstractmethod
    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        """An upper bound of the bytes ``serialize`` writes for a tensor described by ``layout_desc``."""


class Deserializer(_StageInfo, ABC):
    """Turns bytes back into a tensor written into a caller-owned buffer."""

    @abstractmethod
    def deserialize(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Fill ``dst`` (original shape and dtype) from ``src``, the 1-D uint8 bytes ``serialize`` wrote."""


class BytesSerializer(Serializer):
    """A bytes->bytes stage (compressor, cipher, checksum): ``src`` is a 1-D uint8 tensor."""

    consumes: ClassVar[StageInput] = "bytes"


class BytesDeserializer(Deserializer):
    """The inverse of a bytes->bytes stage; ``dst`` is a 1-D uint8 tensor of :meth:`decoded_size` bytes."""

    @abstractmethod
    def decoded_size(self, src: torch.Tensor) -> int:
        """The exact number of bytes ``deserialize(src, ...)`` produces, read from the stage's own framing."""


class TensorBytesStage(Serializer, Deserializer):
    """A typed tensor->bytes stage that is both halves (raw, fp8); ``name`` is its registry name."""

    name: str = ""

    def get_config(self) -> dict[str, Any]:
        return {"type": self.name}


class BytesBytesStage(BytesSerializer, BytesDeserializer):
    """A typed bytes->bytes stage that is both halves (lz4, zstd, checksum, aesgcm)."""

    name: str = ""

    def get_config(self) -> dict[str, Any]:
        return {"type": self.name}


def serialize_with(stage: Serializer, src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None) -> int:
    """``stage.serialize``, with ``context`` when the stage declares ``takes_context``."""
    if stage.takes_context:
        return stage.serialize(src, dst, context)  # type: ignore[call-arg]
    return stage.serialize(src, dst)


def deserialize_with(stage: Deserializer, src: torch.Tensor, dst: torch.Tensor, context: RecordContext | None) -> None:
    """``stage.deserialize``, with ``context`` when the stage declares ``takes_context``."""
    if stage.takes_context:
        stage.deserialize(src, dst, context)  # type: ignore[call-arg]
    else:
        stage.deserialize(src, dst)


def as_byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's memory, without copying."""
    if not tensor.is_contiguous():
        raise SerdeError("serde needs a contiguous tensor; call .contiguous() first")
    if tensor.dtype == torch.uint8 and tensor.dim() == 1:
        return tensor
    return tensor.reshape(-1).view(torch.uint8)


def check_dst_capacity(dst: torch.Tensor, needed: int) -> None:
    """Raise if ``dst`` is not a 1-D uint8 tensor with room for ``needed`` bytes."""
    if dst.dtype != torch.uint8 or dst.dim() != 1:
        raise SerdeError(f"dst must be a 1-D torch.uint8 tensor, got {dst.dtype} {tuple(dst.shape)}")
    if dst.numel() < needed:
        raise SerdeError(f"dst holds {dst.numel()} bytes, {needed} are needed")
