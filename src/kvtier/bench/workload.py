"""``kvtier bench workload``: a synthetic multi-tenant trace replayed through a real Store with a real fs L2.

The trace (seeded, every parameter on the command line) mixes the three kinds of prompt a shared cache sees:

* **rag**: one of the tenant's system prompts, then one of its documents, then a fresh question;
* **chat**: a system prompt, then a fresh question;
* **one_shot**: a prompt seen once and never again (a batch job, an eval item).

Tenants (one ``cache_salt`` each: nothing is shared between them), their system prompts and their documents are
drawn from finite Zipf distributions (rank ``k`` with probability proportional to ``1 / k**s``), so a few
documents are hot and most are reused rarely. Each request is replayed the way an engine's connector uses the
Store: ``lookup`` of the prompt's chunk keys, ``retrieve`` of the hit prefix (every chunk checked against the
content its key determines), ``store`` of the rest (as if computed), then ``flush`` (an engine spends far longer
computing than the fs tier spends writing, so no write is dropped for lack of time).

Every combination of L1 size (``--l1-fractions`` of the trace's distinct chunk bytes), eviction policy
(``--policies``) and admission policy of the fs tier (``--admissions``) is one run on a fresh Store and a fresh
temp directory. The report: hit rate per tier (a chunk served from L1, loaded from L2, or missed and computed)
and per tenant, and the L2 bytes written; a PNG plots hit rate and L2 bytes written against the L1 size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kvtier.bench.common import machine_info, parse_shape, progress
from kvtier.errors import MissingDependencyError
from kvtier.storage.admission import ADMISSION_POLICIES
from kvtier.storage.policies import POLICIES
from kvtier.storage.store import Store
from kvtier.types import ObjectKey, parse_dtype

MODEL = "bench/workload"
KINDS = ("rag", "chat", "one_shot")
MiB = 1 << 20
GiB = 1 << 30
VOCAB = 50_000


# -- the trace ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceParams:
    """What shapes the trace; equal parameters give the same trace."""

    seed: int = 0
    requests: int = 1000
    tenants: int = 4
    tenant_skew: float = 0.8  # Zipf exponent of the tenants' shares of the traffic
    system_prompts: int = 3  # per tenant
    system_chunks: int = 4
    documents: int = 200  # per tenant
    doc_chunks: int = 4
    zipf: float = 1.0  # Zipf exponent of the system prompts' and documents' reuse
    rag_share: float = 0.5
    one_shot_share: float = 0.3  # the rest is chat
    one_shot_chunks: int = 8
    query_chunks: int = 1
    chunk_tokens: int = 16

    def check(self) -> None:
        for name in ("requests", "tenants", "system_prompts", "system_chunks", "documents", "doc_chunks"):
            if getattr(self, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')}: expected an integer >= 1")
        for name in ("one_shot_chunks", "query_chunks", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')}: expected an integer >= 1")
        if self.zipf < 0 or self.tenant_skew < 0:
            raise SystemExit("--zipf and --tenant-skew: expected exponents >= 0")
        if not (
            0 <= self.rag_share <= 1 and 0 <= self.one_shot_share <= 1 and self.rag_share + self.one_shot_share <= 1
        ):
            raise SystemExit("--rag-share and --one-shot-share: expected shares in [0, 1] whose sum is at most 1")


@dataclass(frozen=True)
class Request:
    """One prompt of the trace: whose, what kind, which document (``-1``: none), and its token ids."""

    tenant: int
    kind: str
    doc: int
    tokens: np.ndarray = field(repr=False)

    @property
    def salt(self) -> str:
        return tenant_salt(self.tenant)


def tenant_salt(tenant: int) -> str:
    return f"tenant-{tenant}"


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    """P(rank k) for k = 1..n of a finite Zipf distribution with exponent ``s`` (``s = 0``: uniform)."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    out: np.ndarray = weights / weights.sum()
    return out


