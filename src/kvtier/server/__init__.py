"""``kvtier server``: one embedded Store shared by several engine processes over ZeroMQ.

* :mod:`.config`: flags and config file -> :class:`ServerConfig`, checked at start-up.
* :mod:`.protocol`: the versioned msgspec messages; :mod:`.shm`: the same-host shared-memory data path.
* :mod:`.server`: the ROUTER + worker-thread request loop; :mod:`.admin`: ``/health /stats /metrics /clear``;
  :mod:`.metrics`: Prometheus metrics; :mod:`.logs`: structured logs.
* :func:`main.run_server` ties them together for the CLI; the client is :class:`kvtier.Client`.
"""

from kvtier.server.config import ServerConfig
from kvtier.server.protocol import PROTOCOL_VERSION, ProtocolError, ServerError, ServerUnavailableError

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "ServerConfig", "ServerError", "ServerUnavailableError"]
