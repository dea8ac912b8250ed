"""LazyAdam against straightforward references; clip_grad_norm_ with sparse gradients."""

import pytest
import torch

from pkm_lm.memory import LazyAdam, MemoryConfig, ProductKeyMemory, clip_grad_norm_

LR, BETAS, EPS = 1e-2, (0.9, 0.98), 1e-8


def sparse_grad(rows, values, shape):
    return torch.sparse_coo_tensor(torch.tensor(rows)[None], values, shape, check_invariants=True)


def reference_lazy_adam(param, grads):
    """Row by row: each touched row takes an Adam step with the shared step counter."""
    p = param.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, (rows, values) in enumerate(grads, start=1):
        for row, g in zip(rows, values, strict=True):
            m[row] = BETAS[0] * m[row] + (1 - BETAS[0]) * g
            v[row] = BETAS[1] * v[row] + (1 - BETAS[1]) * g * g
            m_hat, v_hat = m[row] / (1 - BETAS[0] ** t), v[row] / (1 - BETAS[1] ** t)
            p[row] -= LR * m_hat / (v_hat.sqrt() + EPS)
    return p


def test_sparse_step_equals_row_wise_reference():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(10, 3, dtype=torch.float64))
    start = param.detach().clone()
    steps = [
        ([1, 4, 7], torch.randn(3, 3)),
        ([0, 4], torch.randn(2, 3)),
        ([4, 9], torch.randn(2, 3)),
    ]
    steps = [(rows, g.double()) for rows, g in steps]
    opt = LazyAdam([param], lr=LR, betas=BETAS, eps=EPS)
    for rows, values in steps:
        param.grad = sparse_grad(rows, values, param.shape)
        opt.step()
    torch.testing.assert_close(param.detach(), reference_lazy_adam(start, steps))
    untouched = [2, 3, 5, 6, 8]
    assert torch.equal(param.detach()[untouched], start[untouched])


def test_duplicate_rows_are_summed_like_a_coalesced_gradient():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 2))
    b = torch.nn.Parameter(a.detach().clone())
    g = torch.randn(3, 2)
    a.grad = sparse_grad([3, 1, 3], g, a.shape)  # uncoalesced, as after a DDP all-reduce
    b.grad = sparse_grad([1, 3], torch.stack([g[1], g[0] + g[2]]), b.shape)
    LazyAdam([a], lr=LR).step()
    LazyAdam([b], lr=LR).step()
    torch.testing.assert_close(a, b)


def test_dense_gradients_follow_torch_adam():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(a.detach().clone())
    lazy, adam = LazyAdam([a], LR, BETAS, EPS), torch.optim.Adam([b], LR, BETAS, EPS, foreach=False)
    for _ in range(5):
        g = torch.randn(5, 4)
        a.grad, b.grad = g.clone(), g.clone()
        lazy.step()
        adam.step()
    torch.testing.assert_close(a, b)


def test_lazy_equals_dense_adam_when_every_row_is_touched():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    lazy, adam = LazyAdam([a], LR, BETAS, EPS), torch.optim.Adam([b], LR, BETAS, EPS)
    for _ in range(4):
        g = torch.randn(4, 3)
        a.grad, b.grad = sparse_grad([0, 1, 2, 3], g, a.shape), g
        lazy.step()
        adam.step()
    torch.testing.assert_close(a, b)


def test_layer_sparse_and_dense_gradients_agree():
    grads = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        mem = ProductKeyMemory(
            8, 8, MemoryConfig(n_keys=6, heads=2, knn=4, k_dim=4, sparse_grad=sparse)
        )
        mem(torch.randn(7, 8)).pow(2).sum().backward()
        grads[sparse] = mem.values.weight.grad.to_dense()
    torch.testing.assert_close(grads[True], grads[False])


def test_clip_grad_norm_counts_sparse_gradients():
    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(3, 2))
    table = torch.nn.Parameter(torch.randn(6, 2))
    dense.grad = torch.randn(3, 2)
    table.grad = sparse_grad([4, 1, 4], torch.randn(3, 2), table.shape)
    ref = [dense.grad.clone(), table.grad.to_dense()]
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in ref]))
    total = clip_grad_norm_([dense, table], max_norm=0.5)
    torch.testing.assert_close(total, expected)
    scale = 0.5 / (expected + 1e-6)
    torch.testing.assert_close(dense.grad, ref[0] * scale)
    torch.testing.assert_close(table.grad.to_dense(), ref[1] * scale)
    assert clip_grad_norm_([dense, table], max_norm=10.0) == pytest.approx(0.5, rel=1e-4)


def test_invalid_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match="betas"):
        LazyAdam([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0))


def test_row_wise_variance_keeps_one_second_moment_per_row():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    start = param.detach().clone()
    opt = LazyAdam([param], lr=LR, betas=BETAS, eps=EPS, row_wise=True)
    m, v = torch.zeros(6, 4, dtype=torch.float64), torch.zeros(6, 1, dtype=torch.float64)
    expected = start.clone()
    for t, rows in enumerate([[0, 2], [2, 5], [1, 2, 3]], start=1):
        g = torch.randn(len(rows), 4, dtype=torch.float64)
        param.grad = sparse_grad(rows, g, param.shape)
        opt.step()
        for row, g_row in zip(rows, g, strict=True):
            m[row] = BETAS[0] * m[row] + (1 - BETAS[0]) * g_row
            v[row] = BETAS[1] * v[row] + (1 - BETAS[1]) * (g_row**2).mean()
            denom = (v[row] / (1 - BETAS[1] ** t)).sqrt() + EPS
            expected[row] -= LR * m[row] / (1 - BETAS[0] ** t) / denom
    assert opt.state[param]["exp_avg_sq"].shape == (6, 1)
    torch.testing.assert_close(param.detach(), expected)


def test_scratch_buffers_grow_with_the_number_of_touched_rows(monkeypatch):
    monkeypatch.setenv("PKM_CPU_OPS", "0")  # the PyTorch path (the C++ keeps no scratch)
    param = torch.nn.Parameter(torch.zeros(50, 2))
    opt = LazyAdam([param])
    for rows in ([1, 2], list(range(40)), [3]):
        param.grad = sparse_grad(rows, torch.ones(len(rows), 2), param.shape)
        opt.step()
        assert opt._scratch[param]["m"].shape[0] >= len(rows)
    assert (param.detach()[:40] < 0).all() and (param.detach()[40:] == 0).all()
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}, "no scratch"
