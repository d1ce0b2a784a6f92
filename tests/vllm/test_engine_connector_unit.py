"""KVTierConnector's scheduler side and start-up checks, with vLLM imported but no engine: a real Store, vLLM's
config objects replaced by plain namespaces holding only the fields the connector reads."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import kvtier
from kvtier.errors import ConfigError

CHUNK = 128


def vllm_config(extra: dict[str, Any], block_size: int = 128, cache_dtype: str = "auto") -> Any:
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra, kv_load_failure_policy="fail"),
        cache_config=SimpleNamespace(block_size=block_size, cache_dtype=cache_dtype),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1),
        model_config=SimpleNamespace(served_model_name=["m"], model="/models/m"),
    )


def make(extra: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvtier.integrations.vllm.connector import KVTierConnector

    cfg = vllm_config(extra or {"l1_size_gb": 0.01, "chunk_size": CHUNK}, **kwargs)
    return KVTierConnector(cfg, KVConnectorRole.SCHEDULER, None)


@pytest.fixture(autouse=True)
def in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def request(ids: list[int], req_id: str = "r", salt: str | None = None) -> Any:
    return SimpleNamespace(request_id=req_id, prompt_token_ids=ids, cache_salt=salt)


def test_start_up_refusals_name_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="chunk_size 200 is not a multiple of vLLM's block_size 128"):
        make({"l1_size_gb": 0.01, "chunk_size": 200})
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        make(cache_dtype="fp8")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ConfigError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        make({"l1_size_gb": 0.01, "chunk_size": 256})


def test_lookup_counts_whole_chunks_never_the_last_token_and_has_no_side_effects() -> None:
    conn = make()
    assert conn.model_name == "m"
    assert conn._kv_transfer_config.kv_load_failure_policy == "recompute"
    store: kvtier.Store = conn.store
    ids = list(range(3 * CHUNK))
    keys = store.keys_for_tokens("m", ids)
    chunk = torch.zeros((2, 2, CHUNK, 8), dtype=torch.bfloat16)
    store.store(keys, [chunk] * 3)
    before = (dict(conn._requests), store.stats()["stored"])
    for _ in range(5):  # asked again and again: the same answer, nothing changes
        assert conn.get_num_new_matched_tokens(request(ids), 0) == (
            2 * CHUNK,
            False,
        )  # not the chunk with the last token
        assert conn.get_num_new_matched_tokens(request([*ids, 7]), 0) == (3 * CHUNK, False)
        assert conn.get_num_new_matched_tokens(request([*ids, 7]), CHUNK) == (2 * CHUNK, False)
        assert conn.get_num_new_matched_tokens(request([*ids, 7]), 3 * CHUNK) == (0, False)
        assert conn.get_num_new_matched_tokens(request([*ids, 7], salt="other"), 0) == (0, False)
        assert conn.get_num_new_matched_tokens(request(ids[:5]), 0) == (0, False)
        assert conn.get_num_new_matched_tokens(request([]), 0) == (0, False)
    assert (dict(conn._requests), store.stats()["stored"]) == before
    store.clear_l1()
    store.store(keys[1:], [chunk] * 2)  # a hole at chunk 0: only leading chunks count
    assert conn.get_num_new_matched_tokens(request([*ids, 7], req_id="r2"), 0) == (0, False)


def test_plan_loads_then_saves_across_chunked_prefill_and_forgets_finished_requests() -> None:
    conn = make()
    store: kvtier.Store = conn.store
    ids = list(range(1000, 1000 + 4 * CHUNK + 10))
    keys = store.keys_for_tokens("m", ids)
    store.store(keys[:1], [torch.zeros((2, 2, CHUNK, 8), dtype=torch.bfloat16)])
    req = request(ids, "a")
    assert conn.get_num_new_matched_tokens(req, 0) == (CHUNK, False)
    blocks = SimpleNamespace(get_block_ids=lambda: ([10, 11, 12],))
    conn.update_state_after_alloc(req, blocks, CHUNK)
    new = SimpleNamespace(req_id="a", block_ids=([10, 11, 12],), num_computed_tokens=CHUNK)
    none = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    step1 = SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=none, num_scheduled_tokens={"a": 256})
    meta = conn.build_connector_meta(step1)
    assert [(op.keys, op.blocks, op.skip) for op in meta.loads] == [(keys[:1], [10], 0)]
    assert [(op.keys, op.blocks) for op in meta.saves] == [(keys[1:3], [11, 12])]
    cached = SimpleNamespace(req_ids=["a"], resumed_req_ids=set(), new_block_ids=[([13, 14],)],
                             num_computed_tokens=[3 * CHUNK])  # fmt: skip
    step2 = SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={"a": 138})
    meta = conn.build_connector_meta(step2)
    assert not meta.loads
    assert [(op.keys, op.blocks) for op in meta.saves] == [(keys[3:4], [13])]
    # A load error on block 10 reported by the worker: chunk 0 is recomputed, then saved again.
    conn.update_connector_output(SimpleNamespace(invalid_block_ids={10}))
    assert conn._requests["a"].saved == 0
    conn.request_finished(req, [10, 11, 12, 13, 14])
    assert not conn._requests and not conn._keys_memo
