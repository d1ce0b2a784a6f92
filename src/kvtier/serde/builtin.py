"""Registers the serdes that ship with kvtier. Heavy dependencies are imported by each factory, not here."""

from __future__ import annotations

from kvtier.serde.aesgcm import aesgcm_factory
from kvtier.serde.checksum import checksum_factory
from kvtier.serde.compress import lz4_factory, zstd_factory
from kvtier.serde.fp8 import fp8_factory
from kvtier.serde.raw import raw_factory
from kvtier.serde.registry import register_serde_factory

BUILTIN_SERDES = {
    "raw": raw_factory,
    "fp8": fp8_factory,
    "lz4": lz4_factory,
    "zstd": zstd_factory,
    "aesgcm": aesgcm_factory,
    "checksum": checksum_factory,
}


def register_builtin_serdes() -> None:
    for name, factory in BUILTIN_SERDES.items():
        register_serde_factory(name, factory)
