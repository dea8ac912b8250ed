"""Sparse memory finetuning: which value rows to train (TF-IDF of slot accesses), and freezing
everything else so that it stays bit-identical.

Lin et al. ("Continual learning via sparse memory finetuning", 2025) train only the memory
slots the new data reads much more than the pretraining data does. Here a slot's score is

    tf-idf(i) = tf(i) * idf(i),  tf(i) = c(i) / sum_j c(j),  idf(i) = ln((1 + D) / (1 + df(i))) + 1

where c(i) counts the accesses of slot i (top-k selections over every head and query) on the
new data, D is the number of background batches and df(i) how many of them access slot i (the
smoothed idf of scikit-learn: positive, so any slot the new data reads outranks one it does
not). Counts come from ``MemoryStats``; a value table read by several memories adds their
counts. The top ``T`` slots of each table are trained.

``Freezer`` freezes the rest: parameters outside the trained set stop requiring gradients (torch
optimisers skip a parameter without a gradient, whatever its momentum or weight decay), frozen
BatchNorms (the memory's query norm) stay in eval mode, so their statistics do not move; in a
partly trained table the frozen rows' gradients are zeroed as they accumulate (so clipping and
the optimiser see only the trained rows), and the frozen rows are copied back after every
optimiser step, because momentum and weight decay move a row even when its gradient is zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from pkm_lm.data import eval_batches
from pkm_lm.memory.values import row_sparse
from pkm_lm.metrics import memory_stats
from pkm_lm.model import TransformerLM

TRAINABLE = ("all", "memory", "top_slots")


def tables(model: TransformerLM) -> dict[nn.Parameter, list[int]]:
    """Each value table and the 1-based layers of the memories that read it."""
    out: dict[nn.Parameter, list[int]] = {}
    for layer, mem in model.memories.items():
        out.setdefault(mem.values.weight, []).append(layer)
    return out


@torch.no_grad()
def slot_counts(
    model: TransformerLM, tokens, seq_len: int, batch_size: int, max_tokens: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """(access counts per table, batches accessing each slot per table, batches) over the first
    ``max_tokens`` tokens of ``tokens``, in eval mode; tables in ``tables(model)`` order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    readers = list(tables(model).items())
    counts = [torch.zeros(p.shape[0], dtype=torch.float64) for p, _ in readers]
    batches_with = [torch.zeros(p.shape[0], dtype=torch.float64) for p, _ in readers]
    n_batches, seen = 0, 0
    with memory_stats(model) as stats:
        for batch in eval_batches(tokens, seq_len, batch_size):
            if seen >= max_tokens:
                break
            model(batch[:, :-1].to(device))
            seen += batch[:, :-1].numel()
            n_batches += 1
            for t, (_, layers) in enumerate(readers):
                batch_counts = sum(stats[layer].counts.cpu() for layer in layers)
                counts[t] += batch_counts
                batches_with[t] += batch_counts > 0
                for layer in layers:
                    stats[layer].reset()
    model.train(was_training)
    return counts, batches_with, n_batches


def tfidf(counts: torch.Tensor, batches_with: torch.Tensor, n_batches: int) -> torch.Tensor:
    """Each slot's TF-IDF score (module docstring): new-data counts, background batch counts."""
    tf = counts / counts.sum().clamp_min(1)
    idf = torch.log((1.0 + n_batches) / (1.0 + batches_with)) + 1.0
    return tf * idf


def top_slots(scores: torch.Tensor, t: int) -> torch.Tensor:
    """The ``t`` best-scored slots, ties broken by the lower index, sorted."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), i))
    return torch.tensor(sorted(order[:t]), dtype=torch.long)


def rank_slots(
    model: TransformerLM, new, background, seq_len: int, batch_size: int, max_tokens: int, t: int
) -> list[torch.Tensor]:
    """The top ``t`` slots of each value table by TF-IDF of new data against background data."""
    new_counts, _, _ = slot_counts(model, new, seq_len, batch_size, max_tokens)
    _, bg_with, bg_batches = slot_counts(model, background, seq_len, batch_size, max_tokens)
    return [top_slots(tfidf(c, w, bg_batches), t) for c, w in zip(new_counts, bg_with, strict=True)]


def pin_eval(module: nn.Module) -> None:
    """Keep ``module`` in eval mode whatever ``model.train()`` says: a frozen BatchNorm
    normalises with its pretrained statistics and does not update them."""
    module.eval()
    module.train = lambda mode=True: module


class Freezer:
    """Train only ``trainable`` of ``model`` (module docstring); ``slots``: the trained rows of
    each table (``tables`` order) when ``trainable="top_slots"``."""

    def __init__(
        self, model: TransformerLM, trainable: str, slots: list[torch.Tensor] | None = None
    ) -> None:
        values = list(tables(model))
        value_ids = {id(p) for p in values}
        if trainable != "all":
            for p in model.parameters():
                if id(p) not in value_ids:
                    p.requires_grad_(False)
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    pin_eval(module)
        self.partial: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if trainable == "top_slots":
            for p, rows in zip(values, slots, strict=True):
                keep = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                keep[rows.to(p.device)] = True
                frozen = (~keep).nonzero().squeeze(1)
                self.partial.append((p, keep, frozen, p.detach()[frozen].clone()))
                p.register_post_accumulate_grad_hook(self._mask_grad)

    def _mask_grad(self, p: nn.Parameter) -> None:
        keep = next(k for q, k, _, _ in self.partial if q is p)
        g = p.grad
        if g.is_sparse:
            g = g.coalesce()
            rows = keep[g.indices()[0]]
            p.grad = row_sparse(g.indices()[0, rows], g.values()[rows], g.shape)
        else:
            g.masked_fill_(~keep.unsqueeze(1), 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the frozen rows of partly trained tables back (after an optimiser step)."""
        for p, _, frozen, saved in self.partial:
            p.index_copy_(0, frozen, saved)

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Restore the frozen rows after every step of each of ``optimizers``."""
        for opt in optimizers:
            opt.register_step_post_hook(lambda *_: self.restore())

    def trained_params(self, model: TransformerLM) -> int:
        """How many numbers finetuning may change."""
        rows = {id(p): int(k.sum()) * math.prod(p.shape[1:]) for p, k, _, _ in self.partial}
        return sum(rows.get(id(p), p.numel()) for p in model.parameters() if p.requires_grad)
