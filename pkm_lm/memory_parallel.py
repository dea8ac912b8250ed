"""``distributed.memory_parallel=N``: value tables split by columns over groups of N ranks.

The ranks form a DeviceMesh of shape (world / N, N): the N consecutive ranks of a ``memory``
group split every value table by columns and read it together (``SplitValueRead``); the ranks
of a ``data`` group, one per memory group, hold the same columns. Keys, query networks and the
rest of the model stay whole on every rank (DDP).

The split tables are left out of DDP: a rank's gradient of its columns already sums over the
tokens of its whole memory group, so ``SplitGrads`` sums it over the data group and divides by
the world size, which is DDP's mean over every rank. Under fp16 the loss scaler of every rank
still takes the same decision: a split table's gradient can only be non-finite through a
non-finite output gradient, which also reaches the replicated parameters (DDP shares it).

Checkpoints hold whole tables (gathered on save, split again on load), so a run resumes under
any N, and evaluation, generation and export read its checkpoints as those of any other run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from pkm_lm.distributed import SparseGrads
from pkm_lm.errors import require
from pkm_lm.memory.parallel import SplitValueRead

if TYPE_CHECKING:  # the config (and Hydra) only for the checks: workers import this lightly
    from pkm_lm.config import TrainConfig

KEY = "distributed.memory_parallel"
# Elements per block when a table is gathered for a checkpoint: the transfer buffers stay small.
_GATHER_BLOCK = 1 << 24


def check_memory_parallel(cfg: TrainConfig, world_size: int) -> None:
    """Refuse a group size the run cannot be split by (before any work)."""
    size, model = cfg.distributed.memory_parallel, cfg.model
    if size == 1:
        return
    require(
        world_size % size == 0,
        KEY,
        size,
        f"must divide the world size {world_size} (the processes torchrun starts)",
    )
    v_dim = model.memory.v_dim or model.dim
    require(
        v_dim % size == 0,
        KEY,
        size,
        f"must divide the value dim {v_dim} (model.memory.v_dim, or model.dim when null)",
    )
    require(bool(model.memory_layers), KEY, size, "needs a memory layer: the model has none")
    require(
        not cfg.train.compile,
        KEY,
        size,
        "is not supported with train.compile=true yet (the split read's collectives inside "
        "compiled blocks are untested): use train.compile=false",
    )


class MemoryParallel:
    """This rank's place in the mesh, and the value tables it holds columns of."""

    def __init__(self, size: int, device: torch.device) -> None:
        world = dist.get_world_size()
        self.size, self.world = size, world
        mesh = init_device_mesh(
            device.type, (world // size, size), mesh_dim_names=("data", "memory")
        )
        self.group, self.replicas = mesh.get_group("memory"), mesh.get_group("data")
        self.index = dist.get_rank(self.group)  # which columns this rank holds
        # Token counts travel on the host: a gloo group of the same ranks.
        counts = self.group
        if dist.get_backend(self.group) != "gloo":
            counts, _ = dist.new_subgroups(size, backend="gloo")
        self.read = SplitValueRead(self.group, counts)
        self._model: nn.Module | None = None  # whose tables split_ split

    def columns(self, width: int) -> slice:
        """This rank's columns of a table ``width`` values wide."""
        part = width // self.size
        return slice(self.index * part, (self.index + 1) * part)

    def split_(self, model: nn.Module) -> None:
        """Give every value table of ``model``, built on the meta device, this rank's columns
        (a table several memories share is split once), read by the group; the model is then
        allocated and initialised (``materialize``): no rank ever holds a whole table."""
        split = set()
        for mem in model.memories.values():
            values = mem.values
            mem.value_columns = self.columns(values.embedding_dim)  # the whole table's width
            mem.read_values = self.read
            if id(values) in split:
                continue
            if values.weight.device.type != "meta":
                raise ValueError("MemoryParallel.split_ needs a model built on the meta device")
            values.weight = nn.Parameter(values.weight[:, mem.value_columns].clone())
            split.add(id(values))
        self._model = model

    @property
    def tables(self) -> list[nn.Parameter]:
        """The split tables, each once; looked up in the model each time, since allocating a
        model built on the meta device replaces its parameters."""
        return list(dict.fromkeys(mem.values.weight for mem in self._model.memories.values()))

    def _names(self) -> dict[str, nn.Parameter]:
        """State-dict name -> split table (a shared table has one name per memory)."""
        ids = {id(p) for p in self.tables}
        named = self._model.state_dict(keep_vars=True).items()
        return {name: p for name, p in named if id(p) in ids}

    def grad_sync(self, sparse: bool) -> SplitGrads:
        """What averages the split tables' gradients (``sparse``: row-sparse ones)."""
        return SplitGrads(self, sparse)

    # -- checkpoints: whole tables ---------------------------------------------------------
    def whole_tables(self, value_optim: torch.optim.Optimizer) -> dict | None:
        """The whole tables and their optimizer state, on the CPU of rank 0 (None elsewhere);
        every rank calls it (the ranks of the first memory group gather)."""
        if dist.get_rank() >= self.size:
            return None
        gathered = {id(p): self.whole(p.detach()) for p in self.tables}
        model = {name: gathered[id(p)] for name, p in self._names().items()}
        optim = {}
        for i, p in enumerate(_params(value_optim)):
            state = value_optim.state.get(p, {})
            optim[i] = {k: self.whole(v) for k, v in sorted(state.items()) if _is_table(v, p.shape)}
        return {"model": model, "optim": optim} if self.index == 0 else None

    def put_whole_(self, state: dict, whole: dict) -> None:
        """Put ``whole_tables``' tensors in place of the columns in a checkpoint's ``state``."""
        state["model"].update(whole["model"])
        saved = state["optim"]["values"]["state"]
        for i, tensors in whole["optim"].items():
            saved[i] = {**saved[i], **tensors}  # a copy: the optimizer's own dict stays as is

    def split_state_(self, state: dict, value_optim: torch.optim.Optimizer) -> None:
        """This rank's columns of the whole tables of a loaded checkpoint's ``state``."""
        self.split_weights_(state["model"])
        saved = state["optim"]["values"]["state"]
        for i, p in enumerate(_params(value_optim)):
            shape = torch.Size((p.shape[0], p.shape[1] * self.size))  # the whole table's
            if i in saved:
                saved[i] = {
                    k: self._mine(v) if _is_table(v, shape) else v for k, v in saved[i].items()
                }

    def split_weights_(self, model_state: dict) -> None:
        """This rank's columns of the whole tables in a model's state dict."""
        for name in self._names():
            model_state[name] = self._mine(model_state[name])

    def _mine(self, whole: torch.Tensor) -> torch.Tensor:
        return whole[:, self.columns(whole.shape[1])].contiguous()

    def whole(self, part: torch.Tensor) -> torch.Tensor | None:
        """The whole table of which every rank of the group holds ``part``'s columns, on the
        CPU of the group's first rank (None on the others), gathered in blocks of rows."""
        rows, width = part.shape
        mine = self.index == 0
        whole = torch.empty(rows, width * self.size, dtype=part.dtype) if mine else None
        step = max(1, _GATHER_BLOCK // (width * self.size))
        for start in range(0, rows, step):
            block = part[start : start + step]
            parts = self.read.gather(block)
            if mine:
                n = block.shape[0]
                whole[start : start + n] = (
                    parts.view(self.size, n, width).transpose(0, 1).flatten(1)
                )
        return whole


class SplitGrads:
    """Averages the split tables' gradients over every rank: the data group's sum divided by
    the world size (dense: one all-reduce; row-sparse: ``SparseGrads`` on the data group,
    which divides by its size, then by N). Same interface as ``SparseGrads``."""

    def __init__(self, parallel: MemoryParallel, sparse: bool) -> None:
        self.parallel, self.tables = parallel, parallel.tables
        self.sparse = SparseGrads(self.tables if sparse else [], group=parallel.replicas)

    def compact_(self) -> None:
        self.sparse.compact_()

    def all_reduce_(self) -> list[str]:
        branches = self.sparse.all_reduce_()
        replicas = dist.get_world_size(self.parallel.replicas)
        for p in self.tables:
            if p.grad is None:
                raise RuntimeError("a split value table got no gradient this step")
            if p.grad.is_sparse:
                p.grad._values().div_(self.parallel.size)
                continue
            if replicas > 1:
                dist.all_reduce(p.grad, group=self.parallel.replicas)
            p.grad.div_(self.parallel.world)
        return branches


def _params(optim: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in its state dict's order."""
    return [p for group in optim.param_groups for p in group["params"]]


def _is_table(value, shape: torch.Size) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == shape
