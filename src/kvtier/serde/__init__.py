"""Serde: transforms between KV tensors and the bytes an L2 adapter stores.

Public API (see :mod:`kvtier.serde.base` for the full contract)::

    from kvtier.serde import Serializer, Deserializer, AsyncSerdeProcessor, register_serde_factory

    class MySerializer(Serializer):
        def serialize(self, src, dst) -> int: ...
        def estimate_serialized_size(self, layout_desc) -> int: ...

    class MyDeserializer(Deserializer):
        def deserialize(self, src, dst) -> None: ...

    register_serde_factory("mine", lambda config: AsyncSerdeProcessor(MySerializer(), MyDeserializer()))
    processor = create_serde_processor({"type": "mine"})

Built-in stages are typed (:class:`TensorBytesStage`, :class:`BytesBytesStage`) with ``get_config()`` and a
format version; :func:`pipeline_of` runs a list of them. Stages that bind their bytes to the record (aesgcm)
take a :class:`RecordContext`, passed per item with ``contexts=`` to the processor's batch methods.
"""

from kvtier.serde.base import (
    BytesBytesStage,
    BytesDeserializer,
    BytesSerializer,
    Deserializer,
    RecordContext,
    Serializer,
    TensorBytesStage,
)
from kvtier.serde.builtin import register_builtin_serdes
from kvtier.serde.chain import pipeline_of
from kvtier.serde.processor import AsyncSerdeProcessor, BatchResult, SerdeIdentity
from kvtier.serde.raw import FastDeserializer, FastSerializer
from kvtier.serde.registry import (
    create_serde_processor,
    register_serde_factory,
    registered_serdes,
    unregister_serde_factory,
)
from kvtier.types import LayoutDesc

register_builtin_serdes()

__all__ = [
    "AsyncSerdeProcessor",
    "BatchResult",
    "BytesBytesStage",
    "BytesDeserializer",
    "BytesSerializer",
    "Deserializer",
    "FastDeserializer",
    "FastSerializer",
    "LayoutDesc",
    "RecordContext",
    "SerdeIdentity",
    "Serializer",
    "TensorBytesStage",
    "create_serde_processor",
    "pipeline_of",
    "register_serde_factory",
    "registered_serdes",
    "unregister_serde_factory",
]
