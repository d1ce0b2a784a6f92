"""``kvtier bench purge``: a smoke run on fs (tiny) checks its report: everything purged, the reader measured."""

from __future__ import annotations

import argparse
import sys

from kvtier.bench import purge


def test_bench_purge_smoke() -> None:
    parser = argparse.ArgumentParser()
    purge.add_arguments(parser)
    keep = str(sys.getswitchinterval())  # the bench sets it for its process: leave this one's as it is
    args = parser.parse_args(["--records", "300", "--keep", "8", "--batch", "64", "--switch-interval", keep])
    report = purge.run(args)
    assert report["l2_deleted"] == 300 and report["left_after"] == 0 and not report["errors"]
    assert report["progress_reports"] >= 300 // 64
    assert report["reader_before"]["calls"] > 0
