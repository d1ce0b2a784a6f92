"""The fp8 kernels against torch's casts and a memcpy, sampled interleaved in every round.

``python -m kvtier.bench.fp8_kernels [--rounds N] [--fp8 float8_e4m3fn] [--shape 2,32,256,1024] [--no-wide] [--json]``

Each round times, one after the other on this thread (torch at 1 thread): for the bf16 chunk, torch's plain cast
to fp8 (into a preallocated tensor), the scaled fp8 encode (the whole ``serialize``), the unscaled encode, torch's
fp8 -> bf16 cast, the scaled decode, the unscaled decode, the 256-entry table decode the unscaled path used before
(the baseline "today's unscaled decode") and a memcpy of the decoded bf16 bytes; the same casts, encode, decode
and memcpy for fp16 and fp32 sources (unless ``--no-wide``); and one chunk through a serde processor with 2 workers,
split across them and whole (``split_min_bytes`` above the chunk). A ratio is the median over rounds of the
per-round ratios, with its p10-p90, in CPU time of this thread (``time.thread_time``: what a loaded machine does
not steal) and in wall time; the split ratios run on two threads, so they are in wall time only. The load average
and CPU count are printed with them, and the memcpy's own rate shows how disturbed the round was.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch

from kvtier.bench.data import synthetic_kv
from kvtier.serde.fp8 import _TABLES, FP8_DTYPES, Fp8Stage
from kvtier.serde.processor import AsyncSerdeProcessor
from kvtier.types import LayoutDesc

SHAPE = (2, 32, 256, 1024)
# (name, numerator, denominator, clocks): numerator / denominator > 1 means the kernel is faster
RATIOS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("scaled encode / torch .to(fp8)", "torch_to_fp8", "scaled_encode", ("cpu", "wall")),
    ("unscaled encode / torch .to(fp8)", "torch_to_fp8", "plain_encode", ("cpu", "wall")),
    ("scaled decode / torch fp8 .to(bf16)", "torch_fp8_to_bf16", "scaled_decode", ("cpu", "wall")),
    ("scaled decode / memcpy of the bf16 bytes", "memcpy_bf16", "scaled_decode", ("cpu", "wall")),
    ("scaled decode / unscaled decode", "plain_decode", "scaled_decode", ("cpu", "wall")),
    ("scaled decode / the table decode (unscaled, before)", "table_decode", "scaled_decode", ("cpu", "wall")),
    ("split encode / whole encode, 2 workers", "whole_encode_2w", "split_encode_2w", ("wall",)),
    ("split decode / whole decode, 2 workers", "whole_decode_2w", "split_decode_2w", ("wall",)),
)
WIDE_RATIOS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = tuple(
    (label.format(d=d), num.format(d=d), den.format(d=d), ("cpu", "wall"))
    for d in ("fp16", "fp32")
    for label, num, den in (
        ("{d}: scaled encode / torch .to(fp8)", "torch_to_fp8_{d}", "scaled_encode_{d}"),
        ("{d}: unscaled encode / torch .to(fp8)", "torch_to_fp8_{d}", "plain_encode_{d}"),
        ("{d}: scaled decode / torch fp8 .to({d})", "torch_fp8_to_{d}", "scaled_decode_{d}"),
        ("{d}: scaled decode / memcpy of the {d} bytes", "memcpy_{d}", "scaled_decode_{d}"),
        ("{d}: scaled decode / unscaled decode", "plain_decode_{d}", "scaled_decode_{d}"),
    )
)


@numba.njit(nogil=True, cache=False)
def _table_decode(src: np.ndarray, dst: np.ndarray, lut: np.ndarray) -> None:  # pragma: no cover (numba)
    """The unscaled decode as it was before the arithmetic kernels: ``dst[i] = lut[src[i]]``."""
    for i in range(src.size):
        dst[i] = lut[src[i]]


def _casts_and_kernels(fp8: torch.dtype, x: torch.Tensor, name: str) -> dict[str, Callable[[], Any]]:
    """torch's casts, the scaled and unscaled encode and decode, and a memcpy, for one source dtype."""
    suffix = "" if name == "bf16" else f"_{name}"
    scaled, plain = Fp8Stage(fp8, True), Fp8Stage(fp8, False)
    buf = torch.empty(scaled.estimate_serialized_size(LayoutDesc.of(x)), dtype=torch.uint8)
    plain_buf = torch.empty(x.numel(), dtype=torch.uint8)
    scaled.serialize(x, buf)
    fp8_src = x.clamp(-448, 448).to(fp8)  # what torch decodes (and the unscaled payload: the same codes)
    plain.serialize(fp8_src.to(x.dtype), plain_buf)
    out, copy_src = torch.empty_like(x), x.clone()
    cast_out = torch.empty(x.shape, dtype=fp8)
    return {
        f"torch_to_fp8{suffix}": lambda: cast_out.copy_(x),
        f"scaled_encode{suffix}": lambda: scaled.serialize(x, buf),
        f"plain_encode{suffix}": lambda: plain.serialize(x, plain_buf),
        f"torch_fp8_to_{name}": lambda: out.copy_(fp8_src),
        f"scaled_decode{suffix}": lambda: scaled.deserialize(buf, out),
        f"plain_decode{suffix}": lambda: plain.deserialize(plain_buf, out),
        f"memcpy_{name}": lambda: out.copy_(copy_src),
    }


