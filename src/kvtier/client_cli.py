"""The ``kvtier`` client commands for a running server: ``ping``, ``describe``, ``clear``, ``purge``, ``lookup``.

Each talks to the server at ``--address`` (default ``tcp://127.0.0.1:5555``, as :class:`kvtier.Client`), prints a
readable table, or one JSON document with ``--json``, and exits non-zero on failure: ``3`` when no server answers,
``2`` when the server refuses the request, ``1`` when an invalidation left an L2 tier not fully purged.

A salt (``--salt``, ``--salt-file``) is a tenant's secret: it is sent to the server and never printed; output names
its digest. Prefer ``--salt-file`` (or ``-`` for stdin): a command line is visible to every user of the host.

``--tokens-file`` of ``lookup``: token ids as a JSON list (``[1, 2, 3]``) or separated by whitespace and/or commas;
``-`` reads them from stdin.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


class CommandError(Exception):
    """A failure the command reports in one line and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        metavar="tcp://HOST:PORT",
        help=f"the kvtier server's request address (default: {DEFAULT_ADDRESS}, as kvtier.Client)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="seconds to wait for the server (default: 5)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")


def add_salt(parser: argparse.ArgumentParser, help_text: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--salt", metavar="S", help=help_text + " (a secret: never printed; prefer --salt-file)")
    group.add_argument("--salt-file", metavar="FILE", help="read the salt from the first line of FILE ('-': stdin)")


def run(command: str, args: argparse.Namespace) -> int:
    """Run a client command; returns the exit status."""
    handlers: dict[str, Callable[[argparse.Namespace], tuple[Any, str]]] = {
        "ping": _ping,
        "describe": _describe,
        "clear": _clear,
        "purge": _purge,
        "lookup": _lookup,
    }
    try:
        doc, text = handlers[command](args)
    except CommandError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc), "address": args.address}))
        print(f"kvtier {command}: error: {exc}", file=sys.stderr)
        return exc.status
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(text)
    if isinstance(doc, dict) and doc.get("errors"):
        print(f"kvtier {command}: not every tier was fully invalidated: {doc['errors']}", file=sys.stderr)
        return 1
    return 0


# -- commands -------------------------------------------------------------------------------------------------
def _ping(args: argparse.Namespace) -> tuple[Any, str]:
    start = time.perf_counter()
    with _connect(args) as client:
        connected = time.perf_counter()
        health = _call(args, client.health)
        rtt = time.perf_counter() - connected
    doc = {
        "address": args.address,
        "status": health.get("status"),
        "version": health.get("version"),
        "pid": health.get("pid"),
        "uptime_s": health.get("uptime_s"),
        "connect_ms": round((connected - start) * 1000, 2),
        "rtt_ms": round(rtt * 1000, 3),
    }
    text = (
        f"kvtier server at {args.address}: {doc['status']} (version {doc['version']}, pid {doc['pid']}, "
        f"up {_duration(doc['uptime_s'])}), round trip {doc['rtt_ms']:.2f} ms"
    )
    return doc, text


def _describe(args: argparse.Namespace) -> tuple[Any, str]:
    with _connect(args) as client:
        doc = _call(args, client.describe)
    return doc, describe_text(doc, args.address)


