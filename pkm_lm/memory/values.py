"""Weighted sum of value rows, with a backward pass that needs no host-device synchronization.

The backward groups the reads by slot (a stable sort on the device) and sums each slot's reads
with one embedding bag per output row: the gradient of a |K| x v_dim table is written in one
pass, with no (reads x v_dim) buffer, no zero-fill followed by a scatter, and no shape that
depends on the data. With ``sparse=True`` it is a coalesced row-sparse COO tensor instead (for
LazyAdam / SparseAdam): on CPU exactly the rows read; on other devices a fixed number of rows,
min(reads, |K|), that holds every row read plus the lowest unread rows with zero gradient, so
its size is known without asking the device.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .cpu_ops import fused_cpu

# torch.compiler.disable, importing torch's compiler only when a marked function first runs:
# the import costs ~2 s, which every command importing the layer (a config check, a table of
# results) would pay. A private helper of torch's own modules; the public API where it is gone.
eager = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable

# Gradient memory of each value table, owned by the table: an entry dies with its parameter.
_GRAD_MEMORY: WeakIdKeyDictionary = WeakIdKeyDictionary()
_GRAD_MEMORY_LOCK = threading.Lock()  # two backward passes must not both take one buffer


def reusable_empty(param: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised (rows, width) tensor for ``param``'s gradient, in the memory of the last
    one once nothing holds that any more (autograd, ``param.grad``, an optimizer, a view).

    On CPU a fresh allocation this large page-faults at ~2 GB/s, most of the backward's time
    otherwise; the reuse costs one gradient's memory kept between steps, freed with ``param``.
    Where torch cannot count a storage's users, nothing is reused.
    """
    shape = (rows, param.shape[1])
    needed = rows * param.shape[1] * param.element_size()
    with _GRAD_MEMORY_LOCK:
        storage = _GRAD_MEMORY.get(param)
        if storage is not None and storage.nbytes() >= needed and _storage_users(storage) == 1:
            return param.new_empty(0).set_(storage, 0, shape)
        out = param.new_empty(shape)
        if _storage_users(out.untyped_storage()) is not None:
            _GRAD_MEMORY[param] = out.untyped_storage()
        return out


def _storage_users(storage: torch.UntypedStorage) -> int | None:
    """References to ``storage`` (this Python handle counts as one); None where this torch
    has no way to count them (a private API that may go)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(storage._cdata)


def sort_reads(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots in ascending order, position of each in ``indices.reshape(-1)``); stable, so each
    slot's reads are summed in a fixed order (run-to-run identical gradients)."""
    return indices.reshape(-1).sort(stable=True)


# Per value table, the row index tensor of the sparse gradient its last backward returned.
_FRESH_ROWS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tables whose gradient hook is in place


