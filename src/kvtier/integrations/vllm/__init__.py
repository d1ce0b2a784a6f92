"""kvtier as vLLM's KV connector: ``"kv_connector": "KVTierConnector", "kv_connector_module_path":
"kvtier.integrations.vllm"``. See :mod:`kvtier.integrations.vllm.connector`.

Importing this package does not import vLLM; ``KVTierConnector`` does (on first access).
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVTierConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVTierConnector":
        from kvtier.integrations.vllm.connector import KVTierConnector

        return KVTierConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
