"""logger=wandb through a real offline wandb run: the logged keys reach the run's file, and a
resumed training continues the same wandb run."""

from __future__ import annotations

import pytest
from tiny_trainer import build_trainer

from pkm_lm.metrics import WANDB_ID_FILE

pytest.importorskip("wandb", reason="wandb is not installed (pip install 'pkm-lm[dev]')")

COMMON = ("logger=wandb", "logger.mode=offline", "logger.project=pkm-lm-tests",
          "train.log_interval=1", "train.eval_interval=2", "train.checkpoint_interval=2")  # fmt: skip


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch, tmp_path):
    """Offline, silent, and wandb's own settings and caches kept in the test's directory."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def run_files(run_dir) -> list:
    """The offline run files written in ``run_dir``, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_logged_keys_arrive_and_a_resumed_run_continues_the_wandb_run(ids_data, tmp_path):
    run_dir = tmp_path / "run"
    build_trainer(ids_data, "cpu", run_dir, *COMMON, "train.max_steps=2").fit()
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    (first,) = run_files(run_dir)
    assert first.name == f"run-{run_id}.wandb"
    written = first.read_bytes()  # protobuf records: the keys are stored as they are
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/memory_usage/2",
                "valid/loss", "valid/ppl", "valid/memory/2/usage", "valid/memory/2/kl_weights"):  # fmt: skip
        assert key.encode() in written, key

    build_trainer(ids_data, "cpu", run_dir, *COMMON, "train.max_steps=3").fit()
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id
    files = run_files(run_dir)
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_id}.wandb"}
    assert b"train/loss" in files[1].read_bytes()
