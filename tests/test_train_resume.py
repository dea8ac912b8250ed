"""Resuming a run with changed settings: each setting that may change, end to end on a tiny
model in this process (a 2-step run resumed to step 4), and the ones that may not."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_trainer import build_trainer

from pkm_lm.checkpoint import latest_checkpoint, load_checkpoint
from pkm_lm.errors import ConfigError
from pkm_lm.metrics import read_metrics
from pkm_lm.optim import inverse_sqrt

BASE = ("train.log_interval=1", "train.eval_interval=100", "train.checkpoint_interval=2",
        "train.keep_checkpoints=1", "model.dropout=0.1", "optim.lr=1e-3")  # fmt: skip


def fit(data, run_dir, *overrides: str, device: str = "cpu"):
    trainer = build_trainer(data, device, run_dir, *BASE, *overrides)
    trainer.fit()
    return trainer


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def final_state(run_dir) -> dict:
    return load_checkpoint(latest_checkpoint(run_dir), mmap=False)


@pytest.fixture(scope="module")
def runs(ids_data, tmp_path_factory):
    """A run stopped after 2 steps (to copy and resume) and the same run straight to step 4."""
    root = tmp_path_factory.mktemp("resume")
    fit(ids_data, root / "two", "train.max_steps=2")
    fit(ids_data, root / "whole", "train.max_steps=4")
    return root


def resume(runs, data, tmp_path, *overrides: str, device: str = "cpu"):
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs / "two", run_dir)
    return run_dir, fit(data, run_dir, "train.max_steps=4", *overrides, device=device)


def test_max_steps_and_intervals_may_change_and_the_run_continues_exactly(
    runs, ids_data, tmp_path, capsys
):
    run_dir, _ = resume(runs, ids_data, tmp_path, "train.checkpoint_interval=1",
                        "train.eval_interval=3", "train.keep_checkpoints=3")  # fmt: skip
    out = capsys.readouterr().out
    assert "changed on resume: train.max_steps: 2 -> 4" in out
    assert "changed on resume: train.eval_interval: 100 -> 3" in out
    assert losses(run_dir) == losses(runs / "whole")
    a, b = final_state(run_dir), final_state(runs / "whole")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["data"] == b["data"]
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "eval"] == [2, 3, 4]


def test_precision_may_change(runs, ids_data, tmp_path, capsys):
    """fp32 -> fp16 starts a fresh gradient scale (the fp32 run saved none); fp16 -> fp32 drops
    it."""
    run_dir, trainer = resume(runs, ids_data, tmp_path, "train.precision=fp16")
    assert "changed on resume: train.precision: 'fp32' -> 'fp16'" in capsys.readouterr().out
    assert trainer.progress.skipped_steps == 0 and final_state(run_dir)["scaler"]["scale"] > 0
    fit(ids_data, run_dir, "train.max_steps=5", "train.precision=fp32")
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5] and all(torch.isfinite(torch.tensor([*got.values()])))
    assert final_state(run_dir)["scaler"] == {}


def test_an_optim_override_wins_over_the_restored_optimizer(runs, ids_data, tmp_path, capsys):
    """optim.lr, value_lr, warmup_steps, betas, eps given on resume apply from the next step on;
    the moments and step counts are restored."""
    run_dir, trainer = resume(runs, ids_data, tmp_path, "optim.lr=5e-4", "optim.value_lr=2e-3",
                              "optim.warmup_steps=8", "optim.betas=[0.8,0.95]")  # fmt: skip
    assert "changed on resume: optim.lr: 0.001 -> 0.0005" in capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in read_metrics(run_dir) if r["kind"] == "train"}
    whole = {r["step"]: r["lr"] for r in read_metrics(runs / "whole") if r["kind"] == "train"}
    assert [lrs[s] for s in (1, 2)] == [whole[s] for s in (1, 2)]
    assert lrs[3] == pytest.approx(5e-4 * inverse_sqrt(2, 8), rel=1e-12)
    assert lrs[4] == pytest.approx(5e-4 * inverse_sqrt(3, 8), rel=1e-12)
    saved = final_state(run_dir)["optim"]
    assert [g["betas"] for g in saved["base"]["param_groups"]] == [(0.8, 0.95)]
    assert [g["lr"] for g in saved["values"]["param_groups"]] == [2e-3]
    assert saved["schedule"]["base_lrs"] == [5e-4]
    assert all(s["step"] == 4 for s in saved["values"]["state"].values())  # moments kept


def test_micro_batch_size_may_change(runs, ids_data, tmp_path):
    """The same global batches, in 2 micro-steps each (their own BN statistics and dropout
    masks: close to the uninterrupted run, not equal)."""
    run_dir, trainer = resume(runs, ids_data, tmp_path, "train.micro_batch_size=8")
    assert trainer.accum_steps == 2
    got, whole = losses(run_dir), losses(runs / "whole")
    assert [got[s] for s in (1, 2)] == [whole[s] for s in (1, 2)]
    assert [got[s] for s in (3, 4)] == pytest.approx([whole[s] for s in (3, 4)], rel=2e-2)
    assert final_state(run_dir)["data"] == final_state(runs / "whole")["data"]


def test_memory_kernel_may_change(runs, ids_data, tmp_path, capsys):
    """A run trained with the torch kernel resumes with the Triton kernels (on CPU in Triton's
    interpreter, too slow for whole steps: one step on 2 short sequences here) and takes the
    step the torch kernel takes."""
    pytest.importorskip("triton", reason="triton is not installed (Linux only)")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the interpreter is off (test_device_may_change runs there)")
    trainers = {}
    for kernel in ("torch", "triton"):
        run_dir = tmp_path / kernel
        shutil.copytree(runs / "two", run_dir)
        overrides = ("train.max_steps=4", f"model.memory.kernel={kernel}")
        trainers[kernel] = build_trainer(ids_data, "cpu", run_dir, *BASE, *overrides)
    assert "model.memory.kernel: 'auto' -> 'triton'" in capsys.readouterr().out
    batch = trainers["torch"].stream.next_batch()[:2, :9]
    steps = {}
    for kernel, trainer in trainers.items():
        torch.manual_seed(0)  # the same dropout masks (the trainers share the global RNG)
        steps[kernel] = trainer.train_step(batch)
    assert steps["triton"].loss.item() == pytest.approx(steps["torch"].loss.item(), rel=1e-6)
    assert steps["triton"].grad_norm.item() == pytest.approx(
        steps["torch"].grad_norm.item(), rel=1e-5
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_may_change(runs, ids_data, tmp_path):
    run_dir, trainer = resume(runs, ids_data, tmp_path, device="cuda")
    assert next(trainer.model.parameters()).device.type == "cuda"
    got, whole = losses(run_dir), losses(runs / "whole")
    assert [got[s] for s in (3, 4)] == pytest.approx([whole[s] for s in (3, 4)], rel=1e-3)


@pytest.mark.parametrize(
    "override,change",
    [
        ("model.memory.knn=4", "model.memory.knn: 8 -> 4"),
        ("train.batch_size=8", "train.batch_size: 16 -> 8"),
        ("train.seed=1", "train.seed: 0 -> 1"),
        ("data.shuffle=true", "data.shuffle: False -> True"),
    ],
)
def test_settings_that_decide_what_is_trained_may_not_change(runs, ids_data, tmp_path,
                                                            override, change):  # fmt: skip
    run_dir = tmp_path / "refused"
    shutil.copytree(runs / "two", run_dir)
    with pytest.raises(ConfigError, match="cannot resume .*step_0000002.pt") as err:
        build_trainer(ids_data, "cpu", run_dir, *BASE, "train.max_steps=4", override)
    assert change in str(err.value) and "\n" not in str(err.value)


def test_the_value_optimizer_may_not_change(ids_data, tmp_path):
    dense = ("model.memory.sparse_grad=false",)
    fit(ids_data, tmp_path, "train.max_steps=1", *dense)
    with pytest.raises(ConfigError, match="optim.value_optimizer: 'lazy_adam' -> 'adam'"):
        build_trainer(ids_data, "cpu", tmp_path, *BASE, *dense, "optim.value_optimizer=adam")
