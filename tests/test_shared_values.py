"""model.memory.share_values: one value table read by every memory layer, against a reference
whose layers hold their own tables tied by hand (equal values; the shared gradient is the sum of
theirs), on each value-read path; and the table through statistics, checkpoints and export."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from tiny_trainer import build_trainer

from pkm_lm.config import ModelConfig
from pkm_lm.data import Vocabulary
from pkm_lm.export import export
from pkm_lm.memory import MemoryConfig, ProductKeyMemory
from pkm_lm.memory.config import triton_installed
from pkm_lm.metrics import memory_stats, read_metrics
from pkm_lm.model import TransformerLM, build_model

LAYERS = [1, 3, 4]


def config(share: bool, **memory) -> ModelConfig:
    cfg = ModelConfig(
        n_layers=4, dim=32, n_heads=4, vocab_size=50, max_seq_len=16, dropout=0.0, attn_dropout=0.0
    )
    settings = dict(n_keys=8, heads=2, knn=4, k_dim=16, layers=LAYERS, gated=True, **memory)
    cfg.memory = type(cfg.memory)(share_values=share, **settings)
    return cfg


def shared_and_tied_by_hand(**memory) -> tuple[TransformerLM, TransformerLM]:
    """A model with one shared table, and one with a table per layer holding the same values."""
    shared = build_model(config(True, **memory)).double()
    separate = build_model(config(False, **memory)).double()
    separate.load_state_dict(shared.state_dict())  # every layer's table <- the shared values
    return shared, separate


def grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.to_dense() if p.grad.is_sparse else p.grad


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_shared_model_equals_tables_tied_by_hand(sparse):
    shared, separate = shared_and_tied_by_hand(sparse_grad=sparse)
    (table,) = shared.value_parameters()
    assert all(mem.values.weight is table for mem in shared.memories.values())
    assert len(separate.value_parameters()) == len(LAYERS)
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    outputs = [model(tokens) for model in (shared, separate)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-12)
    for out in outputs:
        out.logsumexp(-1).mean().backward()
    assert table.grad.is_sparse == sparse
    expected = sum(grad(p) for p in separate.value_parameters())
    torch.testing.assert_close(grad(table), expected, rtol=1e-10, atol=1e-12)
    tables = {id(p) for p in separate.value_parameters()}
    others = [(n, p) for n, p in separate.named_parameters() if id(p) not in tables]
    shared_params = dict(shared.named_parameters())
    for name, p in others:  # query networks, norms, keys, gates and the rest: unchanged
        torch.testing.assert_close(shared_params[name].grad, p.grad, rtol=1e-10, atol=1e-12)


HAS_CUDA = torch.cuda.is_available()
NO_TRITON = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
PATHS = [  # kernel, PKM_CPU_OPS, device
    pytest.param("torch", "0", "cpu", id="torch"),
    pytest.param("torch", "1", "cpu", id="cpp"),
    # Triton runs in its interpreter on CPU tensors without CUDA (tests/conftest.py), compiled
    # on the GPU with it.
    pytest.param(
        "triton",
        "0",
        "cpu",
        id="triton-interpreted",
        marks=[NO_TRITON, pytest.mark.skipif(HAS_CUDA, reason="CUDA present: Triton compiles")],
    ),
    pytest.param(
        "triton",
        "0",
        "cuda",
        id="triton-cuda",
        marks=[NO_TRITON, pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")],
    ),
]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("kernel,cpu_ops,device", PATHS)
def test_each_value_read_path_sums_the_layers_gradients(
    monkeypatch, kernel, cpu_ops, device, sparse
):
    """Two layers reading one table, on each path (PyTorch, the C++ CPU passes, Triton) against
    two layers with a copy each; a few tokens keep the Triton interpreter quick."""
    monkeypatch.setenv("PKM_CPU_OPS", cpu_ops)
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=4, heads=2, knn=3, k_dim=8, kernel=kernel, sparse_grad=sparse)
    first = ProductKeyMemory(8, 8, cfg).to(device)
    layers = [first, ProductKeyMemory(8, 8, cfg, values=first.values).to(device)]
    copies = [ProductKeyMemory(8, 8, cfg).to(device) for _ in layers]
    for layer, copy in zip(layers, copies, strict=True):
        copy.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 8, device=device)
    for mems in (layers, copies):
        (mems[1](mems[0](x) + x) * x).sum().backward()
    expected = grad(copies[0].values.weight) + grad(copies[1].values.weight)
    torch.testing.assert_close(grad(first.values.weight), expected, rtol=1e-5, atol=1e-6)
    assert first.values.weight.grad.is_sparse == sparse


def test_a_table_of_another_shape_is_refused():
    table = ProductKeyMemory(8, 8, MemoryConfig(n_keys=4, heads=1, knn=2, k_dim=4)).values
    with pytest.raises(ValueError, match=r"shared value table of .* does not fit"):
        ProductKeyMemory(8, 8, MemoryConfig(n_keys=5, heads=1, knn=2, k_dim=4), values=table)


def test_parameter_counts_say_what_is_shared():
    shared, separate = (build_model(config(s), "meta") for s in (True, False))
    table = 8**2 * 32  # |K| x v_dim
    assert separate.num_params() - shared.num_params() == (len(LAYERS) - 1) * table
    assert shared.param_summary() == (
        f"{shared.num_params():,} parameters ({table:,} in memory values: one table read by "
        f"the memories of layers {LAYERS})"
    )
    assert separate.param_summary().endswith(f"({3 * table:,} in memory values: 3 tables)")
    # The memory layers sharing a table keep their own query network, norm and keys.
    a, b = shared.memories[1], shared.memories[3]
    assert a.values is b.values and a.owns_values and not b.owns_values
    assert a.query_net.weight is not b.query_net.weight and a.sub_keys is not b.sub_keys
    assert a.query_norm is not b.query_norm and a.gate is not b.gate


def test_usage_per_layer_and_for_the_table():
    shared, _ = shared_and_tied_by_hand()
    with memory_stats(shared) as stats, torch.no_grad():
        shared(torch.randint(0, 50, (2, 10)))
    assert sorted(stats, key=str) == [*LAYERS, "table"]
    layers = [stats[layer] for layer in LAYERS]
    assert all(s.counts.sum().item() == 2 * 10 * 2 * 4 for s in layers)  # tokens x heads x knn
    torch.testing.assert_close(stats["table"].counts, sum(s.counts for s in layers))
    torch.testing.assert_close(stats["table"].weights, sum(s.weights for s in layers))
    usage = stats["table"].compute()["usage"]
    assert max(s.compute()["usage"] for s in layers) <= usage <= 100.0


def test_train_checkpoint_evaluate_and_export(corpus, tmp_path):
    """Sparse gradients and LazyAdam (the trainer's defaults) on a shared table, through a
    training step, a resumed checkpoint, an evaluation, and an export read back alone."""
    overrides = ["model.memory.layers=[1,2]", "model.memory.share_values=true"]
    overrides += ["train.max_steps=2", "train.eval_interval=2", "train.checkpoint_interval=2"]
    trainer = build_trainer(corpus, "cpu", tmp_path / "run", *overrides)
    (table,) = trainer.model.value_parameters()
    assert trainer.sparse_grads.params == [table]
    assert [p for g in trainer.optim.values.param_groups for p in g["params"]] == [table]
    before = table.detach().clone()
    trainer.fit()
    assert not torch.equal(before, table)
    assert trainer.model.memories[1].values.weight is trainer.model.memories[2].values.weight

    resumed = build_trainer(corpus, "cpu", tmp_path / "run", *overrides)
    assert resumed.step == 2 and torch.equal(resumed.model.value_parameters()[0], table)
    assert resumed.model.memories[1].values is resumed.model.memories[2].values

    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert set(evals[-1]["memory"]) == {"1", "2", "table"}

    out = export(trainer.model, Vocabulary.load(corpus), tmp_path / "export")
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = [k for k in f.keys() if k.endswith("values.weight")]
    assert stored == ["blocks.0.ffn.fn.values.weight"]  # the table once
    loaded = TransformerLM.from_pretrained(out)
    assert loaded.memories[1].values is loaded.memories[2].values
    ids = torch.randint(0, loaded.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), trainer.model.eval()(ids))
