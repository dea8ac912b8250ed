"""The value read's backward pieces against plain references (tests/memory_references.py):
touched rows, row gradients, the fixed-size sparse gradient used off the CPU, LazyAdam on such a
gradient; each on every path (PyTorch, C++, Triton's interpreter), selected explicitly."""

import pytest
import torch
from memory_references import PATH_TOL, bag_reference, lazy_adam_reference

from pkm_lm.memory import LazyAdam, sparse_rows
from pkm_lm.memory.values import reusable_empty, row_gradients, touched_rows, value_bag


def reads(n=9, per_bag=6, n_rows=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n_rows, (n, per_bag), generator=g)
    indices[:1, 1:] = indices[:1, :1]  # the same slot several times within one token
    weights = torch.rand(n, per_bag, generator=g, dtype=torch.float64)
    grad_out = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return indices, weights, grad_out


def table_gradient(indices, weights, grad_out, n_rows):
    """The reference gradient of a zero table of ``n_rows`` rows."""
    table = torch.zeros(n_rows, grad_out.shape[1], dtype=grad_out.dtype)
    return bag_reference(indices, weights, table, grad_out)[2]


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
def test_row_gradients_equal_the_dense_gradient_on_their_rows(exact, cpu_value_path):
    indices, weights, grad_out = reads()
    table = torch.randn(40, 5, dtype=torch.float64)
    _, ref_weights, ref_table = bag_reference(indices, weights, table, grad_out)
    rows = touched_rows(indices.reshape(-1), 40, exact)
    grads, weight_grads = row_gradients(indices, weights, grad_out, rows, table)
    torch.testing.assert_close(grads, ref_table[rows])
    torch.testing.assert_close(weight_grads, ref_weights)
    every, none = row_gradients(indices, weights, grad_out, torch.arange(40))
    torch.testing.assert_close(every, ref_table)
    assert none is None


@pytest.mark.parametrize("sparse", [False, True])
def test_value_bag_equals_autograd_through_a_gather(sparse, value_path):
    indices, weights, grad_out = reads(n=12, n_rows=25)
    table = torch.randn(25, 5, dtype=torch.float64, requires_grad=True)
    w = weights.clone().requires_grad_()
    out = value_bag(indices, w, table, sparse, value_path)
    out.backward(grad_out)
    ref_out, ref_w, ref_t = bag_reference(indices, weights, table, grad_out)
    tol = PATH_TOL[value_path]
    torch.testing.assert_close(out.detach(), ref_out, **tol)
    torch.testing.assert_close(w.grad, ref_w, **tol)
    assert table.grad.is_sparse == sparse
    torch.testing.assert_close(table.grad.to_dense(), ref_t, **tol)


@pytest.mark.parametrize("sparse", [False, True])
def test_value_bag_at_layer_scale(sparse, cpu_value_path):
    """fp32, a 64^2-slot table, 256 tokens x 128 reads (the C++ splits the rows over threads):
    within fp32 rounding of the reference. (Triton's interpreter takes ~10 s at this size;
    tests/test_memory_triton.py runs its kernels on many smaller cases.)"""
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 64**2, (256, 128), generator=g)
    weights = torch.rand(256, 128, generator=g)
    table = torch.randn(64**2, 48, generator=g)
    grad_out = torch.randn(256, 48, generator=g)
    t, w = table.clone().requires_grad_(), weights.clone().requires_grad_()
    out = value_bag(indices, w, t, sparse, cpu_value_path)
    out.backward(grad_out)
    ref_out, ref_w, ref_t = bag_reference(indices, weights, table, grad_out)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.detach().double(), ref_out, **tol)
    torch.testing.assert_close(t.grad.to_dense().double(), ref_t, **tol)
    torch.testing.assert_close(w.grad.double(), ref_w, **tol)


@pytest.mark.parametrize("row_wise", [False, True])
def test_lazy_adam_equals_the_row_by_row_reference(row_wise, value_path):
    g = torch.Generator().manual_seed(4)
    start = torch.randn(50, 24, generator=g, dtype=torch.float64)
    steps = []
    for _ in range(4):
        rows = torch.randperm(50, generator=g)[:20].sort().values
        values = torch.randn(20, 24, generator=g, dtype=torch.float64)
        values[3] = 0  # a padding row: left alone
        steps.append((rows, values))
    p = torch.nn.Parameter(start.clone())
    opt = LazyAdam([p], lr=0.05, row_wise=row_wise, kernel=value_path)
    for rows, values in steps:
        p.grad = torch.sparse_coo_tensor(rows[None], values, p.shape, check_invariants=True)
        opt.step()
    ref = lazy_adam_reference(start, steps, 0.05, (0.9, 0.999), 1e-8, row_wise)
    got = (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **PATH_TOL[value_path])


def test_value_bag_on_an_empty_batch(value_path):
    table = torch.randn(7, 3, requires_grad=True)
    w = torch.ones(0, 4, requires_grad=True)
    out = value_bag(torch.zeros(0, 4, dtype=torch.long), w, table, False, value_path)
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


def test_lazy_adam_leaves_rows_with_zero_gradient_alone(value_path):
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
        opt = LazyAdam([p], lr=0.1, kernel=value_path)
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
def test_kept_and_accumulated_gradients_survive_later_backward_passes(sparse, value_path):
    """Reused gradient memory never overwrites a gradient someone still holds."""
    (indices, weights, grad_outs) = zip(*[reads(seed=s) for s in range(3)], strict=True)
    table = torch.nn.Parameter(torch.randn(40, 5, dtype=torch.float64))
    refs = [table_gradient(*inputs, 40) for inputs in zip(indices, weights, grad_outs, strict=True)]
    for i in range(3):
        value_bag(indices[i], weights[i], table, sparse, value_path).backward(grad_outs[i])
        if i == 0:
            kept = table.grad
            table.grad = None
    tol = PATH_TOL[value_path]
    torch.testing.assert_close(kept.to_dense(), refs[0], **tol)
    torch.testing.assert_close(table.grad.to_dense(), refs[1] + refs[2], **tol)  # accumulated
