"""ProductKeyMemory against explicit references: exact top-k, forward, gradients, modes."""

import pytest
import torch

from pkm_lm.memory import MemoryConfig, ProductKeyMemory, layer


def make(n_keys=8, heads=2, knn=4, k_dim=8, dim=12, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = MemoryConfig(n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim, **kw)
    return ProductKeyMemory(dim, dim, cfg).to(dtype)


def all_product_keys(sub_keys):
    """(H, 2, n, d/2) -> (H, n*n, d): key i*n + j is [c_i, c'_j]."""
    h, _, n, half = sub_keys.shape
    left = sub_keys[:, 0, :, None, :].expand(h, n, n, half)
    right = sub_keys[:, 1, None, :, :].expand(h, n, n, half)
    return torch.cat([left, right], -1).reshape(h, n * n, 2 * half)


def reference_forward(mem, x):
    """Score all keys, top-k, softmax, gather, weighted sum over knn and heads."""
    q = mem.query(x)
    keys = all_product_keys(mem.sub_keys) if mem.config.keys == "product" else mem.keys
    scores, idx = torch.einsum("nhd,hkd->nhk", q, keys).topk(mem.config.knn, dim=-1)
    weights = torch.softmax(scores, -1)
    return (weights[..., None] * mem.values.weight[idx]).sum((1, 2)), scores, idx


SHAPES = [  # n_keys, heads, knn, k_dim, tokens
    (2, 1, 1, 2, 5),
    (2, 2, 2, 4, 7),
    (3, 1, 3, 6, 4),
    (5, 3, 1, 4, 9),
    (16, 4, 16, 8, 9),
    (16, 2, 5, 8, 10),
    (32, 1, 32, 16, 6),
    (33, 3, 7, 4, 20),
    (64, 4, 32, 16, 12),
]


@pytest.mark.parametrize("n_keys,heads,knn,k_dim,n", SHAPES)
def test_select_equals_exhaustive_search(n_keys, heads, knn, k_dim, n):
    mem = make(n_keys, heads, knn, k_dim, seed=n_keys * 100 + knn)
    q = torch.randn(n, heads, k_dim, dtype=torch.float64)
    scores, idx = mem.select(q)
    assert scores.shape == idx.shape == (n, heads, knn)
    ref_scores, ref_idx = torch.einsum("nhd,hkd->nhk", q, all_product_keys(mem.sub_keys)).topk(
        knn, dim=-1
    )
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-12)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    assert (scores[..., :-1] >= scores[..., 1:]).all(), "scores must be sorted descending"
    assert idx.min() >= 0 and idx.max() < n_keys**2


def test_flat_keys_set_to_cartesian_product_give_product_result():
    prod = make(n_keys=16, heads=3, knn=8, k_dim=8, query_norm="none")
    flat = make(n_keys=16, heads=3, knn=8, k_dim=8, query_norm="none", keys="flat")
    with torch.no_grad():
        flat.query_net.load_state_dict(prod.query_net.state_dict())
        flat.values.weight.copy_(prod.values.weight)
        flat.keys.copy_(all_product_keys(prod.sub_keys))
    x = torch.randn(11, 12, dtype=torch.float64)
    s_p, i_p = prod.select(prod.query(x))
    s_f, i_f = flat.select(flat.query(x))
    torch.testing.assert_close(s_p, s_f)
    assert torch.equal(i_p, i_f)
    torch.testing.assert_close(prod(x), flat(x))


