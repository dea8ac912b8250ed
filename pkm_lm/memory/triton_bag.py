"""Triton kernels for the value read of a memory layer: the GPU path of ``value_bag``.

Forward: one program per (token, block of v_dim) sums weight * row over the token's
heads x knn reads, in fp32. Backward, in one pass and without re-running the forward: the reads
are sorted by slot on the device; the program at the first read of each slot loads the table
row once, walks the slot's reads, and writes both the row's gradient (sum of weight * grad_out)
and each read's weight gradient (grad_out . row). Nothing waits for the device: a row-sparse
gradient has the torch path's rows (``touched_rows``: a fixed number of them off the CPU). The
sort is stable, so each row sums its reads in a fixed order (run-to-run identical gradients,
except the weight gradients of v_dim > 1024, summed atomically over column blocks).

Kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1``
was set before this module was imported (how the tests check them without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .values import row_sparse_gradient, sort_reads, touched_rows

INTERPRETED = bool(triton.knobs.runtime.interpret)  # read when the kernels below are decorated


@triton.jit
def _bag_forward(
    out,
    table,
    indices,
    weights,
    R: tl.constexpr,
    V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # out[n] = sum_r weights[n, r] * table[indices[n, r]]
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        slots = tl.load(indices + n * R + r, mask=r_ok, other=0).to(tl.int64)
        w = tl.load(weights + n * R + r, mask=r_ok, other=0.0).to(tl.float32)
        rows = tl.load(
            table + slots[:, None] * V + cols[None, :],
            mask=r_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(rows.to(tl.float32) * w[:, None], axis=0)
    tl.store(out + n * V + cols, acc.to(out.dtype.element_ty), mask=col_ok)


@triton.jit
def _bag_backward(
    grad_out,  # (N, V)
    table,  # (|K|, V)
    weights,  # (N * R,)
    sorted_slots,  # (M,) slots of all reads, ascending
    order,  # (M,) flat read index of each sorted read
    run_end,  # (M,) int32: one past the last sorted position holding the same slot
    dst_row,  # (M,) row of grad_table that receives the slot's gradient
    grad_table,  # (|K| or touched, V)
    grad_weights,  # (N * R,) fp32
    R: tl.constexpr,
    V: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NEED_TABLE: tl.constexpr,
    NEED_WEIGHTS: tl.constexpr,
    SPLIT_V: tl.constexpr,  # several programs share a read's dot product: accumulate atomically
):
    i = tl.program_id(0)
    slot = tl.load(sorted_slots + i)
    prev = tl.load(sorted_slots + i - 1, mask=i > 0, other=-1)
    if prev != slot:  # first read of this slot: this program owns the slot's whole run
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        row = tl.zeros([BLOCK_V], dtype=tl.float32)
        if NEED_WEIGHTS:
            row = tl.load(table + slot.to(tl.int64) * V + cols, mask=col_ok, other=0.0)
            row = row.to(tl.float32)
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        end = tl.load(run_end + i)
        j = i
        while j < end:  # a while loop: triton 3.6's interpreter cannot take tensors in range()
            read = tl.load(order + j).to(tl.int64)
            g = tl.load(grad_out + (read // R) * V + cols, mask=col_ok, other=0.0).to(tl.float32)
            if NEED_TABLE:
                acc += tl.load(weights + read).to(tl.float32) * g
            if NEED_WEIGHTS:
                dot = tl.sum(g * row, axis=0)
                if SPLIT_V:
                    tl.atomic_add(grad_weights + read, dot)
                else:
                    tl.store(grad_weights + read, dot)
            j += 1
        if NEED_TABLE:
            dst = tl.load(dst_row + i).to(tl.int64)
            tl.store(grad_table + dst * V + cols, acc.to(grad_table.dtype.element_ty), mask=col_ok)


def _check_device(table: torch.Tensor) -> None:
    if table.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"memory.kernel='triton' needs the value table on a CUDA device, not {table.device}: "
            "use memory.kernel='torch' there (or set TRITON_INTERPRET=1 before importing "
            "pkm_lm, to run the kernels slowly in Triton's interpreter)"
        )


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def bag_forward(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(N, R) slots and weights, (|K|, V) table -> (N, V) in the table's dtype."""
    _check_device(table)
    n, r = indices.shape
    v = table.shape[1]
    out = table.new_empty(n, v)
    if n == 0 or r == 0:
        return out.zero_()
    block_v = _block(v, 256)
    grid = (n, triton.cdiv(v, block_v))
    _bag_forward[grid](out, table, indices, weights, r, v, BLOCK_R=_block(r, 16), BLOCK_V=block_v)
    return out


def bag_backward(
    indices: torch.Tensor,
    weights: torch.Tensor,
    table: torch.Tensor,
    grad_out: torch.Tensor,
    need_table: bool,
    need_weights: bool,
    sparse: bool,
):
    """Gradients of ``bag_forward``: (grad_weights in fp32 or None, grad_table or None)."""
    _check_device(table)
    n, r = indices.shape
    v = table.shape[1]
    flat = indices.reshape(-1)
    sorted_slots, order = sort_reads(indices)
    run_end = torch.searchsorted(sorted_slots, sorted_slots, right=True).to(torch.int32)
    if sparse and need_table:  # the rows of the torch path: exact on CPU, fixed-size elsewhere
        rows = touched_rows(sorted_slots, table.shape[0], exact=table.device.type == "cpu")
        dst_row = torch.searchsorted(rows, sorted_slots)  # each read's row in the output
        grad_rows = table.new_zeros(rows.shape[0], v)  # padding rows (never read) stay zero
    else:  # an unused output still gets a real (one-row) buffer: the launcher checks pointers
        dst_row = sorted_slots
        grad_rows = table.new_zeros(table.shape) if need_table else table.new_empty(1, v)
    block_v = _block(v, 1024)
    split_v = triton.cdiv(v, block_v) > 1
    grad_w = (torch.zeros if split_v else torch.empty)(
        flat.shape[0] if need_weights else 1, device=table.device, dtype=torch.float32
    )
    if flat.shape[0] > 0:
        grid = (flat.shape[0], triton.cdiv(v, block_v))
        _bag_backward[grid](
            grad_out,
            table,
            weights,
            sorted_slots,
            order,
            run_end,
            dst_row,
            grad_rows,
            grad_w,
            r,
            v,
            BLOCK_V=block_v,
            NEED_TABLE=need_table,
            NEED_WEIGHTS=need_weights,
            SPLIT_V=split_v,
        )
    grad_weights = grad_w.view(n, r) if need_weights else None
    if not need_table:
        return grad_weights, None
    if sparse:
        return grad_weights, row_sparse_gradient(table, rows, grad_rows)
    return grad_weights, grad_rows


class TritonValueBag(torch.autograd.Function):
    """Autograd wrapper of the two kernels; same contract as the torch path of ``value_bag``."""

    @staticmethod
    def forward(ctx, indices, weights, table, sparse):
        indices, weights = indices.contiguous(), weights.contiguous()
        table = table.contiguous()
        ctx.save_for_backward(indices, weights, table)
        ctx.sparse = sparse
        return bag_forward(indices, weights, table)

    @staticmethod
    def backward(ctx, grad_out):
        indices, weights, table = ctx.saved_tensors
        need_weights, need_table = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_weights, grad_table = bag_backward(
            indices, weights, table, grad_out.contiguous(), need_table, need_weights, ctx.sparse
        )
        if grad_weights is not None:
            grad_weights = grad_weights.to(weights.dtype)
        return None, grad_weights, grad_table, None
