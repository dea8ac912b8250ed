"""The Transformer LM: memory placement, causality, meta-device build, synced BatchNorm."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pkm_lm.config import ModelConfig
from pkm_lm.distributed import SyncedBatchNorm1d, all_reduce_sparse_grads_
from pkm_lm.memory import ProductKeyMemory
from pkm_lm.model import FeedForward, build_model

torch.set_num_threads(1)


def tiny(**memory) -> ModelConfig:
    cfg = ModelConfig(
        n_layers=4, dim=32, n_heads=4, vocab_size=50, max_seq_len=16, dropout=0.0, attn_dropout=0.0
    )
    for k, v in {"n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16, **memory}.items():
        setattr(cfg.memory, k, v)
    cfg.memory.__post_init__()
    cfg.__post_init__()
    return cfg


def kinds(model) -> list[tuple[str, str | None]]:
    """Per block: what its FFN slot holds, and what follows the block."""
    return [
        (type(b.ffn.fn).__name__, type(b.mem.fn).__name__ if b.mem is not None else None)
        for b in model.blocks
    ]


def test_explicit_layers_replace_the_ffn_one_based():
    model = build_model(tiny(layers=[2, 4]))
    mem, ffn = "ProductKeyMemory", "FeedForward"
    assert kinds(model) == [(ffn, None), (mem, None), (ffn, None), (mem, None)]
    assert sorted(model.memories) == [2, 4]
    assert model.memories[2] is model.blocks[1].ffn.fn


def test_add_keeps_the_ffn_and_follows_the_block():
    model = build_model(tiny(layers=[3], position="add"))
    assert kinds(model)[2] == ("FeedForward", "ProductKeyMemory")
    assert sum(isinstance(m, FeedForward) for m in model.modules()) == 4
    assert sum(isinstance(m, ProductKeyMemory) for m in model.modules()) == 1


def test_count_spreads_memories_evenly():
    model = build_model(tiny(count=1))
    assert sorted(model.memories) == [2]  # ceil(4 / 2) = 2
    assert sum(isinstance(m, ProductKeyMemory) for m in model.modules()) == 1


def test_no_memory_by_default():
    model = build_model(tiny())
    assert model.memories == {} and model.value_parameters() == []


def test_meta_build_allocates_nothing_and_init_is_seeded():
    cfg = tiny(layers=[2])
    meta = build_model(cfg, "meta")
    assert all(t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(0)
    b = build_model(cfg)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.isfinite(x.float()).all(), name
        assert torch.equal(x, y), name
    # Embeddings N(0, dim^-1/2); query BN starts as identity with fresh running stats.
    assert abs(a.tok_emb.weight.std().item() - 32**-0.5) < 0.03
    bn = a.memories[2].query_bn
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("position", ["replace", "add"])
def test_causal_and_shapes(norm, position):
    cfg = tiny(layers=[2], position=position)
    cfg.norm = norm
    model = build_model(cfg).eval()
    x = torch.randint(0, 50, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 10, 50)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_output_is_tied_to_token_embedding():
    model = build_model(tiny(layers=[2]))
    names = [n for n, _ in model.named_parameters()]
    assert not any("head" in n for n in names)
    model.tok_emb.weight.grad = None
    model(torch.randint(0, 50, (1, 4))).sum().backward()
    assert model.tok_emb.weight.grad is not None


def test_value_parameters_get_sparse_gradients():
    model = build_model(tiny(layers=[2], sparse_grad=True))
    model(torch.randint(0, 50, (2, 8))).logsumexp(-1).mean().backward()
    (values,) = model.value_parameters()
    assert values.grad.is_sparse


def test_too_long_input_is_rejected():
    model = build_model(tiny())
    with pytest.raises(ValueError, match="model.max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def _synced_bn_worker(rank: int, port: int, x: torch.Tensor, w: torch.Tensor, out) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = SyncedBatchNorm1d(x.shape[1])
    xr = x[rank * 3 : rank * 3 + 3].clone().requires_grad_()
    (bn(xr) * w[rank * 3 : rank * 3 + 3]).sum().backward()
    # numpy, not tensors: torch would share their memory with a process that is about to exit
    tensors = (xr.grad, bn.weight.grad, bn.running_mean, bn.running_var)
    out.put((rank, *(t.detach().numpy() for t in tensors)))
    dist.destroy_process_group()


def test_synced_batchnorm_over_two_ranks_equals_batchnorm_on_the_union():
    x, w = torch.randn(6, 5), torch.randn(6, 5)
    ref = torch.nn.BatchNorm1d(5)
    xg = x.clone().requires_grad_()
    (ref(xg) * w).sum().backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_synced_bn_worker, args=(port, x, w, out), nprocs=2, start_method="spawn")
    results = sorted([out.get(), out.get()], key=lambda r: r[0])
    results = [[r[0], *(torch.from_numpy(a) for a in r[1:])] for r in results]
    grad_x = torch.cat([r[1] for r in results])
    assert torch.allclose(grad_x, xg.grad, atol=1e-5)
    # Each rank's affine gradient is its share; DDP sums them (and divides by 2 for the mean).
    assert torch.allclose(results[0][2] + results[1][2], ref.weight.grad, atol=1e-5)
    for r in results:
        assert torch.allclose(r[3], ref.running_mean, atol=1e-6)
        assert torch.allclose(r[4], ref.running_var, atol=1e-6)


def test_synced_batchnorm_is_plain_batchnorm_in_one_process():
    bn = torch.nn.BatchNorm1d(4)
    synced = SyncedBatchNorm1d.from_batchnorm(bn)
    x = torch.randn(8, 4)
    assert torch.allclose(bn(x), synced(x))
    assert synced.state_dict().keys() == bn.state_dict().keys()


def _sparse_grads_worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    p = torch.nn.Parameter(torch.zeros(8, 3))
    rows = [[1, 3], [3, 5, 7, 7]][rank]  # uneven and uncoalesced on rank 1
    p.grad = torch.sparse_coo_tensor([rows], torch.ones(len(rows), 3) * (rank + 1), (8, 3))
    all_reduce_sparse_grads_([p])
    out.put((rank, p.grad.is_sparse, p.grad.to_dense().numpy()))
    dist.destroy_process_group()


def test_sparse_gradients_are_averaged_over_ranks_with_uneven_rows():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_sparse_grads_worker, args=(port, out), nprocs=2, start_method="spawn")
    expected = torch.zeros(8, 3)
    expected[[1, 3]] += 1.0
    expected[3] += 2.0
    expected[5] += 2.0
    expected[7] += 4.0
    for _ in range(2):
        _, is_sparse, grad = out.get()
        assert is_sparse
        assert torch.allclose(torch.from_numpy(grad), expected / 2)
