"""The operator's side of ``kvtier server``: the admin HTTP endpoint locked down, secrets kept out of every output,
and a command line that answers without importing torch."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.cli import main as cli_main
from kvtier.server.process import ServerProcess, free_port

TOKEN = "adm1n-t0ken-0123456789abcdef"


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def _http(
    server: ServerProcess, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.host, server.http_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _raw_http(server: ServerProcess, request: bytes) -> bytes:
    with socket.create_connection((server.host, server.http_port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@pytest.fixture(scope="module")
def guarded() -> Iterator[ServerProcess]:
    args = ["--l1-size-gb", "0.0625", "--log-level", "info"]
    with ServerProcess(args, env={"KVTIER_ADMIN_TOKEN": TOKEN}) as s:
        yield s


# -- defect 7: admin HTTP ---------------------------------------------------------------------------------------
def test_clear_needs_the_token_and_the_same_origin(guarded: ServerProcess) -> None:
    assert _http(guarded, "POST", "/clear")[0] == 401
    assert _http(guarded, "POST", "/clear", {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    assert _http(guarded, "POST", "/clear", {"Authorization": TOKEN})[0] == 401  # no scheme
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _, body = _http(guarded, "POST", "/clear", auth)
    assert status == 200 and json.loads(body) == {"cleared": "l1"}
    assert guarded.post("/clear", token=TOKEN) == {"cleared": "l1"}
    # A page on another origin cannot make a browser clear the cache, even with the token.
    assert _http(guarded, "POST", "/clear", {**auth, "Origin": "http://evil.example"})[0] == 403
    assert _http(guarded, "POST", "/clear", {**auth, "Origin": "null"})[0] == 403
    assert _http(guarded, "POST", "/clear", {**auth, "Sec-Fetch-Site": "cross-site"})[0] == 403
    same = f"http://{guarded.host}:{guarded.http_port}"
    assert _http(guarded, "POST", "/clear", {**auth, "Origin": same, "Sec-Fetch-Site": "same-origin"})[0] == 200
    # Reads stay open for probes and scrapers.
    assert _http(guarded, "GET", "/health")[0] == 200
    assert TOKEN not in guarded.get("/stats", timeout=10).__repr__()


def test_without_a_token_clear_needs_an_address_not_a_rebindable_name() -> None:
    with ServerProcess(["--l1-size-gb", "0.0625", "--log-level", "warning"]) as s:
        assert _http(s, "POST", "/clear")[0] == 200  # Host: 127.0.0.1:PORT
        assert _http(s, "POST", "/clear", {"Host": f"evil.example:{s.http_port}"})[0] == 403
        assert _http(s, "POST", "/clear", {"Host": f"localhost:{s.http_port}"})[0] == 200


def test_head_and_input_limits(guarded: ServerProcess) -> None:
    status, headers, body = _http(guarded, "HEAD", "/health")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert _http(guarded, "HEAD", "/metrics")[0] == 200
    assert _http(guarded, "HEAD", "/clear")[0] == 405
    assert _http(guarded, "PUT", "/health")[0] == 405
    start = time.monotonic()
    for length, status in ((b"-1", 400), (b"-99999999999", 400), (b"12abc", 400), (b"99999999999999", 413)):
        reply = _raw_http(guarded, b"POST /clear HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 %d" % status), (length, reply[:80])
    reply = _raw_http(guarded, b"POST /clear HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 411"), reply[:80]
    assert time.monotonic() - start < 5  # refused at once, nothing waited for a body


def test_idle_connections_do_not_each_hold_a_thread(guarded: ServerProcess) -> None:
    assert guarded.proc is not None
    pid = guarded.proc.pid
    assert _http(guarded, "GET", "/health")[0] == 200
    before = _threads(pid)
    idle = [socket.create_connection((guarded.host, guarded.http_port), timeout=30) for _ in range(40)]
    try:
        time.sleep(0.3)
        # Idle connections wait for their first byte in the accept loop, on no thread: probes still answer at once.
        for _ in range(3):
            assert _http(guarded, "GET", "/health")[0] == 200
        assert _threads(pid) <= before + 1, (before, _threads(pid))
        # A connection that says nothing is closed by the server within seconds.
        idle[0].settimeout(15)
        assert idle[0].recv(1) == b""
        # One that starts a request and then stalls holds a worker only until its read times out.
        stalled = [socket.create_connection((guarded.host, guarded.http_port), timeout=30) for _ in range(4)]
        for s in stalled:
            s.sendall(b"GET /health HTTP/1.1\r\n")
        idle.extend(stalled)
        deadline = time.monotonic() + 15
        while True:
            try:
                if _http(guarded, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "admin endpoint stayed blocked by stalled requests"
            time.sleep(0.2)
    finally:
        for s in idle:
            s.close()
    assert _threads(pid) <= before + 1


# -- defect 6: secrets never in logs, /stats, /metrics or error messages ---------------------------------------
def test_secrets_never_appear_in_logs_stats_metrics_or_errors(tmp_path: Path) -> None:
    password = "S3cretRedisPassw0rd"
    key_material = "00112233445566778899aabbccddeeff"
    key_file = tmp_path / "tenant-key-file-location.hex"
    key_file.write_text("ffeeddccbbaa99887766554433221100")
    redis_url = f"redis://kvuser:{password}@127.0.0.1:{free_port()}/0"  # nothing listens: every batch fails
    adapters = [
        {"type": "redis", "url": redis_url, "connect_timeout_s": 0.2, "timeout_s": 0.2},
        {"type": "fs", "base_path": str(tmp_path / "l2"), "serde": {"type": "aesgcm", "key_file": str(key_file)}},
        {"type": "memory", "serde": {"type": "aesgcm", "key_env": "KVTIER_TEST_KEY"}},
    ]
    config = tmp_path / "kvtier.json"
    config.write_text(json.dumps({"l1_size_gb": 0.0625, "l2_adapters": adapters, "log_level": "debug"}))
    env = {"KVTIER_ADMIN_TOKEN": TOKEN, "KVTIER_TEST_KEY": key_material}
    secrets = [password, key_material, str(key_file), key_file.name, TOKEN]
    import torch

    from kvtier import Client, ObjectKey

    with ServerProcess(["--config", str(config)], env=env) as s:
        with Client(s.address, timeout_s=20) as c:
            key = ObjectKey("test/secret", "ab", cache_salt="tenant-salt-value")
            c.store([key], [torch.ones(64)])
            time.sleep(0.5)  # the redis write-behind fails meanwhile and is logged
            stats = json.dumps(c.stats())
        outputs = {"stats": json.dumps(s.get("/stats")), "client stats": stats, "metrics": s.get("/metrics")}
        outputs["health"] = json.dumps(s.get("/health"))
        s.stop()
        outputs["log"] = s.stderr()
    assert '"serving"' in outputs["log"] and "<redacted>" in outputs["log"], outputs["log"]
    assert "kvuser:***@" in outputs["log"]
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, (where, secret)
    # Configuration errors that would quote a secret.
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"l1_size_gb: 1\nl2_adapters: ['{redis_url}']\n")
    missing = tmp_path / "missing-key-file-path.hex"
    cases = [
        ["server", "--config", str(bad)],
        ["server", "--l1-size-gb", "1", "--l2-adapter", json.dumps({"type": redis_url})],
        [
            "server",
            "--l1-size-gb",
            "1",
            "--l2-adapter",
            json.dumps({"type": "memory", "serde": {"type": "aesgcm", "key_file": str(missing)}}),
        ],
    ]
    for argv in cases:
        out = subprocess.run(
            [sys.executable, "-m", "kvtier.cli", *argv], capture_output=True, text=True, timeout=120, check=False
        )
        assert out.returncode == 2, out.stderr
        for secret in [password, str(missing), missing.name]:
            assert secret not in out.stderr, (argv, out.stderr)


def test_redact_config_and_scrub() -> None:
    from kvtier.config import REDACTED, redact_config, scrub, secret_values

    config = {
        "l2_adapters": [
            {"type": "redis", "url": "rediss://u:p%40ss-word@h:6380/0?ssl_ca_certs=/x", "key_prefix": "kv"},
            {"type": "fs", "serde": [{"type": "aesgcm", "key_file": "/etc/k", "key_env": "K"}]},
        ],
        "admin_token": "tok-tok-tok-tok-tok",
        "api_key": "",
    }
    red = redact_config(config)
    assert red["admin_token"] == REDACTED and red["api_key"] == ""
    assert red["l2_adapters"][0]["url"] == "rediss://u:***@h:6380/0?ssl_ca_certs=/x"
    assert red["l2_adapters"][0]["key_prefix"] == "kv"
    assert red["l2_adapters"][1]["serde"][0] == {"type": "aesgcm", "key_file": REDACTED, "key_env": "K"}
    found = secret_values(config, {"K": "material-of-the-key"})
    assert {"p%40ss-word", "p@ss-word", "/etc/k", "tok-tok-tok-tok-tok", "material-of-the-key"} <= set(found)
    from kvtier.server.config import ServerConfig

    shown = repr(ServerConfig(l1_size_gb=1.0, l2_adapters=config["l2_adapters"], admin_token="tok-tok-tok-tok-tok"))
    assert "p%40ss-word" not in shown and "/etc/k" not in shown and "tok-tok" not in shown, shown
    text = json.dumps({"e": "failed: p@ss-word at /etc/k", "u": "redis://a:zz@b"})
    clean = scrub(text, found)
    assert "p@ss-word" not in clean and "/etc/k" not in clean and "a:***@b" in clean


def test_unresolvable_redis_host_is_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    url = "redis://:pw-not-shown-1234@no-such-host.invalid:6379/0"
    port, http = free_port(), free_port()
    argv = ["server", "--l1-size-gb", "0.0625", "--port", str(port), "--http-port", str(http)]
    code = cli_main([*argv, "--l2-adapter", json.dumps({"type": "redis", "url": url})])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "l2_adapters[0].url" in err and "no-such-host.invalid" in err and "does not resolve" in err, err
    assert "pw-not-shown-1234" not in err


# -- defect 9: a command line that does not import torch to say no -------------------------------------------
_PROBE = """
import json, sys
from kvtier.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    results.append([argv, code, "torch" in sys.modules])
print(json.dumps(results))
"""


def test_help_version_and_config_errors_do_not_import_torch(tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["server", "--l1-size-gb", "1", "--port", str(free_port()), "--http-port", str(free_port())]
    cases = [
        (["--help"], 0),
        (["--version"], 0),
        (["server", "--help"], 0),
        (["bench", "--help"], 0),
        (["server"], 2),  # l1_size_gb missing
        ([*base, "--l2-adapter", "{bad json"], 2),
        ([*base, "--chunk-size", "0"], 2),
        ([*base, "--config", str(tmp_path / "nope.yaml")], 2),
        ([*base, "--l2-adapter", json.dumps({"type": "fs", "base_path": str(a_file / "x")})], 2),
        ([*base, "--admin-token", "short"], 2),
        ([*base, "--l2-adapter", json.dumps({"type": "redis", "url": "redis://no-such-host.invalid:1/0"})], 2),
        ([*base, "--l2-adapter", json.dumps({"type": "nosuch"})], 2),
        ([*base, "--l2-adapter", json.dumps({"type": "memory", "serde": [{"type": "fp8"}, {"type": "zstdd"}]})], 2),
    ]
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps([argv for argv, _ in cases])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for (argv, code, torch_loaded), (_, expected) in zip(results, cases, strict=True):
        assert code == expected, (argv, code, out.stderr)
        assert not torch_loaded, argv
    version = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    from kvtier import __version__

    assert version.stdout.strip() == f"kvtier {__version__}"


def test_admin_token_from_flag_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from kvtier.server.config import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.delenv("KVTIER_ADMIN_TOKEN", raising=False)
    assert config_from_args(parser.parse_args(["--l1-size-gb", "1"])).admin_token is None
    monkeypatch.setenv("KVTIER_ADMIN_TOKEN", TOKEN)
    config = config_from_args(parser.parse_args(["--l1-size-gb", "1"]))
    assert config.admin_token == TOKEN and TOKEN not in repr(config) and TOKEN not in json.dumps(config.to_json())
    other = "flag-token-0123456789abcdef"
    assert config_from_args(parser.parse_args(["--l1-size-gb", "1", "--admin-token", other])).admin_token == other
    cfg = tmp_path / "k.yaml"
    cfg.write_text("l1_size_gb: 1\nadmin_token: file-token-0123456789abcdef\n")
    assert config_from_args(parser.parse_args(["--config", str(cfg)])).admin_token == "file-token-0123456789abcdef"
    os.environ.pop("KVTIER_ADMIN_TOKEN", None)


def _strings(value: object) -> list[str]:
    """Every string in a JSON-like document, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def test_scrub_removes_any_secret_from_any_text() -> None:
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    from kvtier.config import REDACTED, scrub, scrub_tree
    from kvtier.server.logs import JsonFormatter

    secret_text = st.text(min_size=4, max_size=24).filter(
        lambda s: s not in REDACTED and s not in "***"
    ) | st.sampled_from(["d>ab", "cted>x", "ed><r"])

    @settings(max_examples=200, deadline=None)
    @given(secret_text, st.text(max_size=30), st.text(max_size=30))
    @example("0000", "", "\x00")  # JSON escapes NUL as \u0000: the text spells the secret, the document does not
    def check(secret: str, before: str, after: str) -> None:
        text = before + secret + after
        assert secret not in scrub(text, [secret])
        assert json.dumps(secret)[1:-1] not in scrub(json.dumps(text), [secret])
        doc = scrub_tree({"l2": [{"url": text, text: 1}], "n": 3}, [secret])
        # Checked on the document's own strings: its JSON text may spell a secret by escaping alone ("\\u0000").
        assert not any(secret in s for s in _strings(doc)) and doc["n"] == 3
        # A log line stays one valid JSON object, without the secret, whatever the secret looks like.
        import logging

        formatter = JsonFormatter()
        formatter.secrets = (secret,)
        record = logging.LogRecord("kvtier.test", logging.INFO, __file__, 1, "failed: %s", (text,), None)
        record.fields = {"error": text}
        line = formatter.format(record)
        parsed = json.loads(line)
        assert secret not in parsed["msg"] and secret not in parsed["error"]

    check()


def test_builtin_type_names_of_the_early_check_match_the_registries() -> None:
    from kvtier.l2.adapters import BUILTIN_ADAPTERS
    from kvtier.serde.builtin import BUILTIN_SERDES
    from kvtier.server.config import BUILTIN_ADAPTER_TYPES, BUILTIN_SERDE_TYPES

    assert set(BUILTIN_ADAPTERS) == BUILTIN_ADAPTER_TYPES
    assert set(BUILTIN_SERDES) == BUILTIN_SERDE_TYPES
