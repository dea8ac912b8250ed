"""Trainer pieces in-process: schedule, optimiser split, checkpoint files, metrics file,
memory statistics, and one training step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pkm_lm.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from pkm_lm.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, TrainLoopConfig
from pkm_lm.distributed import DistEnv
from pkm_lm.memory import LazyAdam
from pkm_lm.metrics import memory_stats, plot_loss, read_metrics, truncate_metrics
from pkm_lm.model import build_model
from pkm_lm.optim import build_optimizers, inverse_sqrt
from pkm_lm.trainer import Trainer


def test_inverse_sqrt_warms_up_linearly_then_decays():
    assert inverse_sqrt(0, 4) == pytest.approx(0.25)
    assert inverse_sqrt(3, 4) == pytest.approx(1.0)  # peak at the end of warmup
    assert inverse_sqrt(15, 4) == pytest.approx(math.sqrt(4 / 16))
    assert inverse_sqrt(99, 0) == pytest.approx(0.1)


def model_with_memory(sparse: bool):
    cfg = ModelConfig(n_layers=2, dim=16, n_heads=2, vocab_size=20, max_seq_len=8)
    cfg.memory.layers, cfg.memory.n_keys, cfg.memory.k_dim = [1], 4, 8
    cfg.memory.heads, cfg.memory.knn, cfg.memory.sparse_grad = 1, 2, sparse
    return build_model(cfg)


@pytest.mark.parametrize(("kind", "cls"), [("lazy_adam", LazyAdam), ("adam", torch.optim.Adam)])
def test_values_get_their_own_constant_lr_optimizer(kind, cls):
    model = model_with_memory(sparse=kind == "lazy_adam")
    opt = build_optimizers(model, model.value_parameters(), OptimConfig(value_optimizer=kind))
    (values,) = model.value_parameters()
    base_ids = {id(p) for g in opt.base.param_groups for p in g["params"]}
    assert id(values) not in base_ids
    assert len(base_ids) + 1 == len(list(model.parameters()))
    assert isinstance(opt.values, cls) and opt.values.param_groups[0]["lr"] == 1e-3
    for _ in range(3):
        opt.base.step()  # no gradients: only the schedule moves
        opt.schedule.step()
    assert opt.values.param_groups[0]["lr"] == 1e-3  # constant, no warmup (as XLM)
    assert opt.base.param_groups[0]["lr"] == pytest.approx(2.5e-4 * 4 / 4000)


def test_optimizers_without_memory_have_no_value_optimizer():
    model = build_model(ModelConfig(n_layers=1, dim=16, n_heads=2, vocab_size=20, max_seq_len=8))
    opt = build_optimizers(model, model.value_parameters(), OptimConfig())
    assert opt.values is None and opt.all == [opt.base]
    assert opt.state_dict()["values"] is None


def test_checkpoints_are_complete_or_ignored_and_pruned(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, {"tokens": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002.pt", "step_0000003.pt"]
    # A killed writer leaves a temporary file or a .pt without its JSON: neither counts.
    (tmp_path / "checkpoints" / "step_0000004.pt").write_bytes(b"partial")
    (tmp_path / "checkpoints" / ".step_0000005.pt.tmp123").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step_0000003.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path))["x"].item() == 3
    meta = json.loads((tmp_path / "checkpoints" / "step_0000003.json").read_text())
    assert meta == {"step": 3, "tokens": 3}
    with pytest.raises(FileNotFoundError, match="step_0000009.pt"):
        load_checkpoint(tmp_path / "checkpoints" / "step_0000009.pt")


def test_truncate_metrics_and_plot(tmp_path):
    recs = [{"kind": "train", "step": s, "tokens": 10 * s, "loss": 5.0 / s} for s in (1, 2, 3)]
    recs.append({"kind": "eval", "step": 2, "tokens": 20, "split": "valid", "loss": 3.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 2]
    assert plot_loss(tmp_path).stat().st_size > 0


def test_memory_stats_restores_the_accumulators_it_replaced():
    model = model_with_memory(sparse=True)
    x = torch.randint(0, 20, (2, 8))
    with memory_stats(model) as outer:
        model(x)
        reads = outer[1].counts.sum().item()
        with memory_stats(model) as inner:  # an evaluation inside training
            model(x)
        assert model.memories[1].stats is outer[1]
        assert outer[1].counts.sum().item() == reads == inner[1].counts.sum().item() > 0
    assert model.memories[1].stats is None


def test_checkpoints_load_on_the_cpu_and_rng_states_restore(tmp_path):
    state = {"rng": torch.get_rng_state(), "w": torch.arange(3.0)}
    save_checkpoint(tmp_path, 1, state, {}, keep=1)
    for mmap in (True, False):
        loaded = load_checkpoint(latest_checkpoint(tmp_path), mmap=mmap)
        assert loaded["w"].device.type == "cpu" and torch.equal(loaded["w"], state["w"])
        torch.set_rng_state(loaded["rng"])  # raises unless a CPU ByteTensor


def tiny_trainer(precision: str) -> Trainer:
    cfg = TrainConfig(
        data=DataConfig(seq_len=8),
        model=ModelConfig(n_layers=2, dim=16, n_heads=2, vocab_size=20),
        # No warmup: a step moves every parameter by ~lr, so "nothing moved" means something.
        optim=OptimConfig(warmup_steps=0),
        train=TrainLoopConfig(batch_size=4, micro_batch_size=2, precision=precision, device="cpu"),
    )
    cfg.model.memory.layers, cfg.model.memory.n_keys, cfg.model.memory.k_dim = [1], 4, 8
    cfg.model.memory.heads, cfg.model.memory.knn = 1, 2
    return Trainer(cfg, DistEnv(0, 0, 1, torch.device("cpu")), data=False)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_train_step_returns_its_numbers_and_skips_non_finite_gradients(precision):
    trainer = tiny_trainer(precision)
    batch = torch.randint(0, 20, (4, 9))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train_step(batch)
    assert not result.skipped and torch.isfinite(result.grad_norm)
    assert result.loss.dtype == torch.float64 and result.lr == trainer.cfg.optim.lr
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "tok_emb.weight" in moved and any("values" in n for n in moved)
    with torch.no_grad():
        trainer.model.pos_emb.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train_step(batch)
    assert result.skipped
    for name, p in trainer.model.named_parameters():  # no optimiser moved anything, bit for bit
        assert torch.equal(p.isnan(), before[name].isnan()), name
        assert torch.equal(p.nan_to_num(), before[name].nan_to_num()), name
