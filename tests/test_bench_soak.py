"""``kvtier bench soak``: a one-minute run of the real command meets every pass criterion."""

import json
import subprocess
import sys

from kvtier.bench.redis_server import find_redis_server


def test_a_one_minute_soak_passes() -> None:
    cmd = [sys.executable, "-m", "kvtier.cli", "bench", "soak", "--minutes", "1", "--clients", "4", "--json"]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=280)
    report = json.loads(out.stdout)
    figures = report["figures"]
    assert report["failures"] == [] and out.returncode == 0, (report["failures"], report["messages"])
    assert figures["mismatches"] == 0 and figures["client_errors"] == 0
    assert figures["refused_stores"] == 0
    assert figures["l1_used_bytes_after_clear"] == 0 and figures["l1_objects_after_clear"] == 0
    assert figures["rss_growth_second_half_mb"] < 50
    # the run did what it claims: chunks came back (from L1 and L2) and were compared; L1 churned
    assert figures["chunks_checked"] > 100 and figures["l2_prefetched"] > 0 and figures["l1_evictions"] > 0
    if find_redis_server() is not None:
        assert report["params"]["l2"] == ["fs", "redis"]
        assert any("SIGKILLed" in m for m in report["messages"])
        assert any("restarted" in m for m in report["messages"])
