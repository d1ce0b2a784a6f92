"""The serde conformance suite: size contract, round trip, config round trip, identity, record contexts, batch
failure, threads.

Every serde passes the same suite by subclassing :class:`SerdeTests` and setting ``config``; the suite builds it
from ``json.loads(json.dumps(config))``, as a server does from its command line.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch

from kvtier.errors import BatchError, IntegrityError
from kvtier.serde import AsyncSerdeProcessor, LayoutDesc, RecordContext, create_serde_processor
from kvtier.types import KVFormat


def kv_like(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Deterministic test data of any shape and dtype (Gaussian for floats, full range for integers)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=gen, dtype=torch.int64).to(
        dtype
    )


class SerdeTests:
    """Subclass and set ``config``; optionally narrow ``dtypes``/``shapes`` or mark the serde lossy.

    ``lossless``: the round trip must be bit-exact. A lossy serde sets it False and ``max_rel_error`` to its
    bound (relative to the tensor's absmax), which the suite checks instead.
    """

    config: ClassVar[Any]
    lossless: ClassVar[bool] = True
    max_rel_error: ClassVar[float] = 0.0
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16, torch.float32)
    shapes: ClassVar[tuple[tuple[int, ...], ...]] = ((0,), (1,), (2, 3, 16, 24), (2, 2, 7, 5), (1000,))

    def make_processor(self) -> AsyncSerdeProcessor:
        return create_serde_processor(json.loads(json.dumps(self.config)))

    def _round_trip(
        self, processor: AsyncSerdeProcessor, src: torch.Tensor, context: RecordContext | None = None
    ) -> tuple[torch.Tensor, int]:
        payload = self._encode(processor, src, context)
        out = torch.empty_like(src)
        processor.deserialize_batch([payload], [out], None if context is None else [context])
        return out, payload.numel()

    def _encode(
        self, processor: AsyncSerdeProcessor, src: torch.Tensor, context: RecordContext | None = None
    ) -> torch.Tensor:
        fmt = KVFormat.KV_LAYER_TOKEN_HIDDEN if src.dim() == 4 and src.shape[0] == 2 else KVFormat.FLAT
        bound = processor.estimate_serialized_size(LayoutDesc.of(src, fmt))
        dst = torch.empty(bound, dtype=torch.uint8)
        (written,) = processor.serialize_batch([src], [dst], None if context is None else [context])
        assert 0 <= written <= bound, f"wrote {written} bytes, estimate was {bound}"
        return dst[:written].clone()

    def takes_context(self, processor: AsyncSerdeProcessor) -> bool:
        """Whether any stage of ``processor`` binds its bytes to the record context."""
        return any(stage.takes_context for stage in processor.stages)

    def check_close(self, src: torch.Tensor, out: torch.Tensor) -> None:
        assert out.shape == src.shape and out.dtype == src.dtype
        if self.lossless or src.numel() == 0:
            assert torch.equal(out.reshape(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8))
        else:
            scale = src.float().abs().max().clamp_min(1e-30)
            err = (out.float() - src.float()).abs().max() / scale
            assert err <= self.max_rel_error, f"relative error {err} > {self.max_rel_error}"

    def test_round_trip_and_size_contract(self) -> None:
        with self.make_processor() as processor:
            for dtype in self.dtypes:
                for shape in self.shapes:
                    src = kv_like(shape, dtype)
                    out, _ = self._round_trip(processor, src)
                    self.check_close(src, out)

    def test_config_json_round_trip(self) -> None:
        first = self.make_processor()
        again = create_serde_processor(json.loads(json.dumps(first.config)))
        assert first == again
        assert first.identity == again.identity

    def test_identity_is_stable_and_names_the_stages(self) -> None:
        """Records written by one process are read by the next: the same config gives the same identity, and
        the thread count is not part of it."""
        first, again = self.make_processor(), self.make_processor()
        assert first.identity == again.identity and len(first.identity.config_hash) == 16
        stages = self.config if isinstance(self.config, list) else [self.config]
        assert first.identity.name == "+".join(stage["type"] for stage in stages)
        more = [{**stage, "max_workers": 3} for stage in stages]
        assert create_serde_processor(more if isinstance(self.config, list) else more[0]).identity == first.identity
        for stage in first.stages:  # a typed stage describes itself in plain JSON
            described = stage.get_config()
            assert described is None or json.loads(json.dumps(described)) == described

    def test_round_trip_with_record_contexts(self) -> None:
        """Contexts are accepted by every serde; the stages that do not take one ignore them."""
        with self.make_processor() as processor:
            src = kv_like((2, 2, 8, 16), self.dtypes[0], seed=3)
            out, _ = self._round_trip(processor, src, RecordContext("tenant/1", b"record header"))
            self.check_close(src, out)

    def test_context_binding(self) -> None:
        """A stage that takes the record context binds the bytes to it: another salt or other associated data
        is an IntegrityError (ForeignRecordError for an authenticated stage), never other bytes. A serde
        without such a stage ignores the context: its bytes decode under any context, or none."""
        with self.make_processor() as processor:
            src = kv_like((2, 2, 8, 16), self.dtypes[0], seed=4)
            payload = self._encode(processor, src, RecordContext("tenant-a", b"header a"))
            bound = self.takes_context(processor)
            for other in (RecordContext("tenant-b", b"header a"), RecordContext("tenant-a", b"header b"), None):
                out = torch.empty_like(src)
                result = processor.submit_deserialize([payload], [out], None if other is None else [other]).result()
                if bound:
                    assert isinstance(result.errors.get(0), IntegrityError), f"decoded under {other!r}"
                else:
                    assert result.ok, result.errors
                    self.check_close(src, out)

    def test_processor_is_lazy(self) -> None:
        processor = self.make_processor()
        assert not processor.started, "a processor must not start threads before its first batch"

    def test_batch_with_a_bad_item_fails_as_a_whole(self) -> None:
        with self.make_processor() as processor:
            good = kv_like((2, 2, 8, 16), self.dtypes[0])
            bound = processor.estimate_serialized_size(LayoutDesc.of(good))
            dsts = [torch.empty(bound, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
            result = processor.submit_serialize([good, good], dsts).result()
            assert not result.ok and set(result.errors) == {1}
            with pytest.raises(BatchError):
                processor.serialize_batch([good, good], dsts)

    def test_concurrent_batches(self) -> None:
        config = self.config
        workers = (
            {**config, "max_workers": 3} if isinstance(config, dict) else [{**config[0], "max_workers": 3}, *config[1:]]
        )
        with create_serde_processor(workers) as processor:
            srcs = [kv_like((2, 2, 16, 32), self.dtypes[0], seed=i) for i in range(6)]
            bound = processor.estimate_serialized_size(LayoutDesc.of(srcs[0]))
            dsts = [torch.empty(bound, dtype=torch.uint8) for _ in srcs]
            sizes = processor.serialize_batch(srcs, dsts)
            outs = [torch.empty_like(s) for s in srcs]
            processor.deserialize_batch([d[:n] for d, n in zip(dsts, sizes, strict=True)], outs)
            for src, out in zip(srcs, outs, strict=True):
                self.check_close(src, out)
