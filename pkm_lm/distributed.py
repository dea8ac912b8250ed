"""Process group and device set-up for torchrun, DDP with row-sparse value gradients, and a
query BatchNorm synchronised across ranks on any device.

Without torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK) everything runs as a single
process. torch's SyncBatchNorm refuses CPU tensors, so ``SyncedBatchNorm1d`` all-reduces the
per-feature sums itself with a differentiable all-reduce (its backward all-reduces the gradient),
which works on gloo and nccl alike.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pkm_lm.errors import invalid
from pkm_lm.memory import sparse_rows
from pkm_lm.memory.values import row_sparse, touched_rows


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


# Ranks wait in their next collective while rank 0 writes a checkpoint: a paper-scale one
# (weights + Adam moments, ~5 GB for 12L_1mem, ~17 GB with a 1024^2 memory) on a slow shared
# disk must not trip the default timeout (10 minutes on NCCL).
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``train.device``: auto (CUDA when available), cpu or cuda; local rank i gets GPU
    i % (visible GPUs), so several ranks may share a GPU on a small node."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise invalid(
            "train.device",
            choice,
            f"no CUDA device is usable (torch {torch.__version__}, {build}); "
            "use train.device=cpu or train.device=auto",
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(backend: str | None = None, device: str = "auto") -> DistEnv:
    """Join torchrun's process group if launched by it (gloo on CPU, nccl on CUDA by default)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if backend == "nccl" and dev.type != "cuda":
            raise invalid(
                "distributed.backend", backend, "needs CUDA devices; use distributed.backend=gloo"
            )
        dist.init_process_group(
            backend=backend,
            timeout=PROCESS_GROUP_TIMEOUT,
            device_id=dev if backend == "nccl" else None,
        )
    return DistEnv(rank, local_rank, world_size, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read afterwards times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# torch 2.13 renamed DDP's per-forward buffer broadcast; GPU nodes often carry an older build.
_SYNC_BUFFERS = next(
    name
    for name in ("forward_sync_buffers", "broadcast_buffers")
    if name in inspect.signature(DDP).parameters
)


def wrap_ddp(
    model: nn.Module,
    sparse_params: list[nn.Parameter],
    device: torch.device,
    *,
    broadcast_buffers: bool,
) -> DDP:
    """DDP for the dense parameters; ``sparse_params`` are left out (``SparseGrads`` syncs them:
    NCCL cannot all-reduce sparse tensors). Gradients live in DDP's buckets (no second copy);
    ``broadcast_buffers=False`` when the query BatchNorms sync their statistics themselves."""
    sparse_ids = {id(p) for p in sparse_params}
    ignored = [n for n, p in model.named_parameters() if id(p) in sparse_ids]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **{_SYNC_BUFFERS: broadcast_buffers},
    )


