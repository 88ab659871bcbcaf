"""tools/bench.py end to end in a tiny configuration, so that the benchmark cannot rot."""

import json

import pytest
import torch

from tools import bench


def test_tiny_benchmark_reports_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--num-steps", "3", "--batch-size", "2", "--train-timesteps", "1", "--memory-timesteps", "1,3",
            "--repeats", "1", "--iterations", "2", "--ddp-processes", "1", "--out", str(out)]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        bench.main(bench.parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert set(bench.SECTIONS) <= set(report)

    for ratio in (report["sampler"]["ratio"], report["iteration"]["ratio"]):
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
    # memory stays flat in the number of trained timesteps; checkpointing does not cost memory
    peaks = {
        (row["gradient_checkpointing"], row["train_timesteps"]): row["peak_mb"] for row in report["memory"]
    }
    assert peaks[(False, 1)] == pytest.approx(peaks[(False, 3)], rel=0.02)
    assert peaks[(True, 1)] == pytest.approx(peaks[(True, 3)], rel=0.02)
    assert peaks[(True, 3)] <= peaks[(False, 3)]
    assert report["ddp"]["1"]["median"] > 0
    assert set(report["knobs"]) >= {"default", "classic_attention", "channels_last", "tf32"}
    # the cost model: SD2 base counted from its config, about 115 TFLOP per sample of the paper's run
    paper = report["flops"]["paper"]
    assert paper["per_sample_tflop"] == pytest.approx(115, rel=0.05)
    assert 0.05 < paper["paper_implied_mfu"] < 0.3
    assert "iteration / UNet floor" in capsys.readouterr().out
