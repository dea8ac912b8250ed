"""Optimisation pieces that understand the value table's row-sparse gradient.

Torch's Adam/AdamW and ``clip_grad_norm_`` reject sparse gradients; SparseAdam accepts them
but is slow on CPU. ``LazyAdam`` updates only the rows a step touched, in place.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class LazyAdam(torch.optim.Optimizer):
    """Adam whose sparse-gradient step updates only the touched rows ("lazy" Adam).

    Not the same optimizer as dense Adam: the moments of rows a step does not read are left
    alone (dense Adam would decay them and keep moving those rows with their old momentum).
    Bias correction uses one step counter per parameter, as torch's SparseAdam. Dense
    gradients get the exact torch.optim.Adam update (no weight decay, no amsgrad).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        if lr < 0 or eps < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"LazyAdam: lr={lr}, betas={tuple(betas)}, eps={eps} are invalid: "
                "lr >= 0, eps >= 0 and each beta in [0, 1)"
            )
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step_size = group["lr"] / (1 - beta1 ** state["step"])
                bias_correction2_sqrt = (1 - beta2 ** state["step"]) ** 0.5
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                grad = p.grad
                if grad.is_sparse:
                    rows, grad = sparse_rows(grad)
                    m = exp_avg.index_select(0, rows).lerp_(grad, 1 - beta1)
                    v = exp_avg_sq.index_select(0, rows).mul_(beta2)
                    v.addcmul_(grad, grad, value=1 - beta2)
                    exp_avg.index_copy_(0, rows, m)
                    exp_avg_sq.index_copy_(0, rows, v)
                    denom = v.sqrt_().div_(bias_correction2_sqrt).add_(group["eps"])
                    p.index_add_(0, rows, m.div_(denom), alpha=-step_size)
                else:
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(group["eps"])
                    p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, row values) of a row-sparse gradient, with duplicate rows summed.

    Autograd drops the "coalesced" flag of the memory layer's gradient (its rows are unique
    and sorted), and ``coalesce()`` of a 512^2-slot gradient costs a second on CPU: check
    the rows in one pass and coalesce only when rows repeat (e.g. after a DDP all-reduce).
    """
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            return rows, grad._values()
        grad = grad.coalesce()
    return grad.indices()[0], grad.values()


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float
) -> torch.Tensor:
    """Scale gradients so their joint L2 norm is at most max_norm; returns the norm before.

    Like torch.nn.utils.clip_grad_norm_, but sparse gradients count too (coalesced first, so
    duplicate rows, e.g. after a DDP all-reduce, are summed before their norm is taken).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norms = []
    for p in params:
        if p.grad.is_sparse:
            rows, values = sparse_rows(p.grad)
            p.grad = torch.sparse_coo_tensor(
                rows[None], values, p.grad.shape, is_coalesced=True, check_invariants=False
            )
            norms.append(torch.linalg.vector_norm(values, dtype=torch.float32))
        else:
            norms.append(torch.linalg.vector_norm(p.grad, dtype=torch.float32))
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))
    return total