def describe_text(doc: dict[str, Any], address: str) -> str:
    """The tables ``kvtier describe`` prints for a describe document."""
    server = doc.get("server", {})
    lines = [
        f"kvtier server at {address}: version {server.get('version')}, pid {server.get('pid')}, "
        f"up {_duration(server.get('uptime_s'))}, chunk size {server.get('chunk_size')} tokens",
        "",
        table(
            ["TIER", "KIND", "CAPACITY", "USED", "USE %", "OBJECTS", "HITS", "HIT RATE"],
            [
                [
                    t.get("tier"),
                    t.get("kind"),
                    human_bytes(t.get("capacity_bytes")),
                    human_bytes(t.get("used_bytes")),
                    _percent(t.get("used_bytes"), t.get("capacity_bytes")),
                    _or_dash(t.get("objects")),
                    _or_dash(t.get("hits")),
                    _rate(t.get("hit_rate")),
                ]
                for t in doc.get("tiers", [])
            ],
        ),
        "",
        f"hit rate (any tier, per chunk looked up): {_rate(doc.get('hit_rate'))}",
    ]
    for title, rows, name in (
        ("top models by bytes (L1)", doc.get("top_models", []), "model_name"),
        ("top salts by bytes (L1, by digest)", doc.get("top_salts", []), "salt_digest"),
    ):
        lines.append("")
        if rows:
            lines.append(title)
            lines.append(
                table(
                    [name.upper().replace("_", " "), "BYTES", "OBJECTS"],
                    [
                        [r.get(name) or "(unsalted)", human_bytes(r.get("bytes")), _or_dash(r.get("objects"))]
                        for r in rows
                    ],
                )
            )
        else:
            lines.append(f"{title}: not reported by this server")
    running = doc.get("invalidations_running") or []
    if running:
        lines += ["", f"invalidations running: {len(running)}"]
        lines.append(
            table(
                ["JOB", "OP", "STATE", "L2 DELETED"],
                [[r.get("job"), r.get("op"), r.get("state"), r.get("l2_deleted")] for r in running],
            )
        )
    return "\n".join(lines)


def _clear(args: argparse.Namespace) -> tuple[Any, str]:
    l1, l2 = (args.l1, args.l2) if (args.l1 or args.l2) else (True, False)
    with _connect(args) as client:
        doc = _call(args, lambda: client.clear(l1=l1, l2=l2, progress=_progress_printer(args)))
    return doc, _invalidation_text("cleared", doc, l1=l1)


def _purge(args: argparse.Namespace) -> tuple[Any, str]:
    salt = read_salt(args)
    if args.model is None and salt is None:
        raise CommandError("give --model, --salt / --salt-file, or both", 2)
    with _connect(args) as client:
        doc = _call(args, lambda: client.purge(args.model, salt, progress=_progress_printer(args)))
    what = f"model {args.model}" if args.model else "every model"
    if salt is not None:
        what += f", salt digest {doc.get('salt_digest') or '(unsalted)'}"
    return doc, _invalidation_text(f"purged {what}", doc)


def _lookup(args: argparse.Namespace) -> tuple[Any, str]:
    tokens = read_tokens(args.tokens_file)
    salt = read_salt(args) or ""
    with _connect(args) as client:
        cached = _call(args, lambda: client.lookup_tokens(args.model, tokens, cache_salt=salt, kv_rank=args.kv_rank))
        chunk = client.chunk_size
    doc = {
        "model_name": args.model,
        "tokens": len(tokens),
        "cached_tokens": cached,
        "chunk_size": chunk,
        "cached_chunks": cached // chunk if chunk else 0,
        "full_chunks": len(tokens) // chunk if chunk else 0,
    }
    text = table(
        ["MODEL", "TOKENS", "CACHED TOKENS", "CACHED CHUNKS", "CHUNK SIZE"],
        [[args.model, len(tokens), cached, f"{doc['cached_chunks']} of {doc['full_chunks']}", chunk]],
    )
    return doc, text


# -- helpers --------------------------------------------------------------------------------------------------
def _connect(args: argparse.Namespace) -> Any:
    from kvtier.client import Client
    from kvtier.errors import ConfigError
    from kvtier.server.protocol import ServerUnavailableError

    if not args.timeout > 0:
        raise CommandError("--timeout: expected seconds > 0", 2)
    try:
        return Client(args.address, timeout_s=max(args.timeout, 1.0), connect_timeout_s=args.timeout, shm=False)
    except ConfigError as exc:
        raise CommandError(f"{exc} (--address)", 2) from None
    except ServerUnavailableError:
        raise CommandError(_unreachable(args), 3) from None


