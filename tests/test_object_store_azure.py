"""The object-store adapter on Azure Blob Storage (``az://``) through the same code, against Azurite (the
emulator from npm: ``npm install -g azurite``, or ``KVTIER_AZURITE_BLOB=/path/to/azurite-blob``) on a free
loopback port, telemetry off. Skipped with the reason when Azurite is not installed.

No GCS emulator here: obstore's GCS client asks the cloud metadata server (169.254.169.254) for a token unless
it is given a real service-account key, and these tests reach nothing but loopback.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import http.client
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier.bench.local_s3 import free_port
from kvtier.errors import L2Error
from kvtier.l2.adapters import create_backend
from kvtier.testing import L2AdapterTests

pytest.importorskip("obstore", reason="the object_store extra is not installed (pip install 'kvtier[object_store]')")

# Azurite's well-known development account (public, documented by Microsoft; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINER = "kvtier-test"


def _azurite() -> str | None:
    return os.environ.get("KVTIER_AZURITE_BLOB") or shutil.which("azurite-blob")


pytestmark = pytest.mark.skipif(
    _azurite() is None,
    reason="Azurite is not installed (npm install -g azurite, or set KVTIER_AZURITE_BLOB to its azurite-blob)",
)


class Azurite:
    def __init__(self, binary: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = ["--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck", "--loose"]
        self._proc = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("azurite did not start") from None
                time.sleep(0.1)

    def create_container(self, name: str) -> None:
        """``PUT ?restype=container`` signed with the account's SharedKey (kvtier itself never creates one)."""
        headers = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
        canonical = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
        to_sign = "PUT\n" + "\n" * 11 + canonical + f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        digest = hmac.new(base64.b64decode(ACCOUNT_KEY), to_sign.encode(), hashlib.sha256).digest()
        headers["Authorization"] = f"SharedKey {ACCOUNT}:{base64.b64encode(digest).decode()}"
        headers["Content-Length"] = "0"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("PUT", f"/{ACCOUNT}/{name}?restype=container", headers=headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 201, f"azurite: creating container {name!r} answered {resp.status}"
        finally:
            conn.close()

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait(10)


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    binary = _azurite()
    assert binary is not None
    server = Azurite(binary)
    server.create_container(CONTAINER)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _emulator_url(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite.url)  # where obstore's use_emulator looks


def az(prefix: str, container: str = CONTAINER, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object_store",
        "url": f"az://{container}/{prefix}",
        "options": {"account_name": ACCOUNT, "use_emulator": True},
        "timeout_s": 5,
        "max_retries": 1,
        "retry_timeout_s": 2,
        **extra,
    }


class _WriteOnceAz(L2AdapterTests):
    def test_overwrite_and_delete(self, tmp_path: Path) -> None:
        with self.make_adapter(tmp_path) as adapter:
            adapter.store_records(["k"], [[b"first-version"]])
            adapter.store_records(["k"], [[b"second"]])  # write-once: the first record stays
            buf = bytearray(13)
            assert adapter.load_records(["k"], [[buf]]) == [13] and bytes(buf) == b"first-version"
            adapter.delete(["k", "absent-1", "absent-2"])  # Azure's bulk delete reports absent blobs
            assert adapter.contains(["k"]) == [False] and adapter.used_bytes == 0


class TestAzureOwnedPrefix(_WriteOnceAz):
    def adapter_config(self, tmp_path: Path, capacity_gb: float | None = None) -> dict[str, Any]:
        extra = {} if capacity_gb is None else {"max_capacity_gb": capacity_gb}
        return az(f"owned/{abs(hash(str(tmp_path)))}", **extra)


class TestAzureSharedPrefix(_WriteOnceAz):
    bounded = False

    def adapter_config(self, tmp_path: Path, capacity_gb: float | None = None) -> dict[str, Any]:
        return az(f"shared/{abs(hash(str(tmp_path)))}", shared=True)


def test_missing_container_is_an_outage() -> None:
    adapter = create_backend(az("p", container=f"absent-{uuid.uuid4().hex[:8]}", shared=True))
    with pytest.raises(L2Error, match="missing_bucket"):
        adapter.contains(["k"])
    adapter.close()
