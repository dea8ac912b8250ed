"""The Product Key Memory layer: query network, exact key selection, sparse value read."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .config import MemoryConfig, pick_kernel
from .select import candidate_pairs, flat_topk, product_topk
from .stats import MemoryStats
from .values import value_bag


def draw_rows(width: int) -> int:
    """Rows of a value table ``width`` values wide drawn at a time when it is initialised: a
    multiple of 16 and about 2^24 values (64 MB in fp32)."""
    return max(16, (1 << 24) // width // 16 * 16)


def draw_values_(table: torch.Tensor, width: int, columns: slice) -> None:
    """Fill ``table`` with ``columns`` of a N(0, width^-1/2) table ``width`` values wide, drawn
    in blocks of rows.

    Every rank of a table split over ranks by columns draws the same whole table, a block at a
    time, and keeps its columns: the ranks together hold the table one process would draw, and
    none holds more than its columns and one block. On the CPU a draw of 16 rows or a multiple
    of them continues the generator as one draw of the whole table does: the values equal it.
    """
    rows = draw_rows(width)
    for start in range(0, table.shape[0], rows):
        part = table[start : start + rows]
        block = torch.empty(part.shape[0], width, dtype=table.dtype, device=table.device)
        part.copy_(block.normal_(0.0, width**-0.5)[:, columns])


def make_query_norm(kind: str, heads: int, q_size: int) -> nn.Module | None:
    """The norm of ``q_size = heads * k_dim`` queries that ``MemoryConfig.query_norm`` names.

    "batchnorm" normalises each feature over the batch, whose later positions a causal LM must
    not see: in training a token's output then depends on the tokens after it (in evaluation the
    running statistics are fixed, and it does not). "layernorm" normalises each head's query over
    its own k_dim features (one group per head), with a per-feature scale and shift: per token,
    so causal.
    """
    if kind == "batchnorm":
        return nn.BatchNorm1d(q_size)
    if kind == "layernorm":
        return nn.GroupNorm(heads, q_size)
    return None


_QUERY_BN = re.compile(r"(^|\.)query_bn\.")


def rename_query_bn(state_dict: dict, prefix: str = "") -> None:
    """Rename, in place, the keys under ``prefix`` of a state dict saved when the query norm was
    the attribute ``query_bn`` (checkpoints and exports of earlier versions)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        renamed = prefix + _QUERY_BN.sub(r"\1query_norm.", key[len(prefix) :])
        if renamed != key:
            state_dict[renamed] = state_dict.pop(key)