def _unreachable(args: argparse.Namespace) -> str:
    return (
        f"no kvtier server answered at {args.address} within {args.timeout:g} s: is `kvtier server` running, and "
        f"is --address right (the server's --host/--port; default {DEFAULT_ADDRESS})?"
    )


def _call(args: argparse.Namespace, fn: Callable[[], Any]) -> Any:
    from kvtier.errors import KVTierError
    from kvtier.server.protocol import ServerUnavailableError

    try:
        return fn()
    except ServerUnavailableError:
        raise CommandError(_unreachable(args), 3) from None
    except (KVTierError, ValueError) as exc:
        raise CommandError(f"server at {args.address}: {exc}", 2) from None


def _progress_printer(args: argparse.Namespace) -> Callable[[dict[str, Any]], None] | None:
    if args.json or not sys.stderr.isatty():
        return None

    def show(doc: dict[str, Any]) -> None:
        print(
            f"\r  {doc.get('state', '?')}: L1 {doc.get('l1', 0)} removed, L2 {doc.get('l2_deleted', 0)} deleted "
            f"({_duration(doc.get('elapsed_s'))})   ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    return show


def _invalidation_text(title: str, doc: dict[str, Any], l1: bool = True) -> str:
    rows: list[list[Any]] = []
    if l1:
        rows.append(["L1", doc.get("l1", 0), ""])
    for i, t in enumerate(doc.get("l2", [])):
        rows.append([f"L2[{i}] {t.get('tier')}", t.get("deleted", 0), t.get("error", "")])
    lines = [f"{title} in {_duration(doc.get('elapsed_s'))}"]
    if rows:
        lines.append(table(["TIER", "REMOVED", "ERROR"], rows))
    return "\n".join(lines)


def read_salt(args: argparse.Namespace) -> str | None:
    """The salt of ``--salt`` or ``--salt-file`` (first line, newline stripped), or None."""
    if getattr(args, "salt", None) is not None:
        return str(args.salt)
    path = getattr(args, "salt_file", None)
    if path is None:
        return None
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    except OSError as exc:
        raise CommandError(f"--salt-file: cannot read {path}: {exc.strerror}", 2) from None
    return text.splitlines()[0] if text else ""


def read_tokens(path: str) -> list[int]:
    """Token ids from a file (see the module docstring for the format)."""
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    except OSError as exc:
        raise CommandError(f"--tokens-file: cannot read {path}: {exc.strerror}", 2) from None
    stripped = text.strip()
    try:
        if stripped.startswith("["):
            values = json.loads(stripped)
            if not isinstance(values, list):
                raise ValueError("not a list")
        else:
            values = stripped.replace(",", " ").split()
        tokens = [int(v) for v in values if not isinstance(v, bool)]
        if len(tokens) != len(values) or any(t < 0 for t in tokens):
            raise ValueError("not all values are non-negative integers")
    except (ValueError, TypeError) as exc:
        raise CommandError(
            f"--tokens-file {path}: expected token ids as a JSON list or separated by whitespace/commas ({exc})", 2
        ) from None
    return tokens


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: columns padded to their widest cell, numbers right-aligned."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_numberish(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    out = []
    for r in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def _numberish(text: str) -> bool:
    t = text.replace(".", "").replace("%", "").replace(",", "").split(" ")[0]
    return t.isdigit() or text in ("-", "")


def human_bytes(n: Any) -> str:
    if n is None:
        return "unbounded"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def _percent(used: Any, capacity: Any) -> str:
    if not used or not capacity:
        return "-" if not capacity else "0.0%"
    return f"{100 * used / capacity:.1f}%"


def _rate(rate: Any) -> str:
    return "-" if rate is None else f"{100 * float(rate):.1f}%"


def _or_dash(value: Any) -> Any:
    return "-" if value is None else value


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "?"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
