"""The serde promises end to end through a Store: per-salt keys, and two deployments with other keys sharing
one L2 store leave each other's records alone (defects 3 and 5, seen from the serde)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier import ObjectKey, Store
from kvtier.bench.redis_server import LocalRedis, find_redis_server
from kvtier.errors import ForeignRecordError
from kvtier.l2.adapters import FSAdapter
from kvtier.l2.record import associated_data, read_record
from kvtier.serde import RecordContext
from kvtier.serde.aesgcm import AesGcmStage
from kvtier.testing.serde import kv_like

KEY_A = "11" * 32
KEY_B = "22" * 32
MB = 1 / 1024  # GiB


def serde(env: str) -> list[dict[str, Any]]:
    return [{"type": "zstd", "level": 1, "shuffle": True}, {"type": "aesgcm", "key_env": env}]


def keys(n: int, salt: str) -> list[ObjectKey]:
    return [ObjectKey("org/model", format(0x200 + i, "x"), cache_salt=salt) for i in range(n)]


def chunks(n: int) -> list[torch.Tensor]:
    return [kv_like((2, 2, 16, 64), torch.bfloat16, seed=40 + i) for i in range(n)]


@pytest.fixture(params=["fs", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """One shared L2 store (an fs directory or a real redis-server) that both deployments configure."""
    if request.param == "fs":
        yield {"type": "fs", "base_path": str(tmp_path / "l2"), "durability": "none"}
        return
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed")
    with LocalRedis() as server:
        yield {"type": "redis", "url": server.url, "key_prefix": uuid.uuid4().hex, "timeout_s": 2}


def test_deployments_with_other_keys_share_a_store_without_destroying_records(
    backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 5: a deployment with another aesgcm key reads the other's records as misses and leaves them; the
    owner still reads every one of them afterwards, bit for bit."""
    monkeypatch.setenv("KVTIER_E2E_KEY_A", KEY_A)
    monkeypatch.setenv("KVTIER_E2E_KEY_B", KEY_B)
    mine, theirs = keys(9, "tenant")[:6], keys(9, "tenant")[6:]
    data = chunks(9)
    with Store(l1_size_gb=MB, l2_adapters=[{**backend, "serde": serde("KVTIER_E2E_KEY_A")}]) as a:
        a.store(mine, data[:6])
        a.flush()
    with Store(l1_size_gb=MB, l2_adapters=[{**backend, "serde": serde("KVTIER_E2E_KEY_B")}]) as b:
        for _ in range(3):  # again and again: still a miss, still nothing removed
            assert b.lookup(mine) == 0
            assert b.retrieve(mine) == [None] * 6
        b.store(theirs, data[6:])
        b.flush()
        b.clear_l1()
        got = b.retrieve(theirs)
        assert all(g is not None and torch.equal(g, d) for g, d in zip(got, data[6:], strict=True))
    with Store(l1_size_gb=MB, l2_adapters=[{**backend, "serde": serde("KVTIER_E2E_KEY_A")}]) as a:
        assert a.lookup(mine) == 6
        got = a.retrieve(mine)
        assert all(g is not None and torch.equal(g, d) for g, d in zip(got, data[:6], strict=True))
        assert a.retrieve(theirs) == [None] * 3


def test_storage_encrypts_each_record_with_its_salts_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 3: the record on disk opens only with the key derived for its own salt and its own header."""
    monkeypatch.setenv("KVTIER_E2E_KEY_A", KEY_A)
    config = {"type": "fs", "base_path": str(tmp_path), "durability": "none"}
    (src,) = chunks(1)
    salts = ["tenant-a", "tenant/b+=="]
    with Store(
        l1_size_gb=MB, l2_adapters=[{**config, "serde": [{"type": "aesgcm", "key_env": "KVTIER_E2E_KEY_A"}]}]
    ) as s:
        for salt in salts:
            s.store(keys(1, salt), [src])
        s.flush()
        adapter = s._tiers[0].adapter
        assert isinstance(adapter, FSAdapter)
        stage = AesGcmStage(bytes.fromhex(KEY_A))
        for salt in salts:
            (k,) = keys(1, salt)
            meta, payload = read_record(adapter.path_for(k.to_str()).read_bytes())
            body = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            out = torch.empty(body.numel() - 28, dtype=torch.uint8)
            stage.deserialize(body, out, RecordContext(salt, associated_data(meta)))
            assert torch.equal(out, src.reshape(-1).view(torch.uint8))
            for other in ("", *(s for s in salts if s != salt)):
                with pytest.raises(ForeignRecordError):
                    stage.deserialize(body, out, RecordContext(other, associated_data(meta)))
            with pytest.raises(ForeignRecordError):  # direct use (no context): the empty salt, no header
                stage.deserialize(body, out)