class ProductKeyMemory(nn.Module):
    """m: R^input_dim -> R^output_dim, a drop-in replacement for a Transformer FFN.

    Each head maps x to a query, picks the knn best of n_keys**2 product keys exactly, and
    returns the softmax-weighted sum of their values; heads share one value table and their
    outputs are summed.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        config: MemoryConfig | None = None,
        values: nn.Embedding | None = None,
    ):
        """``values``: the value table of another memory, to read it too (one table shared by
        several layers: autograd sums the layers' gradients into it); that memory owns and
        initialises it. None: a table of this layer's own."""
        super().__init__()
        self.config = cfg = config if config is not None else MemoryConfig()
        self.input_dim, self.output_dim = input_dim, output_dim
        v_dim = cfg.v_dim or output_dim
        q_size = cfg.heads * cfg.k_dim
        if cfg.query_net == "linear":
            self.query_net = nn.Linear(input_dim, q_size)
        else:
            self.query_net = nn.Sequential(
                nn.Linear(input_dim, input_dim), nn.ReLU(), nn.Linear(input_dim, q_size)
            )
        self.query_norm = make_query_norm(cfg.query_norm, cfg.heads, q_size)
        self.register_load_state_dict_pre_hook(
            lambda _, state, prefix, *__: rename_query_bn(state, prefix)
        )
        if cfg.keys == "product":
            self.sub_keys = nn.Parameter(torch.empty(cfg.heads, 2, cfg.n_keys, cfg.k_dim // 2))
            # A buffer, so it moves with the module and no forward copies it from the host.
            self.register_buffer("pairs", candidate_pairs(cfg.knn), persistent=False)
        else:
            self.keys = nn.Parameter(torch.empty(cfg.heads, cfg.n_slots, cfg.k_dim))
        # Read through value_bag, never called; `sparse` tells DDP to expect sparse gradients.
        self.owns_values = values is None
        # The columns of the whole (n_slots, v_dim) table this module's ``values`` hold: all,
        # unless the table is split over ranks (pkm_lm.memory_parallel sets them).
        self.value_columns = slice(0, v_dim)
        if values is None:
            values = nn.Embedding(cfg.n_slots, v_dim, sparse=cfg.sparse_grad)
        self.values = values
        found = (values.num_embeddings, values.embedding_dim, values.sparse)
        if found != (cfg.n_slots, v_dim, cfg.sparse_grad):
            raise ValueError(
                f"a shared value table of (slots, v_dim, sparse) = {found} does not fit this "
                f"layer's {(cfg.n_slots, v_dim, cfg.sparse_grad)}"
            )
        self.value_proj = nn.Linear(v_dim, output_dim) if v_dim != output_dim else None
        self.gate = nn.Linear(input_dim, output_dim, bias=False) if cfg.gated else None
        self.stats: MemoryStats | None = None  # set to collect usage/KL on every forward
        # value_bag's signature; a table split over ranks is read by a SplitValueRead instead.
        self.read_values = value_bag
        self.reset_memory_parameters()

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        """XLM initialisation: keys U(-1/sqrt(dim), 1/sqrt(dim)), values N(0, v_dim^-1/2) (by the
        table's owner only: a shared table is drawn once).

        Also fills the candidate-pair buffer, for modules built on the meta device."""
        cfg = self.config
        if cfg.keys == "product":
            self.pairs.copy_(candidate_pairs(cfg.knn))
        keys = self.sub_keys if cfg.keys == "product" else self.keys
        bound = 1.0 / math.sqrt(keys.shape[-1])
        keys.uniform_(-bound, bound)
        if self.owns_values:
            draw_values_(self.values.weight, self.values.embedding_dim, self.value_columns)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """(N, input_dim) -> (N, heads, k_dim): the query network, its norm included."""
        cfg = self.config
        q = self.query_net(x)
        if self.query_norm is not None:  # the norm in fp32 under autocast
            q = self.query_norm(q.to(self.query_norm.weight.dtype))
        q = F.dropout(q, cfg.query_dropout, self.training)
        return q.view(x.shape[0], cfg.heads, cfg.k_dim)

    def select(self, query: torch.Tensor):
        """(N, heads, k_dim) -> (scores, indices), both (N, heads, knn), best first.

        Scores are computed in fp32 (or the parameters' wider dtype) whatever the autocast
        dtype: bf16 keeps 8 mantissa bits, enough to swap near-tied slots at the top-k
        boundary and to round the softmax inputs. Matmuls follow torch's TF32 setting (off by
        default; on, it rounds these scores too).
        """
        keys = self.sub_keys if self.config.keys == "product" else self.keys
        dtype = torch.promote_types(keys.dtype, torch.float32)
        with torch.autocast(query.device.type, enabled=False):
            query, keys = query.to(dtype), keys.to(dtype)
            if self.config.keys == "product":
                return product_topk(query, keys, self.config.knn, self.pairs)
            return flat_topk(query, keys, self.config.knn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        lead_shape = x.shape[:-1]
        x = F.dropout(x.reshape(-1, self.input_dim), cfg.input_dropout, self.training)
        # Named regions for torch.profiler (pkm_lm.perf.profile); free when it is not running.
        with record_function("query"):
            query = self.query(x)
        with record_function("select"):
            scores, indices = self.select(query)  # (N, H, knn)
            weights = torch.softmax(
                scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)
            )
        weights = F.dropout(weights, cfg.value_dropout, self.training)
        if self.stats is not None:
            self.stats.update(indices.detach(), weights.detach())
        n = x.shape[0]
        with record_function("value_read"):
            out = self.read_values(  # explicit widths: n may be 0 (an empty batch)
                indices.reshape(n, cfg.heads * cfg.knn),
                weights.reshape(n, cfg.heads * cfg.knn),
                self.values.weight,
                cfg.sparse_grad,
                pick_kernel(cfg.kernel, x.device),
            )  # (N, v_dim), summed over heads and knn
        # A table cast to bf16 for inference reads in bf16; the output keeps the input's dtype.
        out = out.to(torch.promote_types(out.dtype, x.dtype))
        if self.value_proj is not None:
            out = self.value_proj(out)
        if self.gate is not None:
            out = out * F.silu(self.gate(x))
        return out.reshape(*lead_shape, self.output_dim)

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"input_dim={self.input_dim}, output_dim={self.output_dim}, keys={cfg.keys}, "
            f"slots={cfg.n_keys}^2, heads={cfg.heads}, knn={cfg.knn}, k_dim={cfg.k_dim}"
        )
