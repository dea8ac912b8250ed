"""Process group set-up for torchrun, and a query BatchNorm synchronised across ranks on CPU.

Without torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK) everything runs as a single
process. torch's SyncBatchNorm refuses CPU tensors, so ``SyncedBatchNorm1d`` all-reduces the
per-feature sums itself with a differentiable all-reduce (its backward all-reduces the gradient),
which works on gloo and nccl alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pkm_lm.memory import sparse_rows


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None) -> DistEnv:
    """Join torchrun's process group if launched by it (gloo on CPU, nccl on CUDA by default)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise ValueError("distributed.backend=nccl needs CUDA devices; use gloo on CPU")
        dist.init_process_group(backend=backend)
    return DistEnv(rank, local_rank, world_size, device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (returned in place; identity in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sparse_grads_(params: list[nn.Parameter]) -> None:
    """Average row-sparse gradients over ranks, in place, on any backend.

    NCCL has no sparse all-reduce, so DDP cannot sync these gradients there; this gathers each
    rank's (row indices, row values), padded to the longest, and sums them: communication
    scales with the rows touched, not with the table.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            raise RuntimeError("a sparse-gradient parameter got no gradient this step")
        rows, values = sparse_rows(p.grad)  # the layer's rows are unique: no coalesce()
        counts = torch.zeros(world, dtype=torch.long, device=values.device)
        counts[dist.get_rank()] = rows.numel()
        dist.all_reduce(counts)
        longest = int(counts.max())
        pad = longest - rows.numel()
        rows = F.pad(rows, (0, pad))
        values = F.pad(values, (0, 0, 0, pad))
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        all_values = [torch.empty_like(values) for _ in range(world)]
        dist.all_gather(all_rows, rows)
        dist.all_gather(all_values, values)
        keep = [slice(0, int(n)) for n in counts]
        rows = torch.cat([r[k] for r, k in zip(all_rows, keep, strict=True)])
        values = torch.cat([v[k] for v, k in zip(all_values, keep, strict=True)])
        # rows come from coalesced gradients of this very shape: no need to re-check them
        summed = torch.sparse_coo_tensor(rows[None], values, p.shape, check_invariants=False)
        summed = summed.coalesce()
        p.grad = summed / world


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(sum) whose backward is all_reduce(sum) of the gradient: every rank's loss
    depends on every rank's contribution to the sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the union of all ranks' batches, on any device.

    A drop-in for the memory's ``query_bn`` (same parameters, buffers and state-dict keys):
    training mode all-reduces [sum x, sum x^2, count] in one call, then normalises with the
    global mean and biased variance and updates the running stats with the unbiased one.
    Outside training, or in a single process, it is plain BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"SyncedBatchNorm1d expects (N, C) inputs, got shape {tuple(x.shape)}")
        xf = x.float()
        count = torch.full((1,), float(x.shape[0]), device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(0), (xf * xf).sum(0), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                if m is None:  # cumulative moving average, as BatchNorm1d(momentum=None)
                    m = 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm1d) -> SyncedBatchNorm1d:
        synced = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            device=bn.weight.device if bn.affine else None,
        )
        synced.load_state_dict(bn.state_dict())
        return synced


def sync_query_batchnorms(memories: dict[int, nn.Module]) -> None:
    """Swap each memory's query BatchNorm for a synced one (before DDP wraps the model)."""
    for mem in memories.values():
        if isinstance(mem.query_bn, nn.BatchNorm1d) and not isinstance(
            mem.query_bn, SyncedBatchNorm1d
        ):
            mem.query_bn = SyncedBatchNorm1d.from_batchnorm(mem.query_bn)
