"""The connector in a real vLLM (in-process engine, embedded Store), SmolLM2 in bf16, vLLM's prefix caching off.

One LLM for the module: chunk_size 128 (one block), chunked prefill with a 256-token budget (every prompt longer
than that is prefilled over several steps), an L1 in front of two fs L2 tiers (raw first, then fp8), a KV cache
of ten blocks (so that three long requests at once are preempted). Every hit test checks the connector's count of
tokens loaded into the paged cache and compares 32 greedy tokens with the same prompt's first (miss) run, which
vLLM computed entirely by itself.

In bf16 a hit is exact KV but not the same arithmetic as the miss: vLLM computes the tail alone instead of inside
a larger prefill batch, so logits differ by rounding and a greedy near-tie can flip (it did for 5 of 15 offsets of
401-token prompts, none of 60 others). Outputs must therefore be identical, or first differ where the miss run's
top two tokens were within 0.5 nats (bf16 logits near 20 step by 0.125); the negative control shows that wrong
KV fails this check, and the KV itself is compared with another engine's in test_engine_cross.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import (
    CHUNK,
    MODEL_NAME,
    close_llm,
    generate_with_margins,
    make_llm,
    model_dir,
    prompt,
    same_greedy,
    worker_stats,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-l2")
    return {"raw": root / "raw", "fp8": root / "fp8"}


@pytest.fixture(scope="module")
def extra(dirs: dict[str, Path]) -> dict[str, Any]:
    return {
        "l1_size_gb": 0.25,
        "chunk_size": CHUNK,
        "l2_adapters": [
            {"type": "fs", "base_path": str(dirs["raw"])},
            {"type": "fs", "base_path": str(dirs["fp8"]), "serde": {"type": "fp8"}},
        ],
    }


@pytest.fixture(scope="module")
def llm(extra: dict[str, Any]) -> Any:
    engine = make_llm(extra, max_num_batched_tokens=256, max_num_seqs=4, kv_cache_memory_bytes=32 << 20)
    yield engine
    close_llm(engine)


@pytest.fixture(scope="module")
def store(llm: Any) -> Any:
    from kvtier.integrations.vllm.connector import live_connectors

    return live_connectors("worker")[0].store


def loaded_by(llm: Any, ids: list[int], **kwargs: Any) -> tuple[list[int], int, dict[str, float]]:
    """Generate; return the tokens, the tokens the connector loaded for this request, and the stats delta."""
    before = worker_stats()
    tokens, _, margins = generate_with_margins(llm, ids, **kwargs)
    after = worker_stats()
    delta = {k: after[k] - before[k] for k in after}
    delta["margins"] = margins  # type: ignore[assignment]
    return tokens, int(delta["loaded_tokens"]), delta


class Reference:
    """A prompt's first (miss) run: what every later run of it is compared with."""

    def __init__(self, llm: Any, ids: list[int], **kwargs: Any) -> None:
        self.tokens, self.loaded, self.delta = loaded_by(llm, ids, **kwargs)
        self.margins: list[float] = self.delta["margins"]  # type: ignore[assignment]

    def matches(self, tokens: list[int], tie: float = 0.5) -> bool:
        return same_greedy(self.tokens, self.margins, tokens, tie)


