"""Shared helpers of the engine tests: the real model, real prompts, one LLM per module."""

from __future__ import annotations

import argparse
import gc
import os
from functools import cache
from pathlib import Path
from typing import Any

CHUNK = 128  # = vLLM's CPU block size: one block per chunk keeps the prompts (and the tests) short
MODEL_NAME = "smollm2-135m"  # served_model_name, so that the HF integration names the model the same way


@cache
def model_dir() -> Path:
    from kvtier.integrations.models import smollm2_dir

    return smollm2_dir(os.environ.get("KVTIER_CACHE_DIR") and Path(os.environ["KVTIER_CACHE_DIR"]))


@cache
def _text_ids() -> list[int]:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir(), local_files_only=True)
    with open(argparse.__file__) as f:
        return list(tokenizer(f.read()).input_ids)


def prompt(tokens: int, seed: int) -> list[int]:
    """``tokens`` ids of a real text (argparse's source), from an offset that depends on ``seed``."""
    ids = _text_ids()
    start = (seed * 997) % (len(ids) - tokens)
    return ids[start : start + tokens]


def make_llm(extra: dict[str, Any], dtype: str = "bfloat16", **kwargs: Any) -> Any:
    """A vLLM with kvtier's connector and vLLM's own prefix caching off, on the converted SmolLM2, with a small KV
    cache (the tests' prompts are short). In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with an embedded
    Store; vLLM's multi-process engine when ``extra`` names a ``server``."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if "server" in extra else "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm.config import KVTransferConfig

    from vllm import LLM

    ktc = KVTransferConfig(
        kv_connector="KVTierConnector",
        kv_connector_module_path="kvtier.integrations.vllm",
        kv_role="kv_both",
        kv_connector_extra_config=extra,
    )
    args: dict[str, Any] = {
        "model": str(model_dir()),
        "served_model_name": MODEL_NAME,
        "dtype": dtype,
        "max_model_len": 1024,
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "gpu_memory_utilization": 0.1,
        "kv_cache_memory_bytes": 64 << 20,
        "seed": 0,
        "kv_transfer_config": ktc,
    }
    args.update(kwargs)
    return LLM(**args)


def close_llm(llm: Any) -> None:
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    from kvtier.integrations.vllm.config import close_embedded_stores

    llm.llm_engine.engine_core.shutdown()
    ensure_kv_transfer_shutdown()  # vLLM keeps the worker-side connector in a global
    del llm
    gc.collect()
    close_embedded_stores()


def generate(llm: Any, ids: list[int], max_tokens: int = 32, cache_salt: str | None = None) -> tuple[list[int], int]:
    """Greedy ``max_tokens`` tokens of one prompt: (token ids, vLLM's count of prompt tokens not computed)."""
    tokens, cached, _ = generate_with_margins(llm, ids, max_tokens, cache_salt)
    return tokens, cached


def generate_with_margins(
    llm: Any, ids: list[int], max_tokens: int = 32, cache_salt: str | None = None
) -> tuple[list[int], int, list[float]]:
    """Like :func:`generate`, plus each step's margin: chosen token's logprob minus the runner-up's."""
    from vllm.inputs import TokensPrompt

    from vllm import SamplingParams

    p = TokensPrompt(prompt_token_ids=ids)
    if cache_salt is not None:
        p["cache_salt"] = cache_salt
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=2)
    (out,) = llm.generate([p], params, use_tqdm=False)
    completion = out.outputs[0]
    margins = []
    for tok, step in zip(completion.token_ids, completion.logprobs or [], strict=False):
        others = [lp.logprob for t, lp in step.items() if t != tok]
        margins.append(step[tok].logprob - max(others) if others else float("inf"))
    return list(completion.token_ids), int(out.num_cached_tokens or 0), margins


def same_greedy(reference: list[int], margins: list[float], tokens: list[int], tie: float = 0.5) -> bool:
    """``tokens`` equal ``reference``, or first differ where the reference's top two were within ``tie`` nats (4 bf16
    steps of a logit near 20).

    A hit is exact KV but not the miss's arithmetic in bf16 (vLLM computes the tail alone, not inside a larger
    prefill batch; a batch of requests decodes in other shapes than one alone), so logits differ by rounding and a
    near-tie may flip. Wrong KV changes the output where the model was sure: that is what this rejects.
    """
    for i, (a, b) in enumerate(zip(reference, tokens, strict=True)):
        if a != b:
            print(f"greedy outputs differ at {i}: margin {margins[i]:.4f} nats")
            return margins[i] < tie
    return True


def worker_stats() -> dict[str, float]:
    from kvtier.integrations.vllm.connector import live_connectors

    (worker,) = live_connectors("worker")
    return dict(worker.stats)
