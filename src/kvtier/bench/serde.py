"""``kvtier bench serde``: serialize / deserialize throughput of a serde beside a memcpy in the same run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from kvtier.bench.common import Figure, Report, median_rate, parse_shape, progress, timed
from kvtier.bench.data import DEFAULT_CHUNK_SHAPE, load_kv_file, synthetic_kv
from kvtier.serde import LayoutDesc, create_serde_processor
from kvtier.types import KVFormat, parse_dtype

#: Extra in-run baselines per stage type: given the source tensor, (figure name, fn, bytes of KV per call,
#: which serde op it is the baseline for). Codec modules add theirs (e.g. fp8: torch's plain casts).
ExtraBaseline = tuple[str, Callable[[], object], int, str]
EXTRA_BASELINES: dict[str, Callable[[torch.Tensor], list[ExtraBaseline]]] = {}
#: Targets set by the issues, as the minimum ratio of a serde op to memcpy, per single-stage serde type.
MEMCPY_TARGETS: dict[str, dict[str, float]] = {"raw": {"serialize": 0.8, "deserialize": 0.8}}
#: Targets set by the issues as the minimum ratio of a serde op to an extra baseline, by the baseline's name.
EXTRA_TARGETS: dict[str, float] = {}


def _fp8_baselines(src: torch.Tensor) -> list[ExtraBaseline]:
    """torch's own casts, the reference's fp8 serde: plain ``.to(float8_e4m3fn)`` and ``.to(original dtype)``."""
    if src.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return []
    fp8 = src.to(torch.float8_e4m3fn)
    cast_in = torch.empty_like(fp8)
    cast_out = torch.empty_like(src)
    return [
        ("torch .to(float8_e4m3fn)", lambda: cast_in.copy_(src), src.numel() * src.element_size(), "serialize"),
        (f"torch fp8 .to({src.dtype})", lambda: cast_out.copy_(fp8), src.numel() * src.element_size(), "deserialize"),
    ]


EXTRA_BASELINES["fp8"] = _fp8_baselines
EXTRA_TARGETS.update({"torch .to(float8_e4m3fn)": 1.0, "torch fp8 .to(torch.bfloat16)": 8.0})
MEMCPY_TARGETS["fp8"] = {"deserialize": 0.5}
MEMCPY_TARGETS["aesgcm"] = {"serialize": 0.6, "deserialize": 0.6}


def outlier_channel_error(src: torch.Tensor, out: torch.Tensor) -> float | None:
    """Percent of the elements of outlier channels (amax over tokens >= 100x the median channel's) that are
    off by more than 10 % relative; None when the tensor has no outlier channel or fewer than 2 dimensions."""
    if src.dim() < 2 or src.numel() == 0:
        return None
    amax = src.float().abs().amax(dim=-2, keepdim=True)
    channels = amax >= 100 * amax.median().clamp_min(1e-30)
    if not bool(channels.any()):
        return None
    mask = channels.expand_as(src)
    rel = (out.float() - src.float()).abs() / src.float().abs().clamp_min(1e-6)
    return float((rel[mask] > 0.1).float().mean()) * 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--serde",
        default="raw",
        help='a serde type ("raw", "fp8", ...) or a JSON config / chain (default: raw)',
    )
    parser.add_argument(
        "--shape",
        default=",".join(map(str, DEFAULT_CHUNK_SHAPE)),
        help="chunk shape [2, layers, tokens, hidden] (default: 2,32,256,1024)",
    )
    parser.add_argument("--dtype", default="bfloat16", help="chunk dtype (default: bfloat16)")
    parser.add_argument("--data", default=None, help="a safetensors file whose 'kv' tensor is used instead")
    parser.add_argument(
        "--outliers", type=int, default=0, help="scale this many channels of the synthetic chunk by 1000"
    )
    parser.add_argument("--workers", type=int, default=1, help="serde threads; the batch has this many chunks")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (default: 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def _serde_config(text: str) -> Any:
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--serde: invalid JSON ({exc})") from exc
    return {"type": text}


def run(args: argparse.Namespace) -> Report:
    config = _serde_config(args.serde)
    if args.workers < 1 or args.rounds < 1:
        raise SystemExit("--workers and --rounds must be >= 1")
    if isinstance(config, dict):
        config = {**config, "max_workers": args.workers}
    else:
        config = [{**config[0], "max_workers": args.workers}, *config[1:]]
    if args.data:
        src = load_kv_file(args.data)
    else:
        src = synthetic_kv(parse_shape(args.shape), parse_dtype(args.dtype), outlier_channels=args.outliers)
    kv_format = KVFormat.KV_LAYER_TOKEN_HIDDEN if src.dim() == 4 and src.shape[0] == 2 else KVFormat.FLAT
    layout = LayoutDesc.of(src, kv_format)
    processor = create_serde_processor(config)
    batch = args.workers
    bound = processor.estimate_serialized_size(layout)
    srcs = [src] * batch
    dsts = [torch.empty(bound, dtype=torch.uint8) for _ in range(batch)]
    outs = [torch.empty_like(src) for _ in range(batch)]
    copy_dst = torch.empty_like(src)
    stage_types = [c["type"] for c in (config if isinstance(config, list) else [config])]
    extras = [b for t in stage_types if t in EXTRA_BASELINES for b in EXTRA_BASELINES[t](src)]

    # Warm up: compiles kernels, grows scratch buffers, starts the pool.
    sizes = processor.serialize_batch(srcs, dsts)
    payloads = [d[:n] for d, n in zip(dsts, sizes, strict=True)]
    processor.deserialize_batch(payloads, outs)
    for _, fn, _, _ in extras:
        fn()

    samples: dict[str, list[float]] = {"memcpy": [], "serialize": [], "deserialize": []}
    for name, *_ in extras:
        samples[name] = []
    with progress(args.rounds, f"bench serde {processor.identity.name}", enabled=not args.json) as advance:
        for _ in range(args.rounds):
            samples["memcpy"].append(timed(lambda: copy_dst.copy_(src)))
            samples["serialize"].append(timed(lambda: processor.serialize_batch(srcs, dsts)))
            samples["deserialize"].append(timed(lambda: processor.deserialize_batch(payloads, outs)))
            for name, fn, _, _ in extras:
                samples[name].append(timed(fn))
            advance()
    processor.close()

    nbytes = layout.nbytes
    memcpy = median_rate(samples["memcpy"], nbytes)
    report = Report(
        "serde",
        {
            "serde": config,
            "shape": list(src.shape),
            "dtype": str(src.dtype).removeprefix("torch."),
            "workers": args.workers,
            "rounds": args.rounds,
            "data": args.data or "synthetic",
            "outlier_channels": args.outliers,
            "torch_threads": torch.get_num_threads(),
        },
    )
    ratio = nbytes / sizes[0] if sizes[0] else float("inf")
    report.add(Figure("memcpy (reused buffer)", memcpy))
    for op in ("serialize", "deserialize"):
        rate = median_rate(samples[op], nbytes * batch)
        target = MEMCPY_TARGETS.get(stage_types[0], {}).get(op) if len(stage_types) == 1 else None
        report.add(
            Figure(
                f"{op} (GB/s of KV)",
                rate,
                baseline="memcpy",
                baseline_value=memcpy,
                target=target,
                note=f"size ratio {ratio:.3f}" if op == "serialize" else "",
            )
        )
        for name, _, extra_bytes, for_op in extras:
            if for_op == op:
                base = median_rate(samples[name], extra_bytes)
                target = EXTRA_TARGETS.get(name)
                report.add(Figure(f"{op} vs {name}", rate, baseline=name, baseline_value=base, target=target))
    lossless = torch.equal(outs[0].view(torch.uint8), src.view(torch.uint8))
    err = (outs[0].float() - src.float()).abs()
    rel = err / src.float().abs().clamp_min(1e-6)
    report.add(Figure("max abs error", float(err.max()), unit="", note="lossless" if lossless else "lossy"))
    report.add(Figure("elements with rel. error > 10 %", float((rel > 0.1).float().mean()) * 100, unit="%"))
    outliers = outlier_channel_error(src, outs[0])
    if outliers is not None and src.dtype.is_floating_point:
        # the reference's unscaled cast in the same run, as the accuracy baseline
        unscaled = outlier_channel_error(src, src.to(torch.float8_e4m3fn).to(src.dtype))
        report.add(
            Figure(
                "outlier-channel elements off > 10 %",
                outliers,
                unit="%",
                note=f"torch unscaled e4m3 cast: {unscaled:.3f} %",
            )
        )
    return report
