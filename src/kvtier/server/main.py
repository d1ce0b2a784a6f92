"""``kvtier server``: build the config, the Store and the Server, serve until SIGTERM / SIGINT, exit 0.

Everything that can be wrong with the configuration is found before the server serves: the config layer checks
fields and ``base_path`` writability, building the Store checks adapter and serde types, binding checks the ports.
Each raises :class:`~kvtier.errors.ConfigError`, which the CLI prints as one line and exits 2.

The config is read and checked before torch is imported (a wrong flag answers at once). Secrets of the config
are scrubbed from every error message, log line, ``/stats`` and ``/metrics`` answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
from types import FrameType
from typing import Any

from kvtier.config import scrub, secret_values
from kvtier.errors import ConfigError, KVTierError
from kvtier.server.config import config_from_args, read_config_file
from kvtier.server.logs import fields, setup_logging


def build_store(store_kwargs: dict[str, Any]) -> Any:
    """The embedded ``kvtier.Store`` of the server."""
    from kvtier.storage.store import Store

    return Store(**store_kwargs)


def _given_secrets(args: argparse.Namespace) -> list[str]:
    """Secrets in what the operator gave, before any check (an error may quote a value that fails one)."""
    given: dict[str, Any] = {"admin_token": getattr(args, "admin_token", None)}
    for i, text in enumerate(getattr(args, "l2_adapter", None) or []):
        try:
            given[f"l2_adapter{i}"] = json.loads(text)
        except ValueError:
            given[f"l2_adapter{i}"] = text  # invalid JSON: URL passwords in it are still found
    if getattr(args, "config", None):
        with contextlib.suppress(ConfigError):  # reported by config_from_args
            given["file"] = read_config_file(args.config)
    return secret_values(given, os.environ)


def run_server(args: argparse.Namespace) -> int:
    """Entry point of ``kvtier server``; returns the exit status. Errors carry no secret of the config."""
    secrets = _given_secrets(args)
    try:
        return _run(args, secrets)
    except KVTierError as exc:
        exc.args = (scrub(str(exc), secrets),)
        raise


def _run(args: argparse.Namespace, secrets: list[str]) -> int:
    config = config_from_args(args)
    secrets = sorted({*secrets, *config.secrets()}, key=len, reverse=True)
    setup_logging(config.log_level, config.log_format, secrets)
    log = logging.getLogger("kvtier.server")
    from kvtier.server.server import Server

    store = build_store(config.store_kwargs())
    try:
        server = Server(config, store, close_store=True, secrets=secrets)
    except ConfigError:
        store.close()
        raise

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal received: draining", extra=fields(signal=signal.Signals(signum).name))
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.serve_forever()
    return 0
