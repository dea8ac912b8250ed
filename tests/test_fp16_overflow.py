"""An fp16 overflow in any gradient skips the whole step: no optimizer moves a weight, the loss
scale halves, training goes on. On the default device (the CPU here) and on CUDA."""

from __future__ import annotations

import pytest
import torch
from tiny_trainer import build_trainer

from pkm_lm.checkpoint import list_checkpoints, load_checkpoint
from pkm_lm.metrics import read_metrics

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


@pytest.mark.parametrize("device", [None, CUDA], ids=["default-device", "cuda"])
@pytest.mark.parametrize(
    "poisoned, extra",
    [
        ("network", []),
        ("values", []),
        ("values", ["model.memory.sparse_grad=false", "optim.value_optimizer=adam"]),
    ],
    ids=["network-params", "lazy-adam-values", "adam-values"],
)
def test_an_overflow_in_one_optimizers_gradients_skips_every_optimizer(
    ids_data, tmp_path, device, poisoned, extra
):
    run = tmp_path / "run"
    trainer = build_trainer(
        ids_data, device, run, "train.precision=fp16", "train.max_steps=3",
        "train.log_interval=1", "train.eval_interval=3", "train.checkpoint_interval=1",
        "train.keep_checkpoints=3", "model.dropout=0", "model.attn_dropout=0", *extra,
    )  # fmt: skip
    values = trainer.model.memories[2].values.weight
    target = values if poisoned == "values" else trainer.model.tok_emb.weight
    calls = [0]

    def poison(grad):  # step 2's gradient overflows (inf, and nan where it was 0)
        calls[0] += 1
        return grad * float("inf") if calls[0] == 2 else grad

    target.register_hook(poison)
    trainer.fit()
    one, two, three = (load_checkpoint(p) for p in list_checkpoints(run))
    assert (one["step"], two["step"], three["step"]) == (1, 2, 3)
    assert (two["skipped_steps"], three["skipped_steps"]) == (1, 1)
    assert two["scaler"]["scale"] == one["scaler"]["scale"] / 2
    params = [n for n, _ in trainer.model.named_parameters()]  # BN statistics move regardless
    for name in params:
        assert torch.equal(one["model"][name], two["model"][name]), (
            f"an overflow in the {poisoned} gradients at step 2, yet {name} moved: every "
            "optimizer must skip the step"
        )
    moved = [n for n in params if not torch.equal(two["model"][n], three["model"][n])]
    assert any(n.endswith("values.weight") for n in moved) and len(moved) > 1  # step 3 trains
    for name in params:
        assert torch.isfinite(three["model"][name]).all(), name
    losses = [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
