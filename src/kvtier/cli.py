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

    from kvtier.integrations import demo

    d = sub.add_parser(
        "demo",
        help="SmolLM2 reuses a long prompt's KV: recompute vs L1 hit vs L2 hit, TTFT and output compared",
        description="Embedded Store with an fs L2 adapter under the cache dir; no server, no flags needed.",
    )
    demo.add_arguments(d)
    d.set_defaults(func=lambda a: demo.print_report(demo.run(a), a.json))
    return parser


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
