"""Optimisation pieces that understand the value table's row-sparse gradient.

Torch's Adam/AdamW and ``clip_grad_norm_`` reject sparse gradients; SparseAdam accepts them
but is slow on CPU. ``LazyAdam`` updates only the rows a step touched, in place.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import KERNELS, pick_kernel, triton_installed
from .cpu_ops import fused_cpu
from .values import row_sparse, touched_rows


class LazyAdam(torch.optim.Optimizer):
    """Adam whose sparse-gradient step updates only the touched rows ("lazy" Adam).

    Not the same optimizer as dense Adam: the moments of rows a step does not read are left
    alone (dense Adam would decay them and keep moving those rows with their old momentum).
    Rows whose gradient is exactly zero count as not read: on GPUs the memory layer pads its
    sparse gradient with such rows to keep its size fixed.
    Bias correction uses one step counter per parameter, as torch's SparseAdam. Dense
    gradients get the exact torch.optim.Adam update (no weight decay, no amsgrad).

    ``kernel="triton"`` does a sparse step in one fused Triton kernel (CUDA parameters; same
    update, one read and one write per touched row instead of the torch path's five passes);
    ``"auto"`` uses it for CUDA parameters when triton is installed.

    ``row_wise=True`` keeps one second-moment value per row (the mean of g^2 over the row, as
    FBGEMM's partial row-wise Adam) instead of one per element: the optimizer state of a
    |K| x v_dim table drops from 2x to 1x the table's size.

    The touched rows' moments are gathered into scratch buffers kept between steps: a fresh
    allocation of that size costs more in page faults than the gather itself.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        row_wise: bool = False,
        kernel: str = "auto",
    ):
        if lr < 0 or eps < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"LazyAdam: lr={lr}, betas={tuple(betas)}, eps={eps} are invalid: "
                "lr >= 0, eps >= 0 and each beta in [0, 1)"
            )
        if kernel not in KERNELS:
            raise ValueError(f"LazyAdam: kernel={kernel!r} is invalid: one of {KERNELS}")
        if kernel == "triton" and not triton_installed():
            raise ValueError("LazyAdam: kernel='triton' needs triton: `pip install triton`")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, row_wise=row_wise, kernel=kernel)
        super().__init__(params, defaults)
        # Scratch rows per parameter: kept out of ``state`` so checkpoints do not carry them.
        self._scratch: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state saved before the option existed
            group.setdefault("row_wise", False)
            group.setdefault("kernel", "torch")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        row_wise = group["row_wise"] and p.dim() == 2
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            sq_shape = (p.shape[0], 1) if row_wise else p.shape
            state["exp_avg_sq"] = p.new_zeros(sq_shape)
        state["step"] += 1
        step_size = group["lr"] / (1 - beta1 ** state["step"])
        bias_correction2_sqrt = (1 - beta2 ** state["step"]) ** 0.5
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad, sparse = p.grad, p.grad.is_sparse
        if sparse and pick_kernel(group["kernel"], p.device) == "triton":
            from .triton_adam import lazy_adam_rows_  # imported lazily: triton is optional

            rows, grad = sparse_rows(grad)
            lazy_adam_rows_(
                p, exp_avg, exp_avg_sq, rows, grad, step_size, (beta1, beta2),
                bias_correction2_sqrt, group["eps"],
            )  # fmt: skip
            return
        if sparse:
            rows, grad = sparse_rows(grad)
            fused = fused_cpu(p, grad) if p.dim() == 2 and p.is_contiguous() else None
            if fused is not None:  # one pass over the rows: no scratch, no gathers
                fused.lazy_adam_rows(
                    p, exp_avg, exp_avg_sq, rows, grad, step_size, beta1, beta2, group["eps"],
                    bias_correction2_sqrt, row_wise,
                )  # fmt: skip
                return
            buffers = self._scratch.setdefault(p, {})
            m = _gather_rows(buffers, "m", exp_avg, rows)
            v = _gather_rows(buffers, "v", exp_avg_sq, rows)
        else:
            m, v = exp_avg, exp_avg_sq
        # Weight of the new gradient in each moment; 0 for sparse rows with a zero gradient,
        # which were not read, so their moments stay as they are.
        read = _nonzero_rows(grad) if sparse else 1
        w1, w2 = (1 - beta1) * read, (1 - beta2) * read
        m.lerp_(grad, w1)
        v.mul_(1 - w2)
        if row_wise:
            v.add_(
                torch.linalg.vector_norm(grad, dim=1, keepdim=True)
                .square_()
                .mul_(w2 / grad.shape[1])
            )
        else:
            v.add_(grad.square().mul_(w2))
        if sparse:
            exp_avg.index_copy_(0, rows, m)
            exp_avg_sq.index_copy_(0, rows, v)
            # The scratch rows are written back: finish the update in place in them.
            denom = v.sqrt_().div_(bias_correction2_sqrt).add_(group["eps"])
            p.index_add_(0, rows, m.div_(denom).mul_(read), alpha=-step_size)
        else:
            denom = v.sqrt().div_(bias_correction2_sqrt).add_(group["eps"])
            p.addcdiv_(m, denom, value=-step_size)


