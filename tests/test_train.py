"""The trainer through its real command lines, on a tiny dataset and model (seconds each); the
runs whose command line is not what a test is about train in the test's process."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_trainer import kill_at_checkpoint, trainer_for

from pkm_lm.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from pkm_lm.metrics import MetricLogger, read_metrics

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
WORDS = (
    "the a cat dog sat on mat and ran to house tree big small red blue green over under quick "
    "lazy fox jumps river stone bird sings sun moon night day"
).split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A preprocessed dataset made by the real preprocessing command from made-up sentences."""
    raw = tmp_path_factory.mktemp("raw")
    rng = random.Random(0)
    for split, n in (("train", 600), ("valid", 40), ("test", 40)):
        lines = (
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(n)
        )
        (raw / f"{split}.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("bin")
    cmd = ["-m", "pkm_lm.preprocess", f"raw_dir={raw}", f"out_dir={out}", "bpe.n_codes=40"]
    run(cmd)
    return out


def tiny_args(data_dir: Path, run_dir: Path, *extra: str, device: str = "cpu") -> list[str]:
    """A tiny model on ``device`` (CPU by default: the comparisons below are bitwise)."""
    return [
        f"run_dir={run_dir}", f"data.dir={data_dir}", "data.seq_len=16", f"train.device={device}",
        "model.n_layers=2", "model.dim=32", "model.n_heads=2", "model.memory.layers=[2]",
        "model.memory.n_keys=8", "model.memory.heads=2", "model.memory.knn=4",
        "model.memory.k_dim=16", "train.batch_size=8", "optim.warmup_steps=4", *extra,
    ]  # fmt: skip


def run(args: list[str], check: bool = True, launcher: list[str] | None = None):
    cmd = (launcher or [sys.executable]) + args
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def train(*args: str, **kw):
    return run(["-m", "pkm_lm.train", *args], **kw)


def train_here(*args: str) -> None:
    """``python -m pkm_lm.train ARGS``, in this process."""
    trainer_for(list(args)).fit()


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(latest_checkpoint(run_dir))


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_metrics_contract_checkpoints_evaluate_and_generate(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_args(data_dir, run_dir, "train.max_steps=4", "train.log_interval=2",
                     "train.eval_interval=2", "train.checkpoint_interval=2",
                     "train.keep_checkpoints=1")  # fmt: skip
    out = train(*args).stdout
    assert "step       4/4 | loss" in out and "eval valid @ step 4" in out

    records = read_metrics(run_dir)
    train_recs = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_recs] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for r in train_recs:
        keys = {"step", "tokens", "loss", "ppl", "lr", "tokens_per_s", "grad_norm",
                "skipped_steps", "elapsed_s"}  # fmt: skip
        assert keys <= r.keys()
        assert r["tokens"] == r["step"] * 8 * 16 and r["skipped_steps"] == 0
        assert r["ppl"] == pytest.approx(torch.tensor(r["loss"]).exp().item(), rel=1e-6)
    for r in evals:
        assert r["split"] == "valid" and {"loss", "ppl", "tokens_per_s", "tokens"} <= r.keys()
        assert set(r["memory"]) == {"2"}  # 1-based layer index, as in the config
        assert {"usage", "kl_weights", "kl_counts"} <= r["memory"]["2"].keys()
        assert 0 < r["memory"]["2"]["usage"] <= 100

    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004.pt"]  # keep 1
    state = final_state(run_dir)
    assert (
        state["step"] == 4 and {"model", "optim", "scaler", "data", "rng", "config"} <= state.keys()
    )
    assert "vocab_size" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "loss.png").stat().st_size > 0

    again = train(*args).stdout  # the same command on a finished run does nothing
    assert "already finished" in again and read_metrics(run_dir) == records
    changed = train(*args, "model.dim=64", "model.memory.k_dim=8", check=False)
    assert changed.returncode != 0 and "model.dim: 32 -> 64" in changed.stderr

    out = run(["-m", "pkm_lm.evaluate", f"run_dir={run_dir}", "split=test"]).stdout
    assert "eval test @ step 4" in out
    test_rec = read_metrics(run_dir)[-1]
    assert test_rec["split"] == "test" and test_rec["kind"] == "eval" and "2" in test_rec["memory"]

    out = run(["-m", "pkm_lm.generate", f"run_dir={run_dir}", "prompt=The cat",
               "max_new_tokens=8", "num_samples=2"]).stdout  # fmt: skip
    assert "--- sample 2 ---" in out and "The cat" in out

    # Value tables read in bf16: the same model within bf16 rounding of its values.
    run(["-m", "pkm_lm.evaluate", f"run_dir={run_dir}", "split=test", "value_dtype=bfloat16"])
    bf16_rec = read_metrics(run_dir)[-1]
    assert bf16_rec["ppl"] == pytest.approx(test_rec["ppl"], rel=1e-2)
    assert bf16_rec["ppl"] != test_rec["ppl"]
    out = run(["-m", "pkm_lm.generate", f"run_dir={run_dir}", "prompt=The cat",
               "max_new_tokens=8", "value_dtype=bfloat16"]).stdout  # fmt: skip
    assert "--- sample 1 ---" in out


