"""LazyAdam's row update as one Triton kernel: the GPU path of ``LazyAdam(kernel="triton")``.

The torch path gathers the touched rows' moments, updates them, and scatters moments and
parameter rows back: five passes over the rows. Here one program per touched row reads its
gradient, parameter and moments once and writes them once, in fp32 whatever the storage dtype.
Same interpreter rule as ``triton_bag``: CUDA tensors, or CPU tensors with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_bag import _block, _check_device


@triton.jit
def _lazy_adam_rows(
    param,  # (|K|, V)
    exp_avg,  # (|K|, V)
    exp_avg_sq,  # (|K|, V), or (|K|, 1) when ROW_WISE
    rows,  # (U,) touched rows
    grads,  # (U, V) their gradients
    step_size,  # lr / (1 - beta1^t)
    beta1,
    beta2,
    bias_correction2_sqrt,  # sqrt(1 - beta2^t)
    eps,
    V: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ROW_WISE: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(rows + u).to(tl.int64)
    # A row whose gradient is all zeros was not read (padding of a fixed-size sparse
    # gradient): it is left alone, moments included, as the torch path does.
    largest = tl.zeros([BLOCK_V], dtype=tl.float32)
    sq = tl.zeros([BLOCK_V], dtype=tl.float32)
    for c0 in range(0, V, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        g = tl.load(grads + u * V + cols, mask=cols < V, other=0.0).to(tl.float32)
        largest = tl.maximum(largest, tl.abs(g))
        sq += g * g
    if tl.max(largest, axis=0) > 0.0:
        if ROW_WISE:  # one second moment per row: the mean of g^2 over the row
            v = tl.load(exp_avg_sq + row).to(tl.float32)
            v = beta2 * v + (1.0 - beta2) * tl.sum(sq, axis=0) / V
            tl.store(exp_avg_sq + row, v.to(exp_avg_sq.dtype.element_ty))
            row_denom = tl.sqrt(v) / bias_correction2_sqrt + eps
        for c0 in range(0, V, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            at = row * V + cols
            g = tl.load(grads + u * V + cols, mask=ok, other=0.0).to(tl.float32)
            m = tl.load(exp_avg + at, mask=ok, other=0.0).to(tl.float32)
            m = m + (1.0 - beta1) * (g - m)
            tl.store(exp_avg + at, m.to(exp_avg.dtype.element_ty), mask=ok)
            if ROW_WISE:
                denom = row_denom
            else:
                v = tl.load(exp_avg_sq + at, mask=ok, other=0.0).to(tl.float32)
                v = beta2 * v + (1.0 - beta2) * g * g
                tl.store(exp_avg_sq + at, v.to(exp_avg_sq.dtype.element_ty), mask=ok)
                denom = tl.sqrt(v) / bias_correction2_sqrt + eps
            p = tl.load(param + at, mask=ok, other=0.0).to(tl.float32)
            tl.store(param + at, (p - step_size * m / denom).to(param.dtype.element_ty), mask=ok)


@torch.no_grad()
def lazy_adam_rows_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor,
    step_size: float,
    betas: tuple[float, float],
    bias_correction2_sqrt: float,
    eps: float,
) -> None:
    """Adam update of ``param[rows]`` and its moments, in place; rows unique; rows whose
    gradient is all zeros are skipped (they were not read).

    ``exp_avg_sq`` of shape (|K|, 1) keeps one second moment per row (LazyAdam's row_wise).
    """
    _check_device(param)
    if param.dim() != 2:
        raise ValueError(f"lazy_adam_rows_ updates rows of a 2-d table, not shape {param.shape}")
    for t in (param, exp_avg, exp_avg_sq):
        if not t.is_contiguous():
            raise ValueError("lazy_adam_rows_ needs contiguous parameter and moment tensors")
    if rows.numel() == 0:
        return
    v = param.shape[1]
    _lazy_adam_rows[(rows.numel(),)](
        param,
        exp_avg,
        exp_avg_sq,
        rows.contiguous(),
        grads.contiguous(),
        step_size,
        betas[0],
        betas[1],
        bias_correction2_sqrt,
        eps,
        V=v,
        BLOCK_V=_block(v, 1024),
        ROW_WISE=exp_avg_sq.shape[1] == 1 and v > 1,
    )
