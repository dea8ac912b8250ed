"""A tiny memory LM on a token-id dataset, for tests that drive the trainer on a chosen device
(through its command line, or built in the test's process to watch or poison a step)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(data: Path, device: str | None, run_dir: Path, *extra: str) -> list[str]:
    """Overrides of ``python -m pkm_lm.train``; ``device=None`` keeps the default (auto)."""
    return [
        f"run_dir={run_dir}", f"data.dir={data}", "data.seq_len=32",
        *([f"train.device={device}"] if device else []),
        "model.n_layers=2", "model.dim=64", "model.n_heads=2", "model.memory.layers=[2]",
        "model.memory.n_keys=32", "model.memory.heads=2", "model.memory.knn=8",
        "model.memory.k_dim=32", "train.batch_size=16", "optim.warmup_steps=4", *extra,
    ]  # fmt: skip


def build_trainer(data: Path, device: str | None, run_dir: Path, *overrides: str):
    """The trainer as ``python -m pkm_lm.train`` builds it, in this process."""
    return trainer_for(tiny_args(data, device, run_dir, *overrides))


def trainer_for(overrides: list[str]):
    """The trainer ``python -m pkm_lm.train OVERRIDES`` builds, in this process (no interpreter
    to start: seconds of imports saved per run)."""
    from hydra import compose, initialize_config_dir

    from pkm_lm import train

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        dcfg = compose("train", overrides=overrides)
    cfg = train.to_train_config(dcfg)
    return train.Trainer(cfg, train.init_distributed(cfg.distributed.backend, cfg.train.device))


def kill_at_checkpoint(cmd: list[str], env: dict, run_dir: Path, step: int) -> None:
    """Start a training command and SIGKILL it once the checkpoint of ``step`` is complete (or
    the run ended first, or two minutes passed)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    target = Path(run_dir) / "checkpoints" / f"step_{step:07d}.json"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