def zipf_sample(rng: np.random.Generator, n: int, s: float, size: int) -> np.ndarray:
    """``size`` ranks in ``[0, n)`` (0 the most popular) drawn from :func:`zipf_probabilities`."""
    out: np.ndarray = rng.choice(n, size=size, p=zipf_probabilities(n, s))
    return out


def _segment(seed: int, *what: int, chunks: int, chunk_tokens: int) -> np.ndarray:
    """The token ids of one named segment (a system prompt, a document, a question): the same for the same name."""
    rng = np.random.default_rng([seed, *what])
    out: np.ndarray = rng.integers(0, VOCAB, size=chunks * chunk_tokens, dtype=np.int64)
    return out


def generate_trace(params: TraceParams) -> list[Request]:
    """The trace of ``params`` (deterministic: the same parameters give the same requests, token for token)."""
    params.check()
    rng = np.random.default_rng(params.seed)
    n, ct = params.requests, params.chunk_tokens
    tenants = zipf_sample(rng, params.tenants, params.tenant_skew, n)
    kinds = rng.choice(
        len(KINDS), size=n, p=[params.rag_share, 1 - params.rag_share - params.one_shot_share, params.one_shot_share]
    )
    systems = zipf_sample(rng, params.system_prompts, params.zipf, n)
    docs = zipf_sample(rng, params.documents, params.zipf, n)
    cache: dict[tuple[int, ...], np.ndarray] = {}

    def shared(*what: int, chunks: int) -> np.ndarray:
        if what not in cache:
            cache[what] = _segment(params.seed, *what, chunks=chunks, chunk_tokens=ct)
        return cache[what]

    trace = []
    for i in range(n):
        tenant, kind = int(tenants[i]), KINDS[int(kinds[i])]
        # Segment names: (kind code, tenant, index); unique segments are named by the request's index.
        if kind == "one_shot":
            tokens = _segment(params.seed, 3, tenant, i, chunks=params.one_shot_chunks, chunk_tokens=ct)
            trace.append(Request(tenant, kind, -1, tokens))
            continue
        system = shared(1, tenant, int(systems[i]), chunks=params.system_chunks)
        question = _segment(params.seed, 4, tenant, i, chunks=params.query_chunks, chunk_tokens=ct)
        if kind == "rag":
            doc = int(docs[i])
            document = shared(2, tenant, doc, chunks=params.doc_chunks)
            trace.append(Request(tenant, kind, doc, np.concatenate([system, document, question])))
        else:
            trace.append(Request(tenant, kind, -1, np.concatenate([system, question])))
    return trace


def trace_summary(trace: Sequence[Request], chunk_tokens: int) -> dict[str, Any]:
    """Requests per kind and tenant, chunks requested, and distinct chunks (prefix-hash keys, per tenant)."""
    from kvtier.storage.keys import keys_for_tokens

    distinct: set[ObjectKey] = set()
    chunks = 0
    for r in trace:
        ks = keys_for_tokens(MODEL, r.tokens, chunk_tokens, r.salt)
        chunks += len(ks)
        distinct.update(ks)
    return {
        "requests": len(trace),
        "by_kind": dict(sorted(Counter(r.kind for r in trace).items())),
        "by_tenant": {tenant_salt(t): c for t, c in sorted(Counter(r.tenant for r in trace).items())},
        "chunks_requested": chunks,
        "distinct_chunks": len(distinct),
    }


# -- the replay -----------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """Chunks requested and where each was served from."""

    chunks: int = 0
    l1_hits: int = 0
    l2_hits: int = 0

    @property
    def misses(self) -> int:
        return self.chunks - self.l1_hits - self.l2_hits

    def rates(self) -> dict[str, float]:
        c = max(1, self.chunks)
        return {
            "hit_rate": (self.l1_hits + self.l2_hits) / c,
            "l1_hit_rate": self.l1_hits / c,
            "l2_hit_rate": self.l2_hits / c,
        }

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "misses": self.misses, **self.rates()}


