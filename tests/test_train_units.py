"""Trainer pieces in-process: schedule, optimiser split, checkpoint files, metrics file."""

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
from pkm_lm.config import ModelConfig, OptimConfig
from pkm_lm.memory import LazyAdam
from pkm_lm.metrics import plot_loss, read_metrics, truncate_metrics
from pkm_lm.model import build_model
from pkm_lm.optim import build_optimizers, inverse_sqrt


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
