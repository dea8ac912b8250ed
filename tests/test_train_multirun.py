"""Hydra multirun: every job of a sweep trains in its own directory inside run_dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf
from tiny_trainer import tiny_args

from pkm_lm.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_two_job_multirun_gives_each_job_its_run_dir(corpus, tmp_path):
    sweep_dir = tmp_path / "sweep"
    steps = ["train.max_steps=3", "train.log_interval=1", "train.eval_interval=3"]
    args = ["-m", *tiny_args(corpus, "cpu", sweep_dir, *steps, "train.seed=0,1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pkm_lm.train", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {}
    for job, seed in (("0", 0), ("1", 1)):
        run_dir = sweep_dir / job
        cfg = OmegaConf.load(run_dir / "config.yaml")
        assert cfg.train.seed == seed and Path(cfg.run_dir) == run_dir
        train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3]
        losses[seed] = [r["loss"] for r in train]
    assert losses[0] != losses[1]  # two runs with their own seeds, not one run twice
