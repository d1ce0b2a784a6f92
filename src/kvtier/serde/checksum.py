"""checksum: a bytes->bytes stage that appends an xxh3-64 digest and verifies it on the way back.

``{"type": "checksum", "algorithm": "xxh3_64"}``. For users who want corruption caught at the serde level
without encryption (the L2 record checks its own xxh3-64 too; this stage also covers a chain's inner bytes,
e.g. what a user's own stage produced). A mismatch raises :class:`~kvtier.errors.IntegrityError` (a miss).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xxhash

from kvtier.config import ConfigReader
from kvtier.errors import IntegrityError
from kvtier.serde.base import BytesBytesStage, as_byte_view, check_dst_capacity
from kvtier.serde.processor import AsyncSerdeProcessor
from kvtier.types import LayoutDesc

DIGEST_SIZE = 8
ALGORITHMS = ("xxh3_64",)


def _digest(data: np.ndarray) -> bytes:
    return xxhash.xxh3_64_digest(data.data)


class ChecksumStage(BytesBytesStage):
    """Appends the 8-byte xxh3-64 digest of the bytes; on the way back verifies it before copying them out
    (nothing is written to ``dst`` when the check fails)."""

    name = "checksum"

    def get_config(self) -> dict[str, Any]:
        return {"type": self.name, "algorithm": "xxh3_64"}

    def estimate_serialized_size(self, layout_desc: LayoutDesc) -> int:
        return layout_desc.nbytes + DIGEST_SIZE

    def serialize(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        data = as_byte_view(src)
        n = data.numel()
        check_dst_capacity(dst, n + DIGEST_SIZE)
        dst[:n].copy_(data)
        dst[n : n + DIGEST_SIZE].numpy()[:] = np.frombuffer(_digest(data.numpy()), dtype=np.uint8)
        return n + DIGEST_SIZE

    def decoded_size(self, src: torch.Tensor) -> int:
        if src.numel() < DIGEST_SIZE:
            raise IntegrityError(f"checksum payload of {src.numel()} bytes is shorter than its digest")
        return src.numel() - DIGEST_SIZE

    def deserialize(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        n = self.decoded_size(src)
        out = as_byte_view(dst)
        if out.numel() != n:
            raise IntegrityError(f"checksum payload holds {n} bytes, the destination {out.numel()}")
        body = src[:n]
        if _digest(body.numpy()) != bytes(src[n:].numpy()):
            raise IntegrityError("checksum mismatch: the payload was altered")
        out.copy_(body)


def checksum_factory(config: dict[str, Any]) -> AsyncSerdeProcessor:
    """``{"type": "checksum", "algorithm": "xxh3_64"}``."""
    reader = ConfigReader(config, "serde 'checksum'")
    reader.string("algorithm", "xxh3_64", choices=ALGORITHMS)
    reader.finish()
    stage = ChecksumStage()
    return AsyncSerdeProcessor(stage, stage)
