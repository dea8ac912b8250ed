"""Triton value-bag kernels against the float64 references of tests/memory_references.py
(forward, weight and table gradients; LazyAdam's row update) and the layer against the PyTorch
path, selected explicitly (``PKM_CPU_OPS=0``: not the C++ passes).

Without CUDA the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is first imported, which is when triton reads it); with CUDA
the same cases run compiled on the GPU (marked ``gpu``) and the interpreter stays off.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from memory_references import bag_reference, lazy_adam_reference

HAS_CUDA = torch.cuda.is_available()
pytest.importorskip("triton", reason="triton is not installed (`pip install triton`, Linux only)")

from pkm_lm.memory import LazyAdam, MemoryConfig, ProductKeyMemory, triton_bag  # noqa: E402
from pkm_lm.memory.values import value_bag  # noqa: E402

assert HAS_CUDA or triton_bag.INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 without CUDA"

DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="CUDA present: kernels run compiled there")
    ),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}

CASES = {  # tokens, heads, knn, slots, v_dim
    "basic": (6, 2, 4, 16, 8),
    "knn1": (5, 3, 1, 16, 8),
    "heads1": (4, 1, 5, 16, 8),
    "v_not_pow2": (5, 2, 3, 16, 13),
    "v_split_blocks": (3, 2, 2, 8, 1030),  # > 1024 columns: weight gradient accumulated atomically
    "hot_slots": (6, 2, 4, 3, 8),  # 3 slots for 8 reads per token: duplicates everywhere
    "empty_batch": (0, 2, 4, 16, 8),
}


def make_inputs(case, dtype, device, seed=0):
    n, heads, knn, slots, v = CASES[case]
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, slots, (n, heads * knn), generator=g)
    if n and heads * knn > 1:
        indices[0, 1] = indices[0, 0]  # a slot read twice by one token
    weights = torch.rand(n, heads * knn, generator=g)
    table = torch.randn(slots, v, generator=g).to(dtype)
    grad_out = torch.randn(n, v, generator=g).to(dtype)
    return [t.to(device) for t in (indices, weights, table, grad_out)]


def run_bag(kernel, indices, weights, table, grad_out, sparse, need=(True, True)):
    w = weights.detach().requires_grad_(need[0])
    t = table.detach().requires_grad_(need[1])
    out = value_bag(indices, w, t, sparse, kernel)
    inputs = [x for x, needed in zip((w, t), need, strict=True) if needed]
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, [gr.to_dense() if gr.is_sparse else gr for gr in grads]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_equal_the_gather_reference(case, dtype, sparse, device):
    indices, weights, table, grad_out = make_inputs(case, dtype, device)
    out, (grad_w, grad_t) = run_bag("triton", indices, weights, table, grad_out, sparse)
    # Reference: autograd through a gather in float64 on the same (already rounded) values.
    ref, ref_w, ref_t = bag_reference(indices, weights, table, grad_out)
    assert out.dtype == dtype and grad_t.dtype == dtype and grad_w.dtype == weights.dtype
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    torch.testing.assert_close(grad_w.double(), ref_w, **TOL[dtype])
    torch.testing.assert_close(grad_t.double(), ref_t, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True])
def test_gradient_layout_is_the_torch_paths(sparse, device):
    """Dense, or sparse over the torch path's rows (the rows read on CPU; a fixed number,
    padded with unread zero rows, on other devices), coalesced."""
    indices, weights, table, grad_out = make_inputs("basic", torch.float32, device)
    t = table.requires_grad_()
    layouts = {}
    for kernel in ("torch", "triton"):
        out = value_bag(indices, weights, t, sparse, kernel)
        (layouts[kernel],) = torch.autograd.grad(out, t, grad_out)
    got, ref = layouts["triton"], layouts["torch"]
    assert got.is_sparse == ref.is_sparse == sparse
    if sparse:
        assert got.is_coalesced()
        assert torch.equal(got.indices(), ref.indices())
        if device == "cpu":
            assert torch.equal(got.indices()[0], indices.unique())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["weights", "table"])
def test_one_gradient_only(need, device):
    indices, weights, table, grad_out = make_inputs("hot_slots", torch.float32, device)
    _, got = run_bag("triton", indices, weights, table, grad_out, False, need)
    _, *ref = bag_reference(indices, weights, table, grad_out)
    ref = [r for r, needed in zip(ref, need, strict=True) if needed]
    torch.testing.assert_close([g.double() for g in got], ref, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_layer_with_triton_kernel_equals_torch_kernel(sparse_grad, device, monkeypatch):
    monkeypatch.setenv("PKM_CPU_OPS", "0")  # the PyTorch compositions, not the C++ passes
    torch.manual_seed(0)
    cfg = dict(n_keys=8, heads=2, knn=4, k_dim=8, v_dim=6, sparse_grad=sparse_grad)
    layers = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        layers[kernel] = ProductKeyMemory(10, 12, MemoryConfig(kernel=kernel, **cfg)).to(device)
    x = torch.randn(9, 10, device=device)
    outs, grads = {}, {}
    for kernel, layer in layers.items():
        outs[kernel] = layer(x)
        outs[kernel].square().sum().backward()
        grads[kernel] = {
            name: p.grad.to_dense() for name, p in layer.named_parameters() if p.grad is not None
        }
    torch.testing.assert_close(outs["triton"], outs["torch"])
    assert grads["triton"].keys() == grads["torch"].keys()
    for name, ref in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], ref, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_kernel_runs_the_triton_kernels_on_cuda_only(device, monkeypatch):
    """memory.kernel=auto: the value read goes through the Triton kernels on CUDA, through the
    PyTorch path on the CPU (the layer asks pick_kernel, unit-tested in test_memory_config)."""
    calls = []
    apply = triton_bag.TritonValueBag.apply
    monkeypatch.setattr(
        triton_bag.TritonValueBag, "apply", lambda *args: calls.append(1) or apply(*args)
    )
    cfg = MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=8, v_dim=6, kernel="auto")
    layer = ProductKeyMemory(10, 12, cfg).to(device)
    layer(torch.randn(9, 10, device=device)).sum().backward()
    assert len(calls) == (1 if device == "cuda" else 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row_wise", [False, True], ids=["element_wise", "row_wise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [5, 1030], ids=["v5", "v1030"])
def test_fused_lazy_adam_equals_the_row_by_row_reference(v, dtype, row_wise, device):
    g = torch.Generator().manual_seed(v)
    start = torch.randn(12, v, generator=g).to(dtype)
    steps = [[1, 4, 7], [], [0, 4, 11], [4]]  # rows touched by each step; one step touches none
    grads = [torch.randn(len(rows), v, generator=g).to(dtype) for rows in steps]
    grads[2][2] = 0  # row 11: padding of a fixed-size sparse gradient, not read
    p = torch.nn.Parameter(start.clone().to(device))
    opt = LazyAdam([p], lr=1e-2, betas=(0.9, 0.98), row_wise=row_wise, kernel="triton")
    for rows, values in zip(steps, grads, strict=True):
        index = torch.tensor(rows, dtype=torch.long, device=device)[None]
        p.grad = torch.sparse_coo_tensor(index, values.to(device), p.shape, check_invariants=True)
        opt.step()
    got = (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
    history = list(zip(steps, grads, strict=True))
    ref = lazy_adam_reference(start, history, 1e-2, (0.9, 0.98), 1e-8, row_wise)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double().cpu(), b, **TOL[dtype])
    unread = [2, 3, 5, 11]
    assert torch.equal(got[0][unread], start[unread].to(device))
    assert not got[1][unread].any() and not got[2][unread].any()


def test_cpu_tensors_without_interpreter_fail_clearly(monkeypatch):
    monkeypatch.setattr(triton_bag, "INTERPRETED", False)
    indices, weights, table, _ = make_inputs("basic", torch.float32, "cpu")
    with pytest.raises(ValueError, match="memory.kernel='triton' needs the value table on a CUDA"):
        value_bag(indices, weights, table, False, "triton")


def test_kernel_benchmark_runs_and_checks_its_variants():
    """The GPU benchmark, on tiny shapes (interpreter on CPU): every variant agrees and is timed."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"
    tiny = "--tokens 4 --n-keys 4 --v-dim 8 --k-dim 8 --knn 2 --heads 1 --rounds 1"
    cmd = [sys.executable, str(script), *tiny.split(), "--min-run-time", "0.01"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    for row in (
        "| triton | ",
        "| bags (the CPU backward) | ",
        "| dense scatter + bmm (the GPU backward) | ",
    ):
        assert row in out
    assert out.count("ratio to torch") == 2
    assert "| LazyAdam, sparse | fused Adam, dense | sparse / dense |" in out
