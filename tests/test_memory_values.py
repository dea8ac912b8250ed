"""The value read's backward pieces against plain references: touched rows, row gradients, the
fixed-size sparse gradient used off the CPU, LazyAdam on such a gradient, and the fused C++ CPU
passes against the PyTorch compositions."""

import pytest
import torch

import pkm_lm.memory.optim
import pkm_lm.memory.values
from pkm_lm.memory import LazyAdam, sparse_rows
from pkm_lm.memory.cpu_ops import cpu_ops
from pkm_lm.memory.values import reusable_empty, row_gradients, touched_rows, value_bag

PATHS = ["fused", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run a test on the fused C++ CPU passes and on the PyTorch compositions."""
    if request.param == "fused" and cpu_ops() is None:
        pytest.skip("the fused CPU ops cannot be built here (no C++ compiler?)")
    if request.param == "torch":
        for module in (pkm_lm.memory.values, pkm_lm.memory.optim):
            monkeypatch.setattr(module, "fused_cpu", lambda *tensors: None)
    return request.param


def reads(n=9, per_bag=6, n_rows=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n_rows, (n, per_bag), generator=g)
    indices[:1, 1:] = indices[:1, :1]  # the same slot several times within one token
    weights = torch.rand(n, per_bag, generator=g, dtype=torch.float64)
    grad_out = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return indices, weights, grad_out


def dense_reference(indices, weights, grad_out, n_rows):
    """Table gradient by autograd through an explicit gather."""
    table = torch.zeros(n_rows, grad_out.shape[1], dtype=grad_out.dtype, requires_grad=True)
    (weights[..., None] * table[indices]).sum(1).backward(grad_out)
    return table.grad


@pytest.mark.parametrize("n,n_rows", [(9, 40), (9, 30), (30, 10), (1, 1000), (0, 12)])
@pytest.mark.parametrize("exact", [True, False])
def test_touched_rows_cover_every_read_once(n, n_rows, exact):
    indices, _, _ = reads(n=n, n_rows=n_rows)
    rows = touched_rows(indices.reshape(-1), n_rows, exact)
    read = set(indices.reshape(-1).tolist())
    assert rows.tolist() == sorted(set(rows.tolist())), "ascending and unique"
    assert read <= set(rows.tolist())
    if exact:
        assert set(rows.tolist()) == read
    else:  # fixed size, padded with the lowest unread rows
        assert rows.numel() == min(indices.numel(), n_rows)
        padding = sorted(set(rows.tolist()) - read)
        unread = sorted(set(range(n_rows)) - read)
        assert padding == unread[: len(padding)]


@pytest.mark.parametrize("exact", [True, False])
def test_row_gradients_equal_the_dense_gradient_on_their_rows(exact, path):
    indices, weights, grad_out = reads()
    table = torch.randn(40, 5, dtype=torch.float64)
    ref = dense_reference(indices, weights, grad_out, 40)
    rows = touched_rows(indices.reshape(-1), 40, exact)
    grads, weight_grads = row_gradients(indices, weights, grad_out, rows, table)
    torch.testing.assert_close(grads, ref[rows])
    torch.testing.assert_close(weight_grads, (table[indices] * grad_out[:, None]).sum(-1))
    every, none = row_gradients(indices, weights, grad_out, torch.arange(40))
    torch.testing.assert_close(every, ref)
    assert none is None


@pytest.mark.parametrize("sparse", [False, True])
def test_value_bag_gradients_equal_autograd_through_a_gather(sparse, path):
    indices, weights, grad_out = reads(n=12, n_rows=25)
    table = torch.randn(25, 5, dtype=torch.float64, requires_grad=True)
    w = weights.clone().requires_grad_()
    value_bag(indices, w, table, sparse).backward(grad_out)
    t_ref = table.detach().clone().requires_grad_()
    w_ref = weights.clone().requires_grad_()
    (w_ref[..., None] * t_ref[indices]).sum(1).backward(grad_out)
    torch.testing.assert_close(w.grad, w_ref.grad)
    assert table.grad.is_sparse == sparse
    torch.testing.assert_close(table.grad.to_dense(), t_ref.grad)


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_and_torch_paths_agree_at_layer_scale(sparse, monkeypatch):
    """fp32, a 64^2-slot table, 256 tokens x 128 reads: the C++ pass equals the reference."""
    if cpu_ops() is None:
        pytest.skip("the fused CPU ops cannot be built here (no C++ compiler?)")
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 64**2, (256, 128), generator=g)
    weights = torch.rand(256, 128, generator=g)
    table = torch.randn(64**2, 48, generator=g)
    grad_out = torch.randn(256, 48, generator=g)
    grads = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(pkm_lm.memory.values, "fused_cpu", lambda *tensors: None)
        t, w = table.clone().requires_grad_(), weights.clone().requires_grad_()
        value_bag(indices, w, t, sparse).backward(grad_out)
        grads.append((t.grad.to_dense(), w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row_wise", [False, True])
def test_fused_lazy_adam_equals_the_torch_path(row_wise, monkeypatch):
    if cpu_ops() is None:
        pytest.skip("the fused CPU ops cannot be built here (no C++ compiler?)")
    g = torch.Generator().manual_seed(4)
    start = torch.randn(50, 24, generator=g, dtype=torch.float64)
    steps = []
    for _ in range(4):
        rows = torch.randperm(50, generator=g)[:20].sort().values
        values = torch.randn(20, 24, generator=g, dtype=torch.float64)
        values[3] = 0  # a padding row: left alone
        steps.append((rows, values))
    params = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(pkm_lm.memory.optim, "fused_cpu", lambda *tensors: None)
        p = torch.nn.Parameter(start.clone())
        opt = LazyAdam([p], lr=0.05, row_wise=row_wise)
        for rows, values in steps:
            p.grad = torch.sparse_coo_tensor(rows[None], values, p.shape, check_invariants=True)
            opt.step()
        params.append((p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_value_bag_on_an_empty_batch():
    table = torch.randn(7, 3, requires_grad=True)
    w = torch.ones(0, 4, requires_grad=True)
    out = value_bag(torch.zeros(0, 4, dtype=torch.long), w, table)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(table.grad, torch.zeros(7, 3)) and w.grad.shape == (0, 4)


def test_sparse_rows_merge_repeated_rows():
    values = torch.randn(5, 3)
    grad = torch.sparse_coo_tensor(
        torch.tensor([[4, 1, 4, 0, 1]]), values, (6, 3), check_invariants=True
    )
    rows, merged = sparse_rows(grad)
    assert rows.tolist() == [0, 1, 4]
    torch.testing.assert_close(merged, grad.coalesce().values())


def test_lazy_adam_leaves_rows_with_zero_gradient_alone(path):
    """The padded fixed-size gradient steps LazyAdam exactly as the gradient of the rows read."""
    indices, weights, grad_out = reads(n=4, per_bag=3, n_rows=30)
    every_row = torch.sparse_coo_tensor(
        torch.arange(30)[None],
        torch.randn(30, 5, dtype=torch.float64),
        (30, 5),
        check_invariants=True,
    )
    params = []
    for exact in (True, False):
        rows = touched_rows(indices.reshape(-1), 30, exact)
        values, _ = row_gradients(indices, weights, grad_out, rows)
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(30, 5, dtype=torch.float64))
        opt = LazyAdam([p], lr=0.1)
        p.grad = every_row  # every row gets momentum
        opt.step()
        before = (p.detach().clone(), opt.state[p]["exp_avg"].clone())
        p.grad = torch.sparse_coo_tensor(rows[None], values, p.shape, check_invariants=True)
        opt.step()
        unread = torch.ones(30, dtype=torch.bool)
        unread[indices.reshape(-1)] = False
        assert torch.equal(p.detach()[unread], before[0][unread])
        assert torch.equal(opt.state[p]["exp_avg"][unread], before[1][unread])
        params.append(p.detach())
    flat = indices.reshape(-1)
    assert touched_rows(flat, 30, False).numel() > touched_rows(flat, 30, True).numel()
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=0)


def test_gradient_memory_is_reused_only_once_released():
    param = torch.nn.Parameter(torch.zeros(10, 4))
    a = reusable_empty(param, 5)
    view = a[1:]
    assert reusable_empty(param, 5).data_ptr() != a.data_ptr(), "in use: not reused"
    del a
    memory = view.untyped_storage().data_ptr()
    assert reusable_empty(param, 5).untyped_storage().data_ptr() != memory, "a view holds it"
    b = reusable_empty(param, 5)
    ptr = b.data_ptr()
    del b, view
    c = reusable_empty(param, 3)
    assert c.data_ptr() == ptr and c.shape == (3, 4)


@pytest.mark.parametrize("sparse", [False, True])
def test_kept_and_accumulated_gradients_survive_later_backward_passes(sparse, path):
    """Reused gradient memory never overwrites a gradient someone still holds."""
    (indices, weights, grad_outs) = zip(*[reads(seed=s) for s in range(3)], strict=True)
    table = torch.nn.Parameter(torch.randn(40, 5, dtype=torch.float64))
    refs = [
        dense_reference(*inputs, 40) for inputs in zip(indices, weights, grad_outs, strict=True)
    ]
    value_bag(indices[0], weights[0], table, sparse).backward(grad_outs[0])
    kept = table.grad
    table.grad = None
    value_bag(indices[1], weights[1], table, sparse).backward(grad_outs[1])
    value_bag(indices[2], weights[2], table, sparse).backward(grad_outs[2])  # accumulates
    torch.testing.assert_close(kept.to_dense(), refs[0])
    torch.testing.assert_close(table.grad.to_dense(), refs[1] + refs[2])