def drop_files(path: Path) -> int:
    """Delete every record file under ``path`` (a tier losing its records behind kvtier's back)."""
    files = [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        p.unlink()
    return len(files)


def test_one_store_for_both_roles(llm: Any, store: Any) -> None:
    from kvtier.integrations.vllm.connector import live_connectors

    (scheduler,) = live_connectors("scheduler")
    (worker,) = live_connectors("worker")
    assert scheduler.store is worker.store is store
    assert worker.model_name == MODEL_NAME


def test_l1_then_l2_raw_hits_are_exact(llm: Any, store: Any) -> None:
    ids = prompt(3 * CHUNK + 17, seed=2)
    ref = Reference(llm, ids)
    assert ref.loaded == 0 and ref.delta["saved_chunks"] == 3
    # chunked prefill: the 401-token prompt is prefilled over two steps, its chunks saved in each
    assert ref.delta["save_ops"] == 2

    tokens, loaded, _ = loaded_by(llm, ids)  # L1 hit
    assert loaded == 3 * CHUNK
    assert ref.matches(tokens)

    store.flush()
    store.clear_l1()
    tokens, loaded, _ = loaded_by(llm, ids)  # raw fs hit
    assert loaded == 3 * CHUNK
    assert ref.matches(tokens)
    assert store.stats()["l2_prefetched"] >= 3


def test_l2_fp8_hit_greedy_matches(llm: Any, store: Any, dirs: dict[str, Path]) -> None:
    """fp8 is lossy (3 mantissa bits): identical output, or a first difference at a near-tie."""
    for seed in (40, 41):
        ids = prompt(3 * CHUNK + 5, seed=seed)
        ref = Reference(llm, ids)
        store.flush()
        store.clear_l1()
        assert drop_files(dirs["raw"]) >= 3  # the raw tier loses its records: the fp8 tier serves
        tokens, loaded, delta = loaded_by(llm, ids)
        assert loaded == 3 * CHUNK and delta["load_error_blocks"] == 0
        assert ref.matches(tokens)


def test_never_the_last_prompt_token_and_short_prompts(llm: Any) -> None:
    exact = prompt(2 * CHUNK, seed=60)  # two full chunks: the second holds the last prompt token
    ref = Reference(llm, exact)
    assert ref.loaded == 0 and ref.delta["saved_chunks"] == 2
    tokens, loaded, _ = loaded_by(llm, exact)
    assert loaded == CHUNK  # only the first chunk: the last token's logits must be computed
    assert ref.matches(tokens)

    for n in (1, 5, CHUNK - 1, CHUNK):
        short = prompt(n, seed=61 + n)
        ref = Reference(llm, short)
        tokens, loaded_again, _ = loaded_by(llm, short)
        assert ref.loaded == loaded_again == 0
        assert tokens == ref.tokens  # nothing loaded: the same computation


def test_cache_salt_separates_and_any_salt_is_accepted(llm: Any) -> None:
    ids = prompt(2 * CHUNK + 9, seed=4)
    ref = Reference(llm, ids, cache_salt="tenant-a")
    tokens, loaded, _ = loaded_by(llm, ids, cache_salt="tenant-a")
    assert loaded == 2 * CHUNK and ref.matches(tokens)
    for salt in ("tenant-b", "", "tenant a/ü\n=;", "=" * 300):
        tokens, loaded, delta = loaded_by(llm, ids, cache_salt=salt)
        assert loaded == 0, salt
        assert tokens == ref.tokens  # a miss: the same computation as the reference
        assert delta["saved_chunks"] == 2
    tokens, loaded, _ = loaded_by(llm, ids, cache_salt="tenant a/ü\n=;")
    assert loaded == 2 * CHUNK and ref.matches(tokens)


def test_records_gone_between_lookup_and_load_are_recomputed(
    llm: Any, store: Any, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvtier.integrations.vllm.connector import KVTierConnector

    ids = prompt(3 * CHUNK + 5, seed=5)
    ref = Reference(llm, ids)
    store.flush()
    original = KVTierConnector.build_connector_meta
    removed: list[int] = []

    def build_then_remove(self: KVTierConnector, scheduler_output: Any) -> Any:
        meta = original(self, scheduler_output)
        if meta.loads:  # the scheduler said "hit"; the records vanish before the worker loads them
            store.clear_l1()
            removed.append(drop_files(dirs["raw"]) + drop_files(dirs["fp8"]))
        return meta

    monkeypatch.setattr(KVTierConnector, "build_connector_meta", build_then_remove)
    tokens, loaded, delta = loaded_by(llm, ids)
    monkeypatch.undo()
    assert removed and removed[0] >= 6
    assert loaded == 0
    assert delta["load_error_blocks"] == 3  # reported to vLLM, which recomputed them
    assert tokens == ref.tokens  # recomputed from scratch: the reference's computation
    # The recomputed chunks were saved again: the next request hits.
    tokens, loaded, _ = loaded_by(llm, ids)
    assert loaded == 3 * CHUNK and ref.matches(tokens)


def test_negative_control_foreign_chunk_changes_the_output(llm: Any, store: Any) -> None:
    ids, other = prompt(2 * CHUNK + 3, seed=6), prompt(2 * CHUNK + 3, seed=7)
    ref = Reference(llm, ids)
    loaded_by(llm, other)
    keys = store.keys_for_tokens(MODEL_NAME, ids)
    foreign = store.retrieve(store.keys_for_tokens(MODEL_NAME, other))
    assert len(foreign) == 2 and all(f is not None for f in foreign)
    store.store(keys, foreign)  # another prompt's chunks under this prompt's keys
    tokens, loaded, _ = loaded_by(llm, ids)
    assert loaded == 2 * CHUNK
    assert not ref.matches(tokens)  # not a near-tie flip: the model was sure, and the output changed


def test_preempted_requests_resume_exactly(llm: Any) -> None:
    """Three 376-token requests (3 blocks each) generating 60 tokens need 12 blocks of a 10-block cache: vLLM
    preempts and resumes (re-scheduling the prompt, whose chunks kvtier now holds)."""
    from vllm.inputs import TokensPrompt

    from kvtier.integrations.vllm.connector import live_connectors
    from vllm import SamplingParams

    prompts = [prompt(2 * CHUNK + 120, seed=20 + i) for i in range(3)]
    params = SamplingParams(max_tokens=60, temperature=0)
    alone = [generate_with_margins(llm, p, max_tokens=60) for p in prompts]
    (scheduler,) = live_connectors("scheduler")
    resumed = scheduler.stats["resumed_requests"]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    for out, (tokens, _, margins) in zip(outs, alone, strict=True):
        assert same_greedy(tokens, margins, list(out.outputs[0].token_ids))  # batched decode rounds otherwise
    assert scheduler.stats["resumed_requests"] > resumed
    assert not scheduler._requests  # finished requests leave no state behind


def test_aborted_request_leaves_no_state(llm: Any) -> None:
    from vllm.inputs import TokensPrompt

    from kvtier.integrations.vllm.connector import live_connectors
    from vllm import SamplingParams

    (scheduler,) = live_connectors("scheduler")
    ids = prompt(3 * CHUNK + 40, seed=30)
    engine = llm.llm_engine
    engine.add_request("to-abort", TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=50, temperature=0))
    engine.step()  # the first 256 tokens are prefilled (and their two chunks saved)
    engine.abort_request(["to-abort"])
    while engine.has_unfinished_requests():
        engine.step()
    assert not scheduler._requests
    tokens, loaded, _ = loaded_by(llm, ids)
    assert loaded == 2 * CHUNK  # the chunks saved before the abort serve the next request
    ref = Reference(llm, ids, cache_salt="abort-ref")  # a miss of the same tokens under another salt
    assert ref.matches(tokens)


def test_a_store_filled_by_vllm_serves_transformers_bf16(llm: Any, store: Any) -> None:
    """The canonical layout end to end: vLLM stores, HF transformers (bf16) hits and generates the same greedy
    tokens as without the store."""
    from kvtier.integrations.models import load_smollm2
    from kvtier.integrations.transformers import TransformersKV

    ids = prompt(2 * CHUNK + 11, seed=8)
    loaded_by(llm, ids)
    store.flush()
    model, _ = load_smollm2(model_dir().parent.parent, dtype=torch.bfloat16)
    x = torch.tensor([ids])
    args = {"max_new_tokens": 16, "do_sample": False}
    with torch.no_grad():
        plain = model.generate(x, attention_mask=torch.ones_like(x), **args)
    result = TransformersKV(model, store, MODEL_NAME).generate(x, **args)
    assert result.reused_tokens == 2 * CHUNK
    assert torch.equal(result.output.sequences, plain)