@dataclass
class RunResult:
    """One replay: its configuration, its tallies (all and per tenant) and what the L2 tier was given."""

    policy: str
    admission: str
    l1_fraction: float
    l1_bytes: int
    l2_capacity_bytes: int | None
    total: Tally
    tenants: dict[str, Tally]
    l2_chunks_written: int
    l2_bytes_written: int
    l2_writes_dropped: int
    admission_skipped: int
    admission_admitted: int
    mismatches: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        doc = {k: v for k, v in asdict(self).items() if k not in ("total", "tenants")}
        return {**doc, **self.total.to_json(), "tenants": {t: v.to_json() for t, v in self.tenants.items()}}


class Contents:
    """The tensor each key stands for: one of a few fixed tensors, picked by the key's hash (so a chunk read back
    can be checked byte for byte without keeping a copy per key)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, variants: int = 16) -> None:
        gen = torch.Generator().manual_seed(1234)
        self._tensors = [torch.randn(shape, generator=gen).to(dtype) for _ in range(variants)]

    def __call__(self, key: ObjectKey) -> torch.Tensor:
        return self._tensors[int(key.chunk_hash[:8], 16) % len(self._tensors)]


def replay(
    trace: Sequence[Request],
    *,
    chunk_tokens: int,
    contents: Contents,
    l1_bytes: int,
    policy: str,
    admission: str,
    base_path: Path,
    l2_bytes: int | None = None,
    l1_fraction: float = 0.0,
    advance: Callable[[], None] = lambda: None,
) -> RunResult:
    """Replay ``trace`` through a fresh Store (L1 of ``l1_bytes`` under ``policy``) with one fs tier under
    ``base_path`` admitting by ``admission`` (bounded to ``l2_bytes`` under the same policy, or unbounded)."""
    tier: dict[str, Any] = {"type": "fs", "base_path": str(base_path), "durability": "none", "admission": admission}
    if l2_bytes is not None:
        tier.update(max_capacity_gb=l2_bytes / GiB, eviction_policy=policy)
    total = Tally()
    tenants: dict[str, Tally] = {}
    mismatches = 0
    start = time.perf_counter()
    with Store(l1_bytes / GiB, policy, [tier], chunk_size=chunk_tokens) as store:
        for r in trace:
            keys = store.keys_for_tokens(MODEL, r.tokens, r.salt)
            l1_before = store.stats()["l1"]["hits"]
            served = 0
            n = store.lookup(keys)
            if n:
                got = store.retrieve(keys[:n])
                for key, tensor in zip(keys, got, strict=False):
                    if tensor is None:
                        break  # the prefix ends at the first chunk that could not be served
                    served += 1
                    mismatches += not torch.equal(tensor, contents(key))
            l1_hits = min(served, store.stats()["l1"]["hits"] - l1_before)
            if served < len(keys):
                store.store(keys[served:], [contents(k) for k in keys[served:]])
            store.flush()
            for tally in (total, tenants.setdefault(r.salt, Tally())):
                tally.chunks += len(keys)
                tally.l1_hits += l1_hits
                tally.l2_hits += served - l1_hits
            advance()
        store.flush()
        stats = store.stats()
    tier_stats = stats["l2"][0]
    chunk_bytes = contents(ObjectKey(MODEL, "0")).numel() * contents(ObjectKey(MODEL, "0")).element_size()
    return RunResult(
        policy=policy,
        admission=admission,
        l1_fraction=l1_fraction,
        l1_bytes=l1_bytes,
        l2_capacity_bytes=l2_bytes,
        total=total,
        tenants=dict(sorted(tenants.items())),
        l2_chunks_written=tier_stats["stored"],
        l2_bytes_written=tier_stats["stored"] * chunk_bytes,
        l2_writes_dropped=stats["l2_writes_dropped"],
        admission_skipped=tier_stats["admission_skipped"],
        admission_admitted=tier_stats["admission_admitted"],
        mismatches=mismatches,
        seconds=time.perf_counter() - start,
    )


# -- the command ----------------------------------------------------------------------------------------------
def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}") from exc
    if not values or any(not v > 0 for v in values):
        raise SystemExit(f"{flag}: expected numbers > 0, got {text!r}")
    return values


def _names(text: str, flag: str, known: Sequence[str]) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in known]
    if not names or bad:
        raise SystemExit(f"{flag}: expected names from {list(known)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TraceParams()
    g = parser.add_argument_group("trace")
    g.add_argument("--seed", type=int, default=d.seed, help=f"trace seed (default: {d.seed})")
    g.add_argument("--requests", type=int, default=d.requests, help=f"requests (default: {d.requests})")
    g.add_argument(
        "--tenants", type=int, default=d.tenants, help=f"tenants, one cache_salt each (default: {d.tenants})"
    )
    g.add_argument(
        "--tenant-skew",
        type=float,
        default=d.tenant_skew,
        help=f"Zipf exponent of tenant traffic (default: {d.tenant_skew})",
    )
    g.add_argument(
        "--system-prompts",
        type=int,
        default=d.system_prompts,
        help=f"system prompts per tenant (default: {d.system_prompts})",
    )
    g.add_argument(
        "--system-chunks",
        type=int,
        default=d.system_chunks,
        help=f"chunks per system prompt (default: {d.system_chunks})",
    )
    g.add_argument(
        "--documents", type=int, default=d.documents, help=f"RAG documents per tenant (default: {d.documents})"
    )
    g.add_argument(
        "--doc-chunks", type=int, default=d.doc_chunks, help=f"chunks per document (default: {d.doc_chunks})"
    )
    g.add_argument(
        "--zipf", type=float, default=d.zipf, help=f"Zipf exponent of prompt and document reuse (default: {d.zipf})"
    )
    g.add_argument(
        "--rag-share", type=float, default=d.rag_share, help=f"share of RAG requests (default: {d.rag_share})"
    )
    g.add_argument(
        "--one-shot-share",
        type=float,
        default=d.one_shot_share,
        help=f"share of one-shot prompts (default: {d.one_shot_share}; the rest is chat)",
    )
    g.add_argument(
        "--one-shot-chunks",
        type=int,
        default=d.one_shot_chunks,
        help=f"chunks per one-shot prompt (default: {d.one_shot_chunks})",
    )
    g.add_argument(
        "--query-chunks", type=int, default=d.query_chunks, help=f"chunks per question (default: {d.query_chunks})"
    )
    s = parser.add_argument_group("store")
    s.add_argument(
        "--shape",
        default="2,2,16,64",
        help="KV chunk shape; its third axis is the chunk's tokens (default: 2,2,16,64 = 8 KiB bf16)",
    )
    s.add_argument("--dtype", default="bfloat16", help="chunk dtype (default: bfloat16)")
    s.add_argument(
        "--l1-fractions",
        default="0.05,0.1,0.2,0.4",
        help="L1 sizes as fractions of the trace's distinct chunk bytes (default: 0.05,0.1,0.2,0.4)",
    )
    s.add_argument(
        "--l2-fraction",
        type=float,
        default=0.5,
        help="fs tier capacity as a fraction of the distinct chunk bytes, evicting under the run's policy; 0: "
        "unbounded (default: 0.5)",
    )
    s.add_argument("--policies", default="LRU,LFU,S3-FIFO", help="L1 eviction policies (default: LRU,LFU,S3-FIFO)")
    s.add_argument(
        "--admissions",
        default=",".join(ADMISSION_POLICIES),
        help="admission policies of the fs tier (default: always,second_hit)",
    )
    s.add_argument("--dir", default=None, help="directory for the fs tiers (default: the temp dir)")
    o = parser.add_argument_group("output")
    o.add_argument(
        "--plot", default="kvtier-workload.png", help="PNG of hit rate against L1 size (default: kvtier-workload.png)"
    )
    o.add_argument("--no-plot", action="store_true", help="no PNG (matplotlib not needed)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    o.add_argument("--json", action="store_true", help="print one JSON document instead of tables")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError(
            "the plot of `kvtier bench workload` (or pass --no-plot)", "matplotlib", "bench"
        ) from exc
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


@dataclass
class WorkloadReport:
    """What ``kvtier bench workload`` prints: the parameters, the trace's summary and one result per run."""

    params: dict[str, Any]
    trace: dict[str, Any]
    runs: list[RunResult]
    headline_fraction: float
    plot: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "kvtier bench workload",
            "machine": machine_info(),
            "params": self.params,
            "trace": self.trace,
            "headline_l1_fraction": self.headline_fraction,
            "runs": [r.to_json() for r in self.runs],
            "plot": self.plot,
        }

    def print(self, as_json: bool) -> None:
        if as_json:
            print(json.dumps(self.to_json(), indent=2))
            return
        console = Console(width=max(Console().width, 140))
        console.print(f"trace: {json.dumps(self.trace)}")
        table = Table(title="hit rate per tier and L2 bytes written, per L1 size, eviction and admission policy")
        for col in (
            "L1 MiB",
            "L1 share",
            "eviction",
            "admission",
            "L1 hit",
            "L2 hit",
            "hit",
            "L2 MiB written",
            "L2 chunks",
            "dropped",
            "mismatches",
            "s",
        ):
            table.add_column(col, justify="left" if col in ("eviction", "admission") else "right")
        for r in self.runs:
            rates = r.total.rates()
            table.add_row(
                f"{r.l1_bytes / MiB:.1f}",
                f"{r.l1_fraction:g}",
                r.policy,
                r.admission,
                f"{rates['l1_hit_rate']:.1%}",
                f"{rates['l2_hit_rate']:.1%}",
                f"{rates['hit_rate']:.1%}",
                f"{r.l2_bytes_written / MiB:.1f}",
                str(r.l2_chunks_written),
                str(r.l2_writes_dropped),
                str(r.mismatches),
                f"{r.seconds:.1f}",
            )
        console.print(table)
        head = [r for r in self.runs if r.l1_fraction == self.headline_fraction]
        tenants = sorted({t for r in head for t in r.tenants})
        per = Table(title=f"hit rate per tenant (L1 / L2), L1 = {self.headline_fraction:g} of the distinct bytes")
        per.add_column("eviction")
        per.add_column("admission")
        for t in tenants:
            per.add_column(t, justify="right")
        for r in head:
            cells = []
            for t in tenants:
                rates = r.tenants[t].rates() if t in r.tenants else {"l1_hit_rate": 0.0, "l2_hit_rate": 0.0}
                cells.append(f"{rates['l1_hit_rate']:.0%} / {rates['l2_hit_rate']:.0%}")
            per.add_row(r.policy, r.admission, *cells)
        console.print(per)
        if self.plot:
            console.print(f"plot: {self.plot}")


