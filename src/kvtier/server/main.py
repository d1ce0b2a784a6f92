"""``kvtier server``: build the config, the Store and the Server, serve until SIGTERM / SIGINT, exit 0.

Everything that can be wrong with the configuration is found before the server serves: the config layer checks
fields and ``base_path`` writability, building the Store checks adapter and serde types, binding checks the ports.
Each raises :class:`~kvtier.errors.ConfigError`, which the CLI prints as one line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType
from typing import Any

from kvtier.errors import ConfigError
from kvtier.server.config import config_from_args
from kvtier.server.logs import fields, setup_logging


def build_store(store_kwargs: dict[str, Any]) -> Any:
    """The embedded ``kvtier.Store`` of the server."""
    from kvtier.storage.store import Store

    return Store(**store_kwargs)


def run_server(args: argparse.Namespace) -> int:
    """Entry point of ``kvtier server``; returns the exit status."""
    config = config_from_args(args)
    setup_logging(config.log_level, config.log_format)
    log = logging.getLogger("kvtier.server")
    from kvtier.server.server import Server

    store = build_store(config.store_kwargs())
    try:
        server = Server(config, store, close_store=True)
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
