"""What the value read does where torch's private APIs are missing, who owns its reusable
gradient memory, and that a row-sparse gradient reaches ``.grad`` still marked coalesced."""

import gc

import torch

import pkm_lm.memory.values as values
from pkm_lm.memory.values import (
    dense_gradient_advised,
    read_weight_gradients,
    reusable_empty,
    value_bag,
)


def reads(n=7, per_bag=5, n_rows=30, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n_rows, (n, per_bag), generator=g)
    table = torch.randn(n_rows, width, generator=g, dtype=torch.float64)
    grad_out = torch.randn(n, width, generator=g, dtype=torch.float64)
    return indices, table, grad_out


def test_read_weight_gradients_without_the_private_op(monkeypatch):
    indices, table, grad_out = reads()
    expected = torch.einsum("nrv,nv->nr", table[indices], grad_out)
    torch.testing.assert_close(read_weight_gradients(indices, grad_out, table), expected)
    monkeypatch.delattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward")
    torch.testing.assert_close(read_weight_gradients(indices, grad_out, table), expected)


def test_read_weight_gradients_when_the_op_has_no_kernel(monkeypatch):
    def no_kernel(*args):
        raise NotImplementedError("no kernel for this dtype")

    monkeypatch.setattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", no_kernel)
    indices, table, grad_out = reads()
    expected = torch.einsum("nrv,nv->nr", table[indices], grad_out)
    torch.testing.assert_close(read_weight_gradients(indices, grad_out, table), expected)


def test_gradient_memory_is_never_reused_without_a_use_count(monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    param = torch.nn.Parameter(torch.zeros(10, 4))
    assert reusable_empty(param, 5).shape == (5, 4)
    assert param not in values._GRAD_MEMORY, "nothing is kept when nothing can be reused"


def test_gradient_memory_is_freed_with_its_parameter():
    param = torch.nn.Parameter(torch.zeros(10, 4))
    reusable_empty(param, 5)
    assert param in values._GRAD_MEMORY
    before = len(values._GRAD_MEMORY)
    del param
    gc.collect()
    assert len(values._GRAD_MEMORY) == before - 1


def test_a_sparse_gradient_reaches_grad_coalesced_and_a_sum_of_two_is_not_marked():
    indices, table, grad_out = reads()
    param = torch.nn.Parameter(table.clone())
    weights = torch.rand(indices.shape, dtype=torch.float64)
    value_bag(indices, weights, param, sparse=True).backward(grad_out)
    assert param.grad.is_coalesced(), "one backward: its rows are unique and sorted"
    first = param.grad.to_dense()
    value_bag(indices.flip(0), weights, param, sparse=True).backward(grad_out)
    grad = param.grad
    # Accumulated: torch's own flag, and the sum is right either way.
    dense = torch.zeros_like(table)
    dense.index_add_(
        0, indices.flip(0).reshape(-1), (weights[..., None] * grad_out[:, None]).reshape(-1, 6)
    )
    torch.testing.assert_close(grad.to_dense(), first + dense)
    if grad.is_coalesced():
        rows = grad.indices()[0]
        assert bool((rows[1:] > rows[:-1]).all())


def test_dense_gradient_is_advised_off_the_cpu_once_a_step_reads_the_whole_table():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # 8,192 tokens x 4 heads x 32 reads against 512^2 slots: every row is in the gradient.
    assert dense_gradient_advised(8192 * 128, 512**2, cuda)
    assert not dense_gradient_advised(8192 * 128, 2048**2, cuda)
    assert not dense_gradient_advised(8192 * 128, 512**2, cpu), "exact rows on CPU"


def test_importing_the_layer_leaves_torch_compiler_unloaded():
    """The functions torch.compile must leave eager import torch's compiler (~2 s) on their first
    call, not when a command that never runs them (a config check) imports the layer."""
    import subprocess
    import sys

    code = "import sys, pkm_lm.memory, pkm_lm.config; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("False" if hasattr(torch, "_disable_dynamo") else "True")
