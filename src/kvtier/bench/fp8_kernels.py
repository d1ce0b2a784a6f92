"""The fp8 kernels on one thread against torch's casts and a memcpy, sampled interleaved in every round.

``python -m kvtier.bench.fp8_kernels [--rounds N] [--fp8 float8_e4m3fn] [--shape 2,32,256,1024] [--json]``

Each round times, one after the other on this thread: torch's plain ``.to(fp8)`` cast, the scaled fp8 encode
(amax, exponents and encode: the whole ``serialize``), the unscaled encode, torch's fp8 -> bf16 cast, the scaled
decode and a memcpy of the decoded bf16 bytes. A ratio is the median over rounds of the per-round ratios, with
its p10-p90, in CPU time of this thread (``time.thread_time``: what a loaded machine does not steal) and in wall
time; the load average and CPU count are printed with them, and the memcpy's own rate shows how disturbed the
round was.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvtier.bench.data import synthetic_kv
from kvtier.serde.fp8 import FP8_DTYPES, Fp8Stage
from kvtier.types import LayoutDesc

SHAPE = (2, 32, 256, 1024)
# (name, numerator, denominator): numerator / denominator > 1 means the kernel is faster
RATIOS = (
    ("scaled encode / torch .to(fp8)", "torch_to_fp8", "scaled_encode"),
    ("unscaled encode / torch .to(fp8)", "torch_to_fp8", "plain_encode"),
    ("scaled decode / torch fp8 .to(bf16)", "torch_fp8_to_bf16", "scaled_decode"),
    ("scaled decode / memcpy of the bf16 bytes", "memcpy_bf16", "scaled_decode"),
)


def _ops(fp8: torch.dtype, outliers: int, shape: tuple[int, ...]) -> dict[str, Callable[[], Any]]:
    x = synthetic_kv(shape, torch.bfloat16, outlier_channels=outliers)
    scaled, plain = Fp8Stage(fp8, True), Fp8Stage(fp8, False)
    buf = torch.empty(scaled.estimate_serialized_size(LayoutDesc.of(x)), dtype=torch.uint8)
    plain_buf = torch.empty(x.numel(), dtype=torch.uint8)
    scaled.serialize(x, buf)
    out, copy_src = torch.empty_like(x), x.clone()
    cast_out = torch.empty(shape, dtype=fp8)
    fp8_src = x.clamp(-448, 448).to(fp8)
    return {
        "torch_to_fp8": lambda: cast_out.copy_(x),
        "scaled_encode": lambda: scaled.serialize(x, buf),
        "plain_encode": lambda: plain.serialize(x, plain_buf),
        "torch_fp8_to_bf16": lambda: out.copy_(fp8_src),
        "scaled_decode": lambda: scaled.deserialize(buf, out),
        "memcpy_bf16": lambda: out.copy_(copy_src),
    }


def run(rounds: int, fp8: torch.dtype, outliers: int = 4, shape: tuple[int, ...] = SHAPE) -> dict[str, Any]:
    """Time the kernels and their baselines interleaved for ``rounds`` rounds on this thread (torch set to 1)."""
    torch.set_num_threads(1)
    ops = _ops(fp8, outliers, shape)
    for op in ops.values():  # warm-up: kernels loaded (or compiled), pages touched
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
    nbytes = int(np.prod(shape)) * 2
    report: dict[str, Any] = {
        "shape": list(shape),
        "fp8": str(fp8).removeprefix("torch."),
        "rounds": rounds,
        "threads": 1,
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
    for label, num, den in RATIOS:
        entry = {}
        for clock, samples in (("cpu", cpu), ("wall", wall)):
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(d) for d in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape: expected comma-separated integers, got {args.shape!r}")
    report = run(args.rounds, FP8_DTYPES[args.fp8], args.outliers, shape)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(
        f"chunk {report['shape']} bf16, {report['fp8']}, 1 thread, {report['rounds']} interleaved rounds; "
        f"{report['cpu_count']} CPUs, loadavg {report['loadavg_before']} -> {report['loadavg_after']}; "
        f"memcpy {report['memcpy_gbps_wall']['median']} GB/s wall "
        f"(p10-p90 {report['memcpy_gbps_wall']['p10']}-{report['memcpy_gbps_wall']['p90']})"
    )
    for name, ms in report["ms"].items():
        print(f"  {name:20s} cpu {ms['cpu']:8.2f} ms   wall {ms['wall']:8.2f} ms")
    for label, entry in report["ratios"].items():
        c, w = entry["cpu"], entry["wall"]
        print(
            f"  {label:42s} cpu {c['median']:6.2f}x ({c['p10']:.2f}-{c['p90']:.2f})"
            f"   wall {w['median']:6.2f}x ({w['p10']:.2f}-{w['p90']:.2f})"
        )


if __name__ == "__main__":
    main()
