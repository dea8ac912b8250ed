"""Memory usage and access-distribution metrics over an evaluation split (paper section 5)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class MemoryStats:
    """Per-slot sums of softmax weights and hit counts, over all queries and heads.

    ``update`` adds into the fixed-size accumulators on their device (no bincount, whose output
    size depends on the data and so waits for the device); ``all_reduce`` sums
    the accumulators across distributed ranks; ``compute`` turns them into the paper's metrics.
    """

    def __init__(
        self,
        n_slots: int,
        device: torch.device | str | None = None,
        table: MemoryStats | None = None,
    ):
        """``table``: the accumulators of a value table several layers share, which this
        layer's updates also go to (the table's usage is that of all its readers together)."""
        self.n_slots = n_slots
        self.weights = torch.zeros(n_slots, dtype=torch.float64, device=device)
        self.counts = torch.zeros(n_slots, dtype=torch.float64, device=device)
        self.table = table

    def reset(self) -> None:
        self.weights.zero_()
        self.counts.zero_()

    @torch.no_grad()
    def update(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """indices, weights: any matching shapes (e.g. (N, heads, knn))."""
        idx = indices.reshape(-1).to(self.counts.device)
        w = weights.reshape(-1).to(device=self.counts.device, dtype=torch.float64)
        self.counts.index_add_(0, idx, torch.ones_like(w))
        self.weights.index_add_(0, idx, w)
        if self.table is not None:
            self.table.update(indices, weights)

    def merge(self, other: MemoryStats) -> None:
        self.weights += other.weights.to(self.weights.device)
        self.counts += other.counts.to(self.counts.device)

    def all_reduce(self, group=None) -> None:
        """Sum the accumulators over ranks; a no-op outside torch.distributed."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.weights, group=group)
            dist.all_reduce(self.counts, group=group)

    def compute(self) -> dict[str, float]:
        """usage (%), KL from uniform, gini and the slots holding 50/90/99% of the mass.

        Metrics are computed for the weight distribution (``*_weights``) and the hit-count
        distribution (``*_counts``); an empty accumulator gives zero usage and NaN elsewhere.
        """
        out = {"usage": 100.0 * (self.counts > 0).sum().item() / self.n_slots}
        for name, acc in (("weights", self.weights), ("counts", self.counts)):
            out.update({f"{k}_{name}": v for k, v in _distribution_metrics(acc).items()})
        return out


def _distribution_metrics(acc: torch.Tensor) -> dict[str, float]:
    total = acc.sum()
    if total <= 0:
        nan = float("nan")
        return {"kl": nan, "gini": nan, "top50": nan, "top90": nan, "top99": nan}
    z = (acc / total).cpu()
    n = z.numel()
    z_log_z = torch.where(z > 0, z * z.clamp_min(1e-300).log(), torch.zeros_like(z))
    ascending = z.sort().values
    # Discrete Gini of the Lorenz curve (trapezoids): 0 for uniform access, 1 - 1/n for one
    # slot. XLM's formula omits the + 1/n term (it gives -1/n for uniform access).
    gini = 1.0 - 2.0 * ascending.cumsum(0).mean().item() + 1.0 / n
    descending_mass = ascending.flip(0).cumsum(0)
    out = {"kl": math.log(n) + z_log_z.sum().item(), "gini": gini}
    for pct in (50, 90, 99):
        target = torch.tensor(pct / 100.0, dtype=descending_mass.dtype)
        # Slots needed to reach pct% of the mass (tolerant to float rounding of the total).
        hits = int(torch.searchsorted(descending_mass, target * (1 - 1e-12)).item()) + 1
        out[f"top{pct}"] = min(hits, n)
    return out