def plot(runs: Sequence[RunResult], path: str, title: str) -> None:
    """Against the L1 size: the L1 hit rate, the hit rate of L1 and L2 together, and the L2 MiB written; a colour
    per eviction policy, a line style per admission policy."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=72)
    colours: dict[str, Any] = {}
    series: dict[tuple[str, str], list[RunResult]] = {}
    for r in runs:
        series.setdefault((r.policy, r.admission), []).append(r)
    panels: list[tuple[str, Callable[[RunResult], float]]] = [
        ("L1 hit rate (%)", lambda r: 100 * r.total.rates()["l1_hit_rate"]),
        ("hit rate, L1 + L2 (%)", lambda r: 100 * r.total.rates()["hit_rate"]),
        ("L2 MiB written", lambda r: r.l2_bytes_written / MiB),
    ]
    for (policy, admission), unsorted in series.items():
        rs = sorted(unsorted, key=lambda r: r.l1_bytes)
        x = [r.l1_bytes / MiB for r in rs]
        style = "-" if admission == "always" else "--"
        for ax, (_, value) in zip(axes, panels, strict=True):
            (line,) = ax.plot(
                x, [value(r) for r in rs], style, marker="o", color=colours.get(policy), label=f"{policy}, {admission}"
            )
            colours.setdefault(policy, line.get_color())
    for ax, (label, _) in zip(axes, panels, strict=True):
        ax.set(xlabel="L1 size (MiB)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def run(args: argparse.Namespace) -> WorkloadReport:
    shape = parse_shape(args.shape)
    if len(shape) < 3:
        raise SystemExit(f"--shape: expected at least 3 axes (the third is the chunk's tokens), got {args.shape!r}")
    params = TraceParams(
        seed=args.seed,
        requests=args.requests,
        tenants=args.tenants,
        tenant_skew=args.tenant_skew,
        system_prompts=args.system_prompts,
        system_chunks=args.system_chunks,
        documents=args.documents,
        doc_chunks=args.doc_chunks,
        zipf=args.zipf,
        rag_share=args.rag_share,
        one_shot_share=args.one_shot_share,
        one_shot_chunks=args.one_shot_chunks,
        query_chunks=args.query_chunks,
        chunk_tokens=shape[2],
    )
    fractions = _floats(args.l1_fractions, "--l1-fractions")
    if not args.l2_fraction >= 0:
        raise SystemExit(f"--l2-fraction: expected a number >= 0, got {args.l2_fraction}")
    policies = _names(args.policies.upper(), "--policies", list(POLICIES))
    admissions = _names(args.admissions, "--admissions", ADMISSION_POLICIES)
    if not args.no_plot:
        _pyplot()  # a missing matplotlib is said before minutes of replay, not after
    trace = generate_trace(params)
    summary = trace_summary(trace, params.chunk_tokens)
    contents = Contents(shape, parse_dtype(args.dtype))
    chunk_bytes = contents(ObjectKey(MODEL, "0")).numel() * contents(ObjectKey(MODEL, "0")).element_size()
    summary["chunk_bytes"] = chunk_bytes
    summary["distinct_bytes"] = summary["distinct_chunks"] * chunk_bytes
    l2_bytes = max(chunk_bytes, int(args.l2_fraction * summary["distinct_bytes"])) if args.l2_fraction else None
    combos = [(f, p, a) for f in fractions for p in policies for a in admissions]
    runs: list[RunResult] = []
    with progress(len(combos) * len(trace), "replaying", enabled=not args.no_progress) as advance:
        for fraction, policy, admission in combos:
            base = Path(tempfile.mkdtemp(prefix="kvtier-workload-", dir=args.dir))
            try:
                l1_bytes = max(chunk_bytes, int(fraction * summary["distinct_bytes"]))
                runs.append(
                    replay(
                        trace,
                        chunk_tokens=params.chunk_tokens,
                        contents=contents,
                        l1_bytes=l1_bytes,
                        l2_bytes=l2_bytes,
                        policy=policy,
                        admission=admission,
                        base_path=base,
                        l1_fraction=fraction,
                        advance=advance,
                    )
                )
            finally:
                shutil.rmtree(base, ignore_errors=True)
    report = WorkloadReport(
        params={
            **asdict(params),
            "shape": list(shape),
            "dtype": args.dtype,
            "l1_fractions": fractions,
            "l2_fraction": args.l2_fraction,
            "policies": policies,
            "admissions": admissions,
        },
        trace=summary,
        runs=runs,
        headline_fraction=fractions[len(fractions) // 2],
    )
    if not args.no_plot:
        title = (
            f"kvtier bench workload: {params.requests} requests, {params.tenants} tenants, zipf {params.zipf}, "
            f"one-shot {params.one_shot_share:g}, seed {params.seed}; fs L2 "
            + (f"{args.l2_fraction:g} of the distinct bytes" if args.l2_fraction else "unbounded")
        )
        plot(runs, args.plot, title)
        report.plot = args.plot
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvtier.bench.workload")
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args).print(args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
