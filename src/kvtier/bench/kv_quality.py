"""``kvtier bench kv-quality``: what fp8 on disk does to a real model's output.

SmolLM2-135M-Instruct computes the KV of a real text's first ``--prefix`` tokens; each serde round-trips those
chunks (serialize + deserialize, as an L2 store and load would), the model continues over the next ``--continue``
tokens from the round-tripped cache, and the figures compare with raw (bit-exact) KV: max and mean absolute
logits difference, top-1 agreement, perplexity and its delta, and the share of KV elements off by more than 10 %.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

import kvtier
from kvtier.bench.common import Figure, Report, progress
from kvtier.serde import LayoutDesc, create_serde_processor

#: the serdes compared, by label: raw is the reference (bit-exact), then fp8 scaled (kvtier's default) and
#: unscaled (the reference system's cast), in both fp8 formats.
SERDES: dict[str, dict[str, Any]] = {
    "raw": {"type": "raw"},
    "fp8 e4m3 scaled": {"type": "fp8", "fp8_dtype": "float8_e4m3fn"},
    "fp8 e4m3 unscaled": {"type": "fp8", "fp8_dtype": "float8_e4m3fn", "scale": "none"},
    "fp8 e5m2 scaled": {"type": "fp8", "fp8_dtype": "float8_e5m2"},
    "fp8 e5m2 unscaled": {"type": "fp8", "fp8_dtype": "float8_e5m2", "scale": "none"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", type=int, default=1024, help="prompt tokens whose KV is stored (chunks of 256)")
    parser.add_argument("--continue", dest="cont", type=int, default=256, help="tokens computed after the prefix")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def _round_trip(config: dict[str, Any], chunks: torch.Tensor) -> torch.Tensor:
    """Every chunk through the serde and back, as a store and a load from L2 would do."""
    with create_serde_processor(config) as serde:
        layout = LayoutDesc.of(chunks[0], "2LTH")
        dsts = [torch.empty(serde.estimate_serialized_size(layout), dtype=torch.uint8) for _ in chunks]
        sizes = serde.serialize_batch(list(chunks), dsts)
        out = torch.empty_like(chunks)
        serde.deserialize_batch([d[:n] for d, n in zip(dsts, sizes, strict=True)], list(out))
    return out


def run(args: argparse.Namespace) -> Report:
    from kvtier.integrations.models import load_smollm2
    from kvtier.integrations.transformers import TransformersKV

    chunk = 256
    if args.prefix < chunk or args.prefix % chunk or args.cont < 2:
        raise kvtier.ConfigError(f"--prefix: expected a multiple of {chunk}; --continue: expected >= 2")
    model, tokenizer = load_smollm2()
    import argparse as text_source  # a real text that ships with Python

    text = Path(text_source.__file__).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prefix + args.cont]
    prefix, rest = ids[:, : args.prefix], ids[:, args.prefix :]
    targets = rest[0, 1:]
    report = Report("kv-quality", {"model": "SmolLM2-135M-Instruct (float32)", "text": "CPython Lib/argparse.py",
                                   "prefix_tokens": args.prefix, "continued_tokens": int(rest.shape[1])})  # fmt: skip
    with kvtier.Store(l1_size_gb=0.05, chunk_size=chunk) as store, torch.no_grad():
        kv = TransformersKV(model, store, "smollm2-135m-instruct")
        cache = model(prefix, use_cache=True).past_key_values
        chunks = kv.cache_to_chunks(cache, 0, args.prefix // chunk).clone()
        results: dict[str, tuple[torch.Tensor, float, float]] = {}
        with progress(len(SERDES), "kv-quality", enabled=not args.json) as advance:
            for label, config in SERDES.items():
                back = _round_trip(config, chunks)
                rel = (back - chunks).abs() / chunks.abs().clamp_min(1e-6)
                off = float((rel[chunks.abs() > 1e-3] > 0.1).float().mean()) * 100
                logits = model(rest, past_key_values=kv.chunks_to_cache(back), use_cache=True).logits[0]
                nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets)
                results[label] = (logits, math.exp(float(nll)), off)
                advance()
    ref_logits, ref_ppl, _ = results["raw"]
    for label, (logits, ppl, off) in results.items():
        diff = (logits - ref_logits).abs()
        top1 = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()) * 100
        report.add(Figure(f"{label}: perplexity", ppl, unit="", baseline="raw", baseline_value=ref_ppl,
                          note=f"delta {ppl - ref_ppl:+.4f}"))  # fmt: skip
        report.add(Figure(f"{label}: max |logits diff|", float(diff.max()), unit="",
                          note=f"mean {float(diff.mean()):.4f}, top-1 agreement {top1:.2f} %"))  # fmt: skip
        report.add(Figure(f"{label}: KV elements off > 10 %", off, unit="%", note="of |x| > 1e-3"))
    return report
