"""KV events of the object-store adapter's own capacity index (a real S3 API: moto's server)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvtier.bench.local_s3 import TEST_CREDENTIALS, LocalS3, moto_available
from kvtier.events import KVEvent
from kvtier.storage.store import Store
from kvtier.testing.adapters import chunk
from kvtier.types import ObjectKey, salt_digest

pytest.importorskip("obstore", reason="the object_store extra is not installed (pip install 'kvtier[object_store]')")
if not moto_available():
    pytest.skip("moto[server] is not installed (the dev extra installs it)", allow_module_level=True)


def test_object_store_capacity_evictions_are_reported() -> None:
    server = LocalS3(bucket="kvtier-events").start()
    try:
        config = {
            "type": "object_store",
            "url": "s3://kvtier-events/ev",
            "options": {**TEST_CREDENTIALS, "region": "us-east-1", "endpoint": server.endpoint},
            "max_capacity_gb": 64 / (1 << 20),  # 64 KiB: about 9 records of 6 KiB
            "timeout_s": 5,
        }
        seen: list[KVEvent] = []

        def listener(events: Sequence[KVEvent]) -> None:
            seen.extend(events)

        with Store(l1_size_gb=1 / 1024, l2_adapters=[config]) as store:
            store.add_listener(listener)
            keys = [ObjectKey("org/m", format(0x500 + i, "x"), 1, "salt-o") for i in range(20)]
            for key in keys:
                store.store([key], [chunk(1)])
                store.flush()
            assert store.event_hub().drain(10.0)
            evicted = [e for e in seen if e.kind == "evicted" and e.tier == "object_store"]
            assert len(evicted) == store.stats()["l2"][0]["evictions"] >= 5
            assert [e.hash for e in evicted] == [k.chunk_hash for k in keys[: len(evicted)]]
            assert all(e.model == "org/m" and e.rank == 1 and e.salt == salt_digest("salt-o") for e in evicted)
    finally:
        server.stop()
