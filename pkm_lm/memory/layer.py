"""The Product Key Memory layer: query network, exact key selection, sparse value read."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MemoryConfig, pick_kernel
from .select import candidate_pairs, flat_topk, product_topk
from .stats import MemoryStats
from .values import value_bag


class ProductKeyMemory(nn.Module):
    """m: R^input_dim -> R^output_dim, a drop-in replacement for a Transformer FFN.

    Each head maps x to a query, picks the knn best of n_keys**2 product keys exactly, and
    returns the softmax-weighted sum of their values; heads share one value table and their
    outputs are summed.
    """

    def __init__(self, input_dim: int, output_dim: int, config: MemoryConfig | None = None):
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
        self.query_bn = nn.BatchNorm1d(q_size) if cfg.query_batchnorm else None
        if cfg.keys == "product":
            self.sub_keys = nn.Parameter(torch.empty(cfg.heads, 2, cfg.n_keys, cfg.k_dim // 2))
            # A buffer, so it moves with the module and no forward copies it from the host.
            self.register_buffer("pairs", candidate_pairs(cfg.knn), persistent=False)
        else:
            self.keys = nn.Parameter(torch.empty(cfg.heads, cfg.n_slots, cfg.k_dim))
        # Read through value_bag, never called; `sparse` tells DDP to expect sparse gradients.
        self.values = nn.Embedding(cfg.n_slots, v_dim, sparse=cfg.sparse_grad)
        self.value_proj = nn.Linear(v_dim, output_dim) if v_dim != output_dim else None
        self.gate = nn.Linear(input_dim, output_dim, bias=False) if cfg.gated else None
        self.stats: MemoryStats | None = None  # set to collect usage/KL on every forward
        self.reset_memory_parameters()

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        """XLM initialisation: keys U(-1/sqrt(dim), 1/sqrt(dim)), values N(0, v_dim^-1/2).

        Also fills the candidate-pair buffer, for modules built on the meta device."""
        cfg = self.config
        if cfg.keys == "product":
            self.pairs.copy_(candidate_pairs(cfg.knn))
        keys = self.sub_keys if cfg.keys == "product" else self.keys
        bound = 1.0 / math.sqrt(keys.shape[-1])
        keys.uniform_(-bound, bound)
        self.values.weight.normal_(0.0, self.values.weight.shape[1] ** -0.5)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """(N, input_dim) -> (N, heads, k_dim): the query network, BatchNorm included."""
        cfg = self.config
        q = self.query_net(x)
        if self.query_bn is not None:
            q = self.query_bn(q.to(self.query_bn.weight.dtype))  # BN in fp32 under autocast
        q = F.dropout(q, cfg.query_dropout, self.training)
        return q.view(x.shape[0], cfg.heads, cfg.k_dim)

    def select(self, query: torch.Tensor):
        """(N, heads, k_dim) -> (scores, indices), both (N, heads, knn), best first.

        Scores are computed in fp32 (or the parameters' wider dtype) whatever the autocast
        dtype: bf16 keeps 8 mantissa bits, enough to swap near-tied slots at the top-k
        boundary and to round the softmax inputs. TF32 matmuls stay allowed on GPUs.
        """
        keys = self.sub_keys if self.config.keys == "product" else self.keys
        dtype = torch.promote_types(keys.dtype, torch.float32)
        with torch.autocast(query.device.type, enabled=False):
            query, keys = query.to(dtype), keys.to(dtype)
            if self.config.keys == "product":
                kernel = pick_kernel(self.config.kernel, query.device)
                return product_topk(query, keys, self.config.knn, self.pairs, kernel)
            return flat_topk(query, keys, self.config.knn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        lead_shape = x.shape[:-1]
        x = F.dropout(x.reshape(-1, self.input_dim), cfg.input_dropout, self.training)
        scores, indices = self.select(self.query(x))  # (N, H, knn)
        weights = torch.softmax(
            scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)
        )
        weights = F.dropout(weights, cfg.value_dropout, self.training)
        if self.stats is not None:
            self.stats.update(indices.detach(), weights.detach())
        n = x.shape[0]
        out = value_bag(
            indices.reshape(n, -1),
            weights.reshape(n, -1),
            self.values.weight,
            cfg.sparse_grad,
            pick_kernel(cfg.kernel, x.device),
        )  # (N, v_dim), summed over heads and knn
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