def row_sparse(rows: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The row-sparse COO tensor holding ``values`` at ``rows`` (ascending and unique: marked
    coalesced, unchecked, so no consumer merges its rows again)."""
    return torch.sparse_coo_tensor(
        rows[None], values, shape, is_coalesced=True, check_invariants=False
    )


def row_sparse_gradient(table: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor):
    """The (|K|, v) row-sparse gradient holding ``grads`` at ``rows`` (ascending, unique).

    Autograd stores such a gradient in ``table.grad`` through a constructor that drops its
    "coalesced" flag, and then every consumer (clipping, LazyAdam) would merge its rows again:
    a scan of the whole table on GPUs. ``keep_coalesced`` restores the flag when ``table.grad``
    is exactly this gradient (not a sum of several).
    """
    _FRESH_ROWS[table] = rows
    return row_sparse(rows, grads, table.shape)


def keep_coalesced(table: torch.Tensor) -> None:
    """Have a leaf ``table`` get back the coalesced flag of its row-sparse gradient (once)."""
    if table.is_leaf and table.requires_grad and table not in _HOOKED:
        _HOOKED[table] = table.register_post_accumulate_grad_hook(_restore_coalesced)


def _restore_coalesced(table: torch.Tensor) -> None:
    rows, grad = _FRESH_ROWS.pop(table, None), table.grad
    if rows is None or not grad.is_sparse or grad.is_coalesced():
        return
    indices = grad._indices()
    if indices.data_ptr() == rows.data_ptr() and indices.shape[1] == rows.shape[0]:
        table.grad = row_sparse(indices[0], grad._values(), grad.shape)


def dense_gradient_advised(reads: int, n_slots: int, device: torch.device) -> bool:
    """Whether a dense value gradient (with fused Adam) is the better choice for a step that
    reads ``reads`` slots (tokens x heads x knn) of ``n_slots``: off the CPU a row-sparse
    gradient has min(reads, |K|) rows, so from reads >= |K| on it is the whole table plus its
    indices, and LazyAdam then updates every row as Adam would, in a less fused kernel. On CPU
    it holds exactly the rows read and its fused C++ step is measured faster or even."""
    return device.type != "cpu" and reads >= n_slots


def touched_rows(slots: torch.Tensor, n_rows: int, exact: bool) -> torch.Tensor:
    """Ascending unique rows covering every slot in ``slots`` (any order, repeats allowed).

    ``exact``: exactly the slots read (the count comes back to the host: free on CPU, a sync on
    an accelerator). Otherwise min(len(slots), n_rows) rows, padded with the lowest unread
    rows: a size known in advance, so nothing waits for the device.
    """
    read = torch.zeros(n_rows, dtype=torch.bool, device=slots.device).index_fill_(0, slots, True)
    if exact:
        return read.nonzero().squeeze(1)
    size = min(slots.numel(), n_rows)
    # Keep every read row and the first (size - rows read) unread ones: exactly `size` rows.
    padding = size - read.sum()
    keep = read | ((~read).cumsum(0) <= padding)
    return torch.nonzero_static(keep, size=size).squeeze(1)


def row_gradients(
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    rows: torch.Tensor,
    table: torch.Tensor | None = None,
    out_of: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of the bag ``out[n] = sum_j weights[n, j] * table[indices[n, j]]``.

    Returns, for each of ``rows`` (ascending, covering every slot read), the sum of
    weights[n, j] * grad_out[n] over its reads (rows nobody read get zeros), and, when
    ``table`` is given, each read's weight gradient grad_out[n] . table[indices[n, j]], shaped
    like ``indices``. The reads are grouped by slot with ``sort_reads``, on the device.
    ``out_of``: the parameter these are the gradient of, whose gradient memory may be reused.
    """
    n, per_bag = indices.shape
    sorted_slots, order = sort_reads(indices)
    starts = torch.searchsorted(sorted_slots, rows)  # first sorted read of each row
    weights = weights.reshape(-1).to(grad_out.dtype)
    fused = fused_cpu(indices, grad_out, *([] if table is None else [table]))
    if fused is not None:  # one pass per row: its gradient and its reads' weight gradients
        grad_out = grad_out.contiguous()
        buffer = reusable_empty(out_of, rows.numel()) if out_of is not None else None
        out = fused.row_gradients(order, starts, rows, weights, grad_out, table, per_bag, buffer)
        return out[0], out[1].view(n, per_bag) if table is not None else None
    grads = F.embedding_bag(
        torch.div(order, per_bag, rounding_mode="floor"),  # token of each sorted read
        grad_out,
        starts,
        mode="sum",
        per_sample_weights=weights[order],
    )  # one bag per row over grad_out: no (reads x width) buffer
    if table is None:
        return grads, None
    return grads, read_weight_gradients(indices, grad_out, table)


def read_weight_gradients(
    indices: torch.Tensor, grad_out: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """grad_out[n] . table[indices[n, j]] for every read, shaped like ``indices``.

    Torch's embedding-bag backward computes these in one pass over the rows read (no
    (reads x width) buffer, no re-run of the forward). It is a private op: where it is missing,
    or has no kernel for this dtype and device (bf16 on CUDA), the rows read are gathered.
    """
    n, per_bag = indices.shape
    op = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if op is not None and not (table.dtype == torch.bfloat16 and table.device.type == "cuda"):
        offsets = torch.arange(0, n * per_bag, per_bag, device=indices.device)
        offset2bag = torch.arange(n, device=indices.device)[:, None].expand(n, per_bag)
        try:
            weight_grads = op(
                grad_out, table, indices.reshape(-1), offsets, offset2bag.reshape(-1), 0
            )
            return weight_grads.view(n, per_bag)
        except NotImplementedError:  # no kernel for this dtype and device
            pass
    return torch.einsum("nrv,nv->nr", table[indices].float(), grad_out.float()).to(grad_out.dtype)


class _ValueBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, weights, table, sparse):
        ctx.save_for_backward(indices, weights, table)
        ctx.sparse = sparse
        return F.embedding_bag(indices, table, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad_out):
        indices, weights, table = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_weights, need_table = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n_rows = table.shape[0]
        if ctx.sparse or not need_table:  # (the fused pass finds each read through its row)
            rows = touched_rows(indices.reshape(-1), n_rows, exact=table.device.type == "cpu")
        else:
            rows = torch.arange(n_rows, device=table.device)
        grads, grad_weights = row_gradients(
            indices, weights, grad_out, rows, table if need_weights else None, table
        )
        grad_table = None
        if need_table and ctx.sparse:
            grad_table = row_sparse_gradient(table, rows, grads)
        elif need_table:
            grad_table = grads
        return None, grad_weights, grad_table, None


@eager  # C++/Triton kernels and a gradient hook: torch.compile leaves it eager
def value_bag(
    indices: torch.Tensor,
    weights: torch.Tensor,
    table: torch.Tensor,
    sparse: bool = False,
    kernel: str = "torch",
) -> torch.Tensor:
    """sum_j weights[n, j] * table[indices[n, j]] for each row n: (N, R) x (|K|, v) -> (N, v).

    Output in the table's dtype (fp32 master weights under autocast). ``kernel="torch"`` casts
    the weights to it; ``kernel="triton"`` (CUDA) accumulates in fp32 in fused kernels.
    """
    if sparse:
        keep_coalesced(table)
    if kernel == "triton":
        from .triton_bag import TritonValueBag  # imported lazily: triton is optional

        return TritonValueBag.apply(indices, weights, table, sparse)
    return _ValueBag.apply(indices, weights.to(table.dtype), table, sparse)
