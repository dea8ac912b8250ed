"""The one reference every value-read path is held to, and the explicit choice of that path.

The paths: "torch" (PyTorch compositions), "cpp" (the fused C++ CPU passes) and "triton" (the
kernels; on CPU tensors in Triton's interpreter). ``select_value_path`` picks one for a test
and checks it ran; the references are plain autograd through a gather and LazyAdam written
row by row, in float64.
"""

from __future__ import annotations

import os

import pytest
import torch

import pkm_lm.memory.cpu_ops as cpu_ops_module

# Tolerances against the float64 references: the torch and C++ paths compute in the inputs'
# dtype (float64 here); the Triton kernels accumulate in fp32 whatever the inputs.
PATH_TOL = {
    "torch": dict(rtol=1e-10, atol=1e-12),
    "cpp": dict(rtol=1e-10, atol=1e-12),
    "triton": dict(rtol=1e-5, atol=1e-6),
}


class CountingOps:
    """The compiled module, counting the functions taken from it (the C++ path ran)."""

    def __init__(self, module) -> None:
        self.module, self.calls = module, 0

    def __getattr__(self, name: str):
        self.calls += 1
        return getattr(self.module, name)


def built_cpp_ops():
    """The compiled C++ module. Where it cannot be built: an error under PKM_CPU_OPS=1 (what
    ``make test`` sets, so CI fails), else a skip that says so (a user without a compiler)."""
    outer = os.environ.get(cpu_ops_module.ENV, "auto")
    if outer == "1":
        return cpu_ops_module.cpu_ops()  # raises CpuOpsError when the build failed
    if outer == "0":
        pytest.skip("PKM_CPU_OPS=0: the C++ path is not tested")
    module, why = cpu_ops_module._build()
    if module is None:
        pytest.skip(f"the C++ CPU ops cannot be built here ({why[:200]}); PKM_CPU_OPS=1 fails")
    return module


def select_value_path(name: str, monkeypatch):
    """Generator for a fixture: run the test on path ``name``; yields the ``kernel`` argument
    of ``value_bag``/``LazyAdam`` for it. "cpp" fails the test if the C++ passes never ran."""
    if name == "cpp":
        spy = CountingOps(built_cpp_ops())
        monkeypatch.setattr(cpu_ops_module, "_build", lambda: (spy, ""))
        monkeypatch.setenv(cpu_ops_module.ENV, "1")
        yield "torch"
        assert spy.calls > 0, "the C++ path was selected but never ran"
        return
    monkeypatch.setenv(cpu_ops_module.ENV, "0")
    if name == "triton":
        pytest.importorskip("triton", reason="triton is not installed (Linux only)")
        if torch.cuda.is_available():
            pytest.skip("CUDA present: tests/test_memory_triton.py runs the kernels compiled")
    yield name


def bag_reference(indices, weights, table, grad_out):
    """(out, weight gradient, table gradient) of sum_j weights[n, j] * table[indices[n, j]],
    by autograd through an explicit gather, in float64."""
    w = weights.detach().double().requires_grad_()
    t = table.detach().double().requires_grad_()
    out = (w[..., None] * t[indices]).sum(1)
    grad_w, grad_t = torch.autograd.grad(out, (w, t), grad_out.double())
    return out.detach(), grad_w, grad_t


def lazy_adam_reference(start, steps, lr, betas, eps, row_wise=False):
    """LazyAdam row by row in float64: (param, exp_avg, exp_avg_sq) after ``steps``, a list of
    (rows, gradient rows). A row whose gradient is all zero is padding: not read, left alone."""
    p = start.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros(p.shape[0], 1, dtype=p.dtype) if row_wise else torch.zeros_like(p)
    for t, (rows, values) in enumerate(steps, start=1):
        for row, g in zip(rows, values.double(), strict=True):
            if not g.any():
                continue
            m[row] = betas[0] * m[row] + (1 - betas[0]) * g
            square = (g * g).mean() if row_wise else g * g
            v[row] = betas[1] * v[row] + (1 - betas[1]) * square
            denom = (v[row] / (1 - betas[1] ** t)).sqrt() + eps
            p[row] -= lr * m[row] / (1 - betas[0] ** t) / denom
    return p, m, v