def _nonzero_rows(grad: torch.Tensor) -> torch.Tensor:
    """1 for each row of ``grad`` with a non-zero entry, else 0; shaped to broadcast over it."""
    read = grad.ne(0).flatten(1).any(1).to(grad.dtype)
    return read.view(-1, *[1] * (grad.dim() - 1))


def _gather_rows(buffers: dict, name: str, source: torch.Tensor, rows: torch.Tensor):
    """source[rows], gathered into a buffer that persists (and only grows) across steps."""
    buf = buffers.get(name)
    if buf is None or buf.shape[0] < rows.numel():
        buf = buffers[name] = source.new_empty((int(rows.numel() * 1.25) + 1, *source.shape[1:]))
    out = buf[: rows.numel()]
    torch.index_select(source, 0, rows, out=out)
    return out


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, row values) of a row-sparse gradient: rows ascending and unique, duplicates summed.

    Autograd drops the "coalesced" flag of the memory layer's gradient (its rows are unique
    and sorted), and ``coalesce()`` costs a second at 512^2 slots on CPU and waits for the
    device on GPUs. On CPU the rows are checked in one pass (reading the answer costs no
    device sync there) and merged only when they repeat (e.g. after gradient accumulation or
    a DDP all-reduce); elsewhere they are always merged, in fixed-size buffers, so nothing
    waits for the device: then the rows may include unread rows with a zero gradient.
    """
    if grad.is_coalesced():
        return grad.indices()[0], grad.values()
    rows, values = grad._indices()[0], grad._values()
    on_cpu = rows.device.type == "cpu"
    if on_cpu and (rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all())):
        return rows, values
    unique = touched_rows(rows, grad.shape[0], exact=on_cpu)
    merged = values.new_zeros(unique.numel(), *values.shape[1:])
    return unique, merged.index_add_(0, torch.searchsorted(unique, rows), values)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    split: Iterable[torch.Tensor] = (),
    group=None,
) -> torch.Tensor:
    """Scale gradients so their joint L2 norm is at most max_norm; returns the norm before.

    Like torch.nn.utils.clip_grad_norm_, but sparse gradients count too (coalesced first, so
    duplicate rows, e.g. after a DDP all-reduce, are summed before their norm is taken).
    ``split``: those of ``parameters`` each rank of the process group ``group`` holds a
    different part of (value tables split by columns): their squares are summed over it.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    split_ids = {id(p) for p in split}
    if split_ids:  # every rank of the group takes part, with or without gradients
        import torch.distributed as dist  # only split tables need it

        squares = torch.zeros(2, device=next(iter(split)).device)  # [whole, split] parameters
        for p in params:
            squares[int(id(p) in split_ids)] += _grad_norm(p) ** 2
        dist.all_reduce(squares[1:], group=group)
        total = squares.sum().sqrt()
    elif not params:
        return torch.tensor(0.0)
    else:
        norms = [_grad_norm(p) for p in params]
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        # A sparse tensor's own mul_ is ~8x slower on CPU than scaling its values in place.
        grad = p.grad._values() if p.grad.is_sparse else p.grad
        grad.mul_(scale.to(grad.device, grad.dtype))
    return total


def _grad_norm(p: torch.Tensor) -> torch.Tensor:
    """The fp32 L2 norm of ``p.grad``; a sparse one is coalesced first (in place)."""
    if not p.grad.is_sparse:
        return torch.linalg.vector_norm(p.grad, dtype=torch.float32)
    rows, values = sparse_rows(p.grad)
    p.grad = row_sparse(rows, values, p.grad.shape)
    return torch.linalg.vector_norm(values, dtype=torch.float32)