def test_flat_keys_chunked_selection_is_exhaustive():
    from pkm_lm.memory.select import flat_topk

    torch.manual_seed(1)
    q, keys = torch.randn(6, 2, 4, dtype=torch.float64), torch.randn(2, 100, 4, dtype=torch.float64)
    scores, idx = flat_topk(q, keys, knn=9, chunk_size=7)  # chunks smaller than knn too
    ref_scores, ref_idx = torch.einsum("nhd,hkd->nhk", q, keys).topk(9, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("keys", ["product", "flat"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_forward_and_gradients_equal_reference(keys, sparse_grad):
    mem = make(n_keys=8, heads=3, knn=5, k_dim=8, keys=keys, sparse_grad=sparse_grad)
    mem.train()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    target = torch.randn(2, 7, 12, dtype=torch.float64)

    out = mem(x)
    ((out - target) ** 2).sum().backward()
    grads = {n: p.grad.to_dense() for n, p in mem.named_parameters()}
    mem.zero_grad(set_to_none=True)

    ref, _, idx = reference_forward(mem, x.reshape(-1, 12))
    torch.testing.assert_close(out.reshape(-1, 12), ref, rtol=1e-10, atol=1e-12)
    ((ref - target.reshape(-1, 12)) ** 2).sum().backward()
    for name, p in mem.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)

    touched = torch.zeros(mem.config.n_slots, dtype=torch.bool)
    touched[idx.reshape(-1)] = True
    nonzero_rows = grads["values.weight"].abs().sum(1) > 0
    assert torch.equal(nonzero_rows, touched), "only selected value rows get gradient"


def test_sparse_value_gradient_has_one_row_per_touched_slot():
    mem = make(sparse_grad=True)
    mem(torch.randn(9, 12, dtype=torch.float64)).sum().backward()
    grad = mem.values.weight.grad
    assert grad.is_sparse
    rows = grad._indices()[0]
    assert (rows[1:] > rows[:-1]).all(), "one gradient row per touched slot, sorted"
    assert rows.numel() <= 9 * mem.config.heads * mem.config.knn


def test_leading_dimensions_and_output_size():
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=4, heads=2, knn=3, k_dim=6, v_dim=5, gated=True, query_net="mlp")
    mem = ProductKeyMemory(10, 7, cfg)
    assert mem(torch.randn(2, 3, 4, 10)).shape == (2, 3, 4, 7)
    assert mem.values.weight.shape == (16, 5)
    assert mem.sub_keys.shape == (2, 2, 4, 3)


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    mem = ProductKeyMemory(32, 64, MemoryConfig(n_keys=64, heads=2, knn=4, k_dim=32))
    bound = 1 / 16**0.5
    assert mem.sub_keys.abs().max() <= bound and mem.sub_keys.abs().max() > 0.9 * bound
    std = mem.values.weight.std().item()
    assert abs(std - 64**-0.5) < 0.05 * 64**-0.5


def test_value_draw_in_blocks_equals_one_draw_and_splits_into_its_columns(monkeypatch):
    """draw_values_ in blocks of 16 rows continues the CPU generator as one draw of the whole
    table does, and ranks drawing their columns of a split table hold that same table."""
    monkeypatch.setattr(layer, "draw_rows", lambda width: 16)
    rows, width = 50, 12  # 3 whole blocks and a part
    torch.manual_seed(3)
    reference = torch.empty(rows, width).normal_(0.0, width**-0.5)
    after = torch.rand(1)
    torch.manual_seed(3)
    table = torch.empty(rows, width)
    layer.draw_values_(table, width, slice(0, width))
    assert torch.equal(table, reference) and torch.equal(torch.rand(1), after)
    parts = []
    for rank in range(3):
        torch.manual_seed(3)
        parts.append(torch.empty(rows, width // 3))
        layer.draw_values_(parts[-1], width, slice(rank * 4, rank * 4 + 4))
    assert torch.equal(torch.cat(parts, 1), reference)


def test_query_batchnorm_uses_batch_statistics_in_training_only():
    mem = make(dtype=torch.float32)
    x = torch.randn(64, 12) * 3 + 1
    mem.train()
    q = mem.query(x).reshape(64, -1)
    torch.testing.assert_close(q.mean(0), torch.zeros(q.shape[1]), atol=1e-5, rtol=0)
    assert mem.query_norm.num_batches_tracked.item() == 1
    mem.eval()
    alone = mem.query(x[:1])
    torch.testing.assert_close(alone, mem.query(x)[:1])  # independent of the batch in eval
    assert mem.query_norm.num_batches_tracked.item() == 1


def test_dropout_only_in_training():
    drop = dict(input_dropout=0.5, query_dropout=0.5, value_dropout=0.5)
    mem, plain = make(dtype=torch.float32, **drop), make(dtype=torch.float32)
    plain.load_state_dict(mem.state_dict())
    x = torch.randn(16, 12)
    mem.eval(), plain.eval()
    torch.testing.assert_close(mem(x), plain(x))
    mem.train()
    assert not torch.allclose(mem(x), mem(x))


AUTOCAST_TOL = [(torch.bfloat16, 2e-2, 0.75), (torch.float16, 3e-3, 0.9)]


def assert_autocast_matches_fp32(mem, x, device: str, dtype, tol: float, min_agree: float):
    """``mem`` under autocast on ``device`` against itself in fp32 on the CPU: low-precision
    scores may swap near-tied slots at the top-k boundary, so most selections agree, and where
    a whole row's selection agrees, scores and output match to the dtype's rounding. Then a
    training step's gradients are finite."""
    mem.eval()
    ref_scores, ref_idx = mem.select(mem.query(x))
    ref = mem(x)
    mem, x = mem.to(device), x.to(device)
    with torch.autocast(device, dtype=dtype):
        scores, idx = mem.select(mem.query(x))
        out = mem(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    scores, idx, out = scores.cpu(), idx.cpu(), out.cpu()
    agree = (idx.sort(-1).values == ref_idx.sort(-1).values).all(-1)  # (N, H)
    assert agree.float().mean() >= min_agree, agree.float().mean()
    torch.testing.assert_close(scores.float()[agree], ref_scores[agree], rtol=tol, atol=tol)
    rows = agree.all(-1)
    assert rows.float().mean() >= min_agree**mem.config.heads / 2, rows.float().mean()
    torch.testing.assert_close(out[rows], ref[rows], rtol=tol, atol=tol)
    mem.train()
    with torch.autocast(device, dtype=dtype):
        mem(x).float().pow(2).mean().backward()
    assert all(
        torch.isfinite(p.grad.to_dense()).all() for p in mem.parameters() if p.grad is not None
    )


@pytest.mark.parametrize("dtype,tol,min_agree", AUTOCAST_TOL)
def test_autocast_runs_and_matches_fp32(dtype, tol, min_agree):
    mem = make(n_keys=32, heads=4, knn=8, k_dim=32, dim=64, dtype=torch.float32)
    assert_autocast_matches_fp32(mem, torch.randn(64, 64), "cpu", dtype, tol, min_agree)


@pytest.mark.parametrize("keys", ["product", "flat"])
@pytest.mark.parametrize("batchnorm", [True, False])
def test_autocast_selects_exactly_the_fp32_slots(keys, batchnorm):
    """Under bf16 autocast the layer's selection equals the fp32 selection on its own queries."""
    mem = make(n_keys=32, heads=4, knn=16, k_dim=32, dim=64, dtype=torch.float32, keys=keys)
    if not batchnorm:
        mem.query_norm = None  # queries then leave the query network in bf16
    mem.eval()
    x = torch.randn(256, 64)
    seen, select = [], mem.select

    def recording_select(q):
        seen.append((q, *select(q)))
        return seen[-1][1:]

    mem.select = recording_select
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mem(x)
    (query, scores, idx), (ref_scores, ref_idx) = seen[0], select(seen[0][0].float())
    assert query.dtype == (torch.float32 if batchnorm else torch.bfloat16)
    assert scores.dtype == torch.float32 and out.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores, ref_scores)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol,min_agree", AUTOCAST_TOL)
def test_cuda_autocast_matches_cpu_fp32(dtype, tol, min_agree):
    mem = make(n_keys=64, heads=4, knn=16, k_dim=64, dim=128, dtype=torch.float32, sparse_grad=True)
    assert_autocast_matches_fp32(mem, torch.randn(256, 128), "cuda", dtype, tol, min_agree)
    assert mem.values.weight.grad.is_sparse