def _ops(fp8: torch.dtype, outliers: int, shape: tuple[int, ...], wide: bool) -> tuple[dict[str, Any], list[Any]]:
    x = synthetic_kv(shape, torch.bfloat16, outlier_channels=outliers)
    sources = [(x, "bf16")]
    if wide:
        sources += [(x.to(torch.float16), "fp16"), (x.to(torch.float32), "fp32")]
    ops: dict[str, Callable[[], Any]] = {}
    for tensor, name in sources:
        ops.update(_casts_and_kernels(fp8, tensor, name))
    # the unscaled decode before this issue: a gather from the 256-entry table of bf16 bits
    plain = Fp8Stage(fp8, False)
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    plain.serialize(x.clamp(-448, 448), codes)
    table_out = np.empty(x.numel(), dtype=np.uint16)
    lut, codes_np = _TABLES[fp8].lut[torch.bfloat16], codes.numpy()
    ops["table_decode"] = lambda: _table_decode(codes_np, table_out, lut)
    # one chunk on a 2-worker processor, split and whole
    stage = Fp8Stage(fp8, True)
    size = stage.estimate_serialized_size(LayoutDesc.of(x))
    split = AsyncSerdeProcessor(stage, stage, max_workers=2)
    whole = AsyncSerdeProcessor(stage, stage, max_workers=2, split_min_bytes=x.numel() * 4 + 2)
    enc = [torch.empty(size, dtype=torch.uint8) for _ in range(2)]
    dec = [torch.empty_like(x) for _ in range(2)]
    ops["split_encode_2w"] = lambda: split.serialize_batch([x], [enc[0]])
    ops["whole_encode_2w"] = lambda: whole.serialize_batch([x], [enc[1]])
    ops["split_decode_2w"] = lambda: split.deserialize_batch([enc[0]], [dec[0]])
    ops["whole_decode_2w"] = lambda: whole.deserialize_batch([enc[1]], [dec[1]])
    return ops, [split, whole]


def run(
    rounds: int, fp8: torch.dtype, outliers: int = 4, shape: tuple[int, ...] = SHAPE, wide: bool = True
) -> dict[str, Any]:
    """Time the kernels and their baselines interleaved for ``rounds`` rounds on this thread (torch set to 1)."""
    torch.set_num_threads(1)
    ops, processors = _ops(fp8, outliers, shape, wide)
    try:
        for op in ops.values():  # warm-up: kernels loaded (or compiled), pages touched, pools started
            op()
        cpu: dict[str, list[float]] = {name: [] for name in ops}
        wall: dict[str, list[float]] = {name: [] for name in ops}
        load_before = os.getloadavg()
        for _ in range(rounds):
            for name, op in ops.items():
                c, w = time.thread_time(), time.perf_counter()
                op()
                cpu[name].append(time.thread_time() - c)
                wall[name].append(time.perf_counter() - w)
    finally:
        for processor in processors:
            processor.close()
    nbytes = int(np.prod(shape)) * 2
    report: dict[str, Any] = {
        "shape": list(shape),
        "fp8": str(fp8).removeprefix("torch."),
        "rounds": rounds,
        "threads": 1,
        "numba": numba.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "ms": {
            name: {
                "cpu": round(float(np.median(cpu[name])) * 1e3, 2),
                "wall": round(float(np.median(wall[name])) * 1e3, 2),
            }
            for name in ops
        },
        "memcpy_gbps_wall": {
            "median": round(nbytes / float(np.median(wall["memcpy_bf16"])) / 1e9, 2),
            "p10": round(nbytes / float(np.percentile(wall["memcpy_bf16"], 90)) / 1e9, 2),
            "p90": round(nbytes / float(np.percentile(wall["memcpy_bf16"], 10)) / 1e9, 2),
        },
        "ratios": {},
    }
    for label, num, den, clocks in RATIOS + (WIDE_RATIOS if wide else ()):
        entry = {}
        for clock in clocks:
            samples = cpu if clock == "cpu" else wall
            per_round = np.array(samples[num]) / np.maximum(np.array(samples[den]), 1e-9)
            entry[clock] = {
                "median": round(float(np.median(per_round)), 3),
                "p10": round(float(np.percentile(per_round, 10)), 3),
                "p90": round(float(np.percentile(per_round, 90)), 3),
                "samples": len(per_round),
            }
        report["ratios"][label] = entry
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--fp8", default="float8_e4m3fn", choices=sorted(FP8_DTYPES))
    parser.add_argument("--outliers", type=int, default=4, help="outlier channels in the synthetic KV")
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)), help="chunk shape, comma-separated")
    parser.add_argument("--no-wide", action="store_true", help="bf16 only (no fp16 / fp32 sources)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(d) for d in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape: expected comma-separated integers, got {args.shape!r}")
    report = run(args.rounds, FP8_DTYPES[args.fp8], args.outliers, shape, wide=not args.no_wide)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(
        f"chunk {report['shape']} bf16, {report['fp8']}, 1 thread, {report['rounds']} interleaved rounds, "
        f"numba {report['numba']}; "
        f"{report['cpu_count']} CPUs, loadavg {report['loadavg_before']} -> {report['loadavg_after']}; "
        f"memcpy {report['memcpy_gbps_wall']['median']} GB/s wall "
        f"(p10-p90 {report['memcpy_gbps_wall']['p10']}-{report['memcpy_gbps_wall']['p90']})"
    )
    for name, ms in report["ms"].items():
        print(f"  {name:20s} cpu {ms['cpu']:8.2f} ms   wall {ms['wall']:8.2f} ms")
    for label, entry in report["ratios"].items():
        w = entry["wall"]
        c = entry.get("cpu")
        cpu_text = f"cpu {c['median']:6.2f}x ({c['p10']:.2f}-{c['p90']:.2f})" if c else f"{'':24s}"
        print(f"  {label:52s} {cpu_text}   wall {w['median']:6.2f}x ({w['p10']:.2f}-{w['p90']:.2f})")


if __name__ == "__main__":
    main()