class SparseGrads:
    """The row-sparse gradients of the value tables: bounded accumulation, averaging over ranks.

    Averaging picks, per step and table, the cheaper of two collectives into one flat buffer that
    persists across steps (grown only when needed, at most about the table's size):
    - gather: each rank's rows, padded to the longest rank, collected with one
      ``all_gather_into_tensor`` (``all_gather_single``): moves world x longest rows, scales
      with the rows touched;
    - dense: the rows scattered into a zero table, one ``all_reduce``: moves the table, whatever
      the number of ranks.
    Dense is chosen once world x longest >= ``dense_fraction`` x table rows (in training nearly
    every row is touched; the gather would then move and hold world x the table). Both give
    every touched row with its averaged value; as the memory layer's own gradient, the rows may
    include unread rows with a zero gradient, which the lazy optimizer leaves alone. Apart from
    reading the ranks' row counts, nothing waits for an accelerator: off the CPU the dense
    branch hands over every row and the gather merges into a fixed number of rows.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        dense_fraction: float = 1.0,
        exact: bool | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """``exact``: hand over exactly the rows with a gradient (reading their number back);
        None: on the CPU only, where that costs no wait. ``group``: the ranks to average over
        (None: all)."""
        self.params = params
        self.group = group
        self.dense_fraction = dense_fraction
        self.exact = exact
        self._buffers: dict[nn.Parameter, torch.Tensor] = {}
        self._all_rows: dict[nn.Parameter, torch.Tensor] = {}

    def compact_(self) -> None:
        """Sum duplicate rows of accumulated gradients (CUDA's sparse add concatenates them), so
        micro-steps cannot grow a gradient beyond the rows touched."""
        for p in self.params:
            if p.grad is not None:
                rows, values = sparse_rows(p.grad)
                p.grad = row_sparse(rows, values, p.shape)

    def all_reduce_(self) -> list[str]:
        """Average the gradients over ranks in place; returns the branch each table took."""
        if not (dist.is_initialized() and dist.get_world_size(self.group) > 1) or not self.params:
            return []
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        grads = []
        for p in self.params:
            if p.grad is None:
                raise RuntimeError("a sparse-gradient parameter got no gradient this step")
            grads.append(sparse_rows(p.grad))
        device = grads[0][1].device
        counts = torch.zeros(world, len(grads), dtype=torch.long, device=device)
        counts[rank] = torch.tensor([rows.numel() for rows, _ in grads])
        dist.all_reduce(counts, group=self.group)
        counts = counts.tolist()  # the one host read: buffer sizes depend on it
        branches = []
        for j, (p, (rows, values)) in enumerate(zip(self.params, grads, strict=True)):
            longest = max(c[j] for c in counts)
            if world * longest >= self.dense_fraction * p.shape[0]:
                union, summed = self._dense(p, rows, values)
                branches.append("dense")
            else:
                union, summed = self._gather(p, rows, values, longest)
                branches.append("gather")
            p.grad = row_sparse(union, summed.div_(world), p.shape)
        return branches

    def _exact(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" if self.exact is None else self.exact

    def _buffer(self, p: nn.Parameter, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(p)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._buffers[p] = torch.empty(numel, dtype=dtype, device=p.device)
        return buf[:numel]

    def _dense(self, p, rows, values):
        n_rows, width = p.shape[0], values.shape[1]
        table = self._buffer(p, n_rows * width, values.dtype).view(n_rows, width)
        table.zero_().index_copy_(0, rows, values)
        dist.all_reduce(table, group=self.group)
        if self._exact(table):
            union = table.ne(0).any(1).nonzero().squeeze(1)
            return union, table.index_select(0, union)
        if p not in self._all_rows:
            self._all_rows[p] = torch.arange(n_rows, device=table.device)
        return self._all_rows[p], table  # every row, the buffer itself: no copy, no sync

    def _gather(self, p, rows, values, longest: int):
        """Each rank's chunk is a (longest, width + 1) matrix: its value rows, and in the last
        column their row ids (integer bits in the float buffer: exact for any table size);
        padding rows are zeros at row 0."""
        world, width, n_rows = dist.get_world_size(self.group), values.shape[1], p.shape[0]
        chunk = longest * (width + 1)
        buf = self._buffer(p, (world + 1) * chunk, values.dtype)
        local, flat_out = buf[:chunk].view(longest, width + 1), buf[chunk:]
        id_dtype = _ID_DTYPES[values.element_size()]
        n = rows.numel()
        local[:n, :width] = values
        local[n:] = 0  # zero bits: id 0, zero values
        local[:n, width].view(id_dtype).copy_(rows)
        _all_gather_flat(flat_out, local.view(-1), group=self.group)
        out = flat_out.view(world * longest, width + 1)
        ids = out[:, width].view(id_dtype).long()
        union = touched_rows(ids, n_rows, exact=self._exact(ids))
        summed = values.new_zeros(union.numel(), width)
        return union, summed.index_add_(0, torch.searchsorted(union, ids), out[:, :width])


_ID_DTYPES = {4: torch.int32, 8: torch.int64}  # row ids stored in the values' bits
# torch 2.13 renamed all_gather_into_tensor; GPU nodes often carry an older build.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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

    A drop-in for the memory's ``query_norm`` (same parameters, buffers and state-dict keys):
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
    """Swap each memory's query BatchNorm for a synced one (before DDP wraps the model); other
    query norms (per token) need no synchronisation."""
    for mem in memories.values():
        if isinstance(mem.query_norm, nn.BatchNorm1d) and not isinstance(
            mem.query_norm, SyncedBatchNorm1d
        ):
            mem.query_norm = SyncedBatchNorm1d.from_batchnorm(mem.query_norm)