def test_kill_and_resume_equals_uninterrupted(data_dir, tmp_path):
    """SIGKILL mid-run, rerun the same command: identical weights and losses, bit for bit."""
    # Killed after step 8: the resumed run crosses both validations (steps 10 and 20).
    common = ["train.max_steps=20", "train.log_interval=1", "train.eval_interval=10",
              "train.checkpoint_interval=1", "model.dropout=0.1", "model.attn_dropout=0.1",
              "data.shuffle=true"]  # fmt: skip
    whole = tmp_path / "whole"
    train(*tiny_args(data_dir, whole, *common))

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pkm_lm.train", *tiny_args(data_dir, killed, *common)]
    kill_at_checkpoint(cmd, ENV, killed, 8)
    at_kill = latest_checkpoint(killed)
    assert at_kill is not None and load_checkpoint(at_kill)["step"] < 20, "run ended before kill"

    out = train(*tiny_args(data_dir, killed, *common)).stdout
    assert "resumed from" in out
    assert train_losses(killed) == train_losses(whole)  # no duplicates, same values
    a, b = final_state(whole), final_state(killed)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["data"] == b["data"]


@pytest.mark.parametrize(
    "extra",
    [
        # sparse value gradients + LazyAdam, query BN synced across ranks, no accumulation
        ["train.micro_batch_size=null"],
        # dense values + Adam, 2 micro-steps per rank (no_sync), no BN (per-micro-batch stats
        # cannot match across different micro-batch layouts)
        ["train.micro_batch_size=2", "model.memory.sparse_grad=false",
         "optim.value_optimizer=adam", "model.memory.query_batchnorm=false"],
    ],
    ids=["sparse-syncbn", "dense-accumulation"],
)  # fmt: skip
def test_two_processes_equal_one_on_the_same_global_batch(data_dir, tmp_path, extra):
    common = ["train.max_steps=6", "train.log_interval=1", "train.eval_interval=6",
              "train.checkpoint_interval=6", "model.dropout=0", "model.attn_dropout=0",
              # Some gradients are exactly zero in theory (attention key bias, biases before the
              # query BN) and float rounding noise in practice; Adam with eps=1e-8 turns that
              # noise into lr-sized steps. A larger eps keeps the comparison about the gradients.
              "optim.eps=1e-4", *extra]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    train_here(*tiny_args(data_dir, one, *common))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run(["-m", "pkm_lm.train", *tiny_args(data_dir, two, *common)], launcher=torchrun)
    l1, l2 = train_losses(one), train_losses(two)
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 7))
    for (_, a), (_, b) in zip(l1, l2, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    a, b = final_state(one)["model"], final_state(two)["model"]
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5), name
    if "train.micro_batch_size=null" in extra:  # evaluation split over 2 ranks, merged
        evaluate = ["-m", "pkm_lm.evaluate", f"run_dir={two}", "split=test"]
        run(evaluate, launcher=torchrun)
        run(evaluate)
        split, whole = read_metrics(two)[-2:]
        assert split["n_tokens"] == whole["n_tokens"]
        assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)
        assert split["memory"]["2"]["kl_counts"] == pytest.approx(whole["memory"]["2"]["kl_counts"])


