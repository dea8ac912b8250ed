"""The GPU time cost model: its FLOP count, its scheduling and its command line."""

from __future__ import annotations

import argparse
import json

import pytest

from pkm_lm.config import DataConfig, ModelConfig, TrainConfig, TrainLoopConfig
from pkm_lm.data.manifest import write_manifest
from pkm_lm.reproduce import estimate


def test_makespan_schedules_longest_first():
    assert estimate.makespan([3.0, 2.0, 2.0, 1.0], 2) == 4.0
    assert estimate.makespan([3.0, 2.0, 2.0, 1.0], 1) == 8.0
    assert estimate.makespan([5.0], 4) == 5.0


def test_flops_and_times_of_a_model_without_memory():
    """2 layers, dim 64, vocab 100, context 32: 6 x params + attention, by hand."""
    cfg = TrainConfig(
        data=DataConfig(seq_len=32),
        model=ModelConfig(n_layers=2, dim=64, n_heads=4, vocab_size=100),
        train=TrainLoopConfig(batch_size=4, max_steps=10, eval_interval=5),
    )
    cfg.model.memory.count = 0
    per_layer = 4 * (64 * 64 + 64) + 2 * 64 * 4 * 64 + 4 * 64 + 64 + 2 * 2 * 64  # attn, ffn, 2 LN
    params = 100 * 64 + 32 * 64 + 2 * per_layer + 2 * 64  # embeddings, blocks, final LN
    args = argparse.Namespace(
        tflops=1e-6, layer_ms=0.0, startup_s=7.0, valid_tokens=50, test_tokens=30
    )
    est = estimate.estimate("m", cfg, args, vocab=100)
    flops = 6 * params + 12 * 2 * 32 * 64
    assert est.gflop_per_token == pytest.approx(flops / 1e9)
    train_s = 10 * 4 * 32 * flops / 1e6
    eval_s = (2 * 50 + 30) * flops / 3 / 1e6  # 2 validations (steps 5, 10) and the test split
    assert est.compute_s == pytest.approx(train_s + eval_s)
    assert est.run_s == pytest.approx(7.0 + train_s + eval_s)
    args.layer_ms = 1e9  # launch-bound: each step costs layers x layer_ms
    assert estimate.estimate("m", cfg, args, 100).run_s == pytest.approx(7 + 10 * 2e6 + eval_s)


def test_cli_prints_the_group_estimate(tmp_path, capsys):
    splits = {s: {"shards": [], "tokens": 1000} for s in ("train", "valid", "test")}
    write_manifest(tmp_path, {"complete": True, "vocab_size": 8000, "splits": splits})
    estimate.main(["headline", "--scale", "gpu", "--parallel", "3", "--data", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["12L_0mem", "12L_1mem", "24L_0mem"]
    summary = json.loads(lines[-1])
    assert summary["group"] == "headline" and summary["parallel"] == 3
    assert summary["estimated_wall_s"] >= summary["gpu_work_s"] > 0
    with pytest.raises(SystemExit) as exit_info:
        estimate.main(["bn", "--scale", "gpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: bn does not run at --scale gpu")
    with pytest.raises(SystemExit) as exit_info:
        estimate.main(["headline", "--scale", "gpu", "--data", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    assert "is not preprocessed" in capsys.readouterr().err
