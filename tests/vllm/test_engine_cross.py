"""One canonical chunk layout: chunks that vLLM stores (float32, the ``vec`` attention ISA with K transposed in
its blocks) equal what kvtier's HF transformers integration stores for the same tokens and model, within 1e-3."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_helpers import CHUNK, MODEL_NAME, close_llm, generate, make_llm, model_dir, prompt, worker_stats

import kvtier

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def llm() -> Any:
    engine = make_llm({"l1_size_gb": 0.1, "chunk_size": CHUNK}, dtype="float32")
    yield engine
    close_llm(engine)


def test_vllm_chunks_equal_transformers_chunks_f32(llm: Any) -> None:
    from kvtier.integrations.models import load_smollm2
    from kvtier.integrations.transformers import TransformersKV
    from kvtier.integrations.vllm.connector import live_connectors

    ids = prompt(2 * CHUNK + 30, seed=13)
    generate(llm, ids, max_tokens=1)
    assert worker_stats()["saved_chunks"] == 2
    vstore = live_connectors("worker")[0].store
    from_vllm = vstore.retrieve(vstore.keys_for_tokens(MODEL_NAME, ids))
    assert all(c is not None for c in from_vllm)

    model, _ = load_smollm2(model_dir().parent.parent, dtype=torch.float32)
    with kvtier.Store(l1_size_gb=0.1, chunk_size=CHUNK) as hstore:
        kv = TransformersKV(model, hstore, MODEL_NAME)
        assert kv.forward(torch.tensor([ids])).stored_chunks == 2
        from_hf = hstore.retrieve(kv.keys(ids))
    for i, (a, b) in enumerate(zip(from_vllm, from_hf, strict=True)):
        assert a is not None and b is not None
        assert a.shape == b.shape == (2, 30, CHUNK, 3 * 64) and a.dtype == b.dtype == torch.float32
        k, v = (a - b).abs().amax(dim=(1, 2, 3)).tolist()
        print(f"chunk {i}: max abs diff K {k:.3g} V {v:.3g} (|K| up to {b[0].abs().max():.3g})")
        assert k <= 1e-3 and v <= 1e-3
    # The trap is real on this engine: vLLM's K order in a block is not the naive one, so the check has teeth.
    from kvtier.integrations.vllm.layout import BlockLayout

    layout = live_connectors("worker")[0]._layout
    naive = BlockLayout.contiguous(layout.block_size, layout.kv_heads, layout.head_dim)
    assert not torch.equal(layout.offsets[0], naive.offsets[0])
