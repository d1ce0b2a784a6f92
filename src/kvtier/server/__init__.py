"""``kvtier server``: one embedded Store shared by several engine processes over ZeroMQ.

* :mod:`.config`: flags and config file -> :class:`ServerConfig`, checked at start-up.
* :mod:`.protocol`: the versioned msgspec messages; :mod:`.shm`: the same-host shared-memory data path.
* :mod:`.server`: the ROUTER + worker-thread request loop; :mod:`.admin`: ``/health /stats /metrics /clear``;
  :mod:`.metrics`: Prometheus metrics; :mod:`.logs`: structured logs.
* :func:`main.run_server` ties them together for the CLI; the client is :class:`kvtier.Client`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.server.config import ServerConfig
    from kvtier.server.protocol import PROTOCOL_VERSION, ProtocolError, ServerError, ServerUnavailableError

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "ServerConfig", "ServerError", "ServerUnavailableError"]

# Loaded on first use: the protocol imports torch, and ``kvtier server`` reads and checks its config (through
# ``kvtier.server.config``) before anything imports torch.
_LAZY = {
    "ServerConfig": "kvtier.server.config",
    "PROTOCOL_VERSION": "kvtier.server.protocol",
    "ProtocolError": "kvtier.server.protocol",
    "ServerError": "kvtier.server.protocol",
    "ServerUnavailableError": "kvtier.server.protocol",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier.server' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
