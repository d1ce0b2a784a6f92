"""``kvtier bench serde``: serialize / deserialize throughput of a serde, each sampled in alternation with a memcpy
of the same bytes (and, for fp8, with torch's plain casts) on the harness of :mod:`kvtier.bench.common`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from kvtier.bench.common import Figure, Harness, Op, Report, add_harness_arguments, parse_shape, recording_load
from kvtier.bench.data import DEFAULT_CHUNK_SHAPE, load_kv_file, synthetic_kv
from kvtier.serde import LayoutDesc, create_serde_processor
from kvtier.types import KVFormat, parse_dtype

#: Extra in-run baselines per stage type: given the source tensor, (figure name, fn, bytes of KV per call,
#: which serde op it is the baseline for). Codec modules add theirs (e.g. fp8: torch's plain casts).
ExtraBaseline = tuple[str, Callable[[], object], int, str]
EXTRA_BASELINES: dict[str, Callable[[torch.Tensor], list[ExtraBaseline]]] = {}


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
    add_harness_arguments(parser, rounds=10)


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

    # One call before the harness's warm-up: the payloads the deserialize reads.
    sizes = processor.serialize_batch(srcs, dsts)
    payloads = [d[:n] for d, n in zip(dsts, sizes, strict=True)]
    nbytes = layout.nbytes
    report = Report(
        "serde",
        {
            "serde": config,
            "shape": list(src.shape),
            "dtype": str(src.dtype).removeprefix("torch."),
            "workers": args.workers,
            "rounds": args.rounds,
            "order": args.order,
            "data": args.data or "synthetic",
            "outlier_channels": args.outliers,
            "torch_threads": torch.get_num_threads(),
        },
    )
    h = Harness(args.rounds, order=args.order)
    memcpy = Op("memcpy", lambda: copy_dst.copy_(src), nbytes)
    ops = {
        "serialize": Op("serialize", lambda: processor.serialize_batch(srcs, dsts), nbytes * batch),
        "deserialize": Op("deserialize", lambda: processor.deserialize_batch(payloads, outs), nbytes * batch),
    }
    for op_name, op in ops.items():
        h.compare(f"{op_name} (GB/s of KV)", op, memcpy, f"{batch} chunk(s) per call on {batch} worker(s)")
        for name, fn, extra_bytes, for_op in extras:
            if for_op == op_name:
                h.compare(f"{op_name} vs {name}", op, Op(name, fn, extra_bytes))
    try:
        with recording_load(report):
            results = h.run(f"bench serde {processor.identity.name}", show_progress=not args.json)
    finally:
        processor.close()
    report.add_results(results)
    ratio = nbytes / sizes[0] if sizes[0] else float("inf")
    report.add(Figure("size ratio (KV bytes per serialized byte)", ratio, unit="x"))
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
