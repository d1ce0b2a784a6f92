"""The fp8 kernel bench, tiny: every figure and ratio is there, and each ratio comes from one sample per round."""

import json

import pytest
import torch

from kvtier.bench import fp8_kernels


def test_report_has_every_figure_and_interleaved_ratios() -> None:
    report = fp8_kernels.run(3, torch.float8_e4m3fn, outliers=1, shape=(2, 1, 8, 16))
    assert report["rounds"] == 3 and report["threads"] == 1 and report["cpu_count"] >= 1
    assert len(report["loadavg_before"]) == 3
    assert set(report["ms"]) == {
        "torch_to_fp8",
        "scaled_encode",
        "plain_encode",
        "torch_fp8_to_bf16",
        "scaled_decode",
        "memcpy_bf16",
    }
    assert len(report["ratios"]) == len(fp8_kernels.RATIOS)
    for entry in report["ratios"].values():
        for clock in ("cpu", "wall"):
            assert entry[clock]["samples"] == 3  # one per round: the baseline is sampled with the operation
            assert entry[clock]["p10"] <= entry[clock]["median"] <= entry[clock]["p90"]
    json.dumps(report)


def test_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    fp8_kernels.main(["--rounds", "2", "--fp8", "float8_e5m2", "--shape", "2,1,8,16", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["fp8"] == "float8_e5m2" and report["shape"] == [2, 1, 8, 16]


def test_cli_rejects_a_bad_shape() -> None:
    with pytest.raises(SystemExit):
        fp8_kernels.main(["--shape", "2,x", "--json"])