MIXED = ["train.max_steps=4", "train.log_interval=1", "train.eval_interval=4", "model.dropout=0",
         "model.attn_dropout=0", "optim.lr=3e-3", "optim.warmup_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def fp32_run(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fp32")
    train_here(*tiny_args(data_dir, run_dir, *MIXED))
    return run_dir


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_cpu(data_dir, tmp_path, fp32_run, precision):
    """Autocast computes in low precision (the losses differ from fp32's) and trains as fp32
    does: at a high lr past warmup the loss falls by far more than the difference."""
    run_dir = tmp_path / precision
    train_here(*tiny_args(data_dir, run_dir, f"train.precision={precision}", *MIXED))
    full, mixed = train_losses(fp32_run), train_losses(run_dir)
    assert [s for s, _ in mixed] == [1, 2, 3, 4]
    assert mixed != full  # autocast changed the arithmetic
    assert full[0][1] - min(loss for _, loss in full[1:]) > 0.2, full  # steps were taken
    for (_, a), (_, b) in zip(full, mixed, strict=True):
        assert b == pytest.approx(a, abs=0.05)
    state = final_state(run_dir)
    assert state["step"] == 4 and all(
        r["skipped_steps"] == 0 for r in read_metrics(run_dir) if r["kind"] == "train"
    )
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # GradScaler active and saved


def test_validation_error_reaches_the_user_before_any_work(data_dir, tmp_path):
    run_dir = tmp_path / "bad"
    proc = train(*tiny_args(data_dir, run_dir, "model.memory.layers=[3]"), check=False)
    assert proc.returncode != 0
    assert "model.memory.layers=[3]" in proc.stderr and "model.n_layers=2" in proc.stderr
    assert not (run_dir / "checkpoints").exists()


def test_wandb_logger_without_wandb_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'pkm-lm[wandb]'")):
        MetricLogger(tmp_path, kind="wandb")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_mixed_precision_training_matches_fp32_closely(ids_data, tmp_path, precision):
    """Past warmup at a high lr, so the loss falls by far more than the tolerance (on CPU this
    config falls ~0.75 nats in 8 steps, bf16 within 0.01 of fp32)."""
    data_dir = ids_data  # token ids: GPU nodes often lack fastBPE
    common = ["train.max_steps=8", "train.log_interval=1", "train.eval_interval=8",
              "model.dropout=0", "model.attn_dropout=0", "optim.lr=3e-3",
              "optim.warmup_steps=1"]  # fmt: skip
    train(*tiny_args(data_dir, tmp_path / "fp32", *common, device="cuda"))
    mixed = tmp_path / precision
    train(*tiny_args(data_dir, mixed, f"train.precision={precision}", *common, device="cuda"))
    assert [r["skipped_steps"] for r in read_metrics(mixed) if r["kind"] == "train"] == [0] * 8
    full, mixed = train_losses(tmp_path / "fp32"), train_losses(tmp_path / precision)
    assert [s for s, _ in full] == [s for s, _ in mixed] == list(range(1, 9))
    for losses in (full, mixed):
        assert losses[0][1] - losses[-1][1] > 0.4, losses  # steps were taken: the loss fell
    for (_, a), (_, b) in zip(full, mixed, strict=True):
        assert b == pytest.approx(a, abs=0.05)
