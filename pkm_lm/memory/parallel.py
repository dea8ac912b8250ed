"""The value read of a table whose columns are split over the ranks of a process group.

Rank i of a group of ``size`` ranks holds columns [i v / size, (i + 1) v / size) of the table
(all |K| rows). A read all-gathers the group's (indices, weights), reads this rank's columns for
every token of the group with ``value_bag`` (any kernel, dense or sparse gradient), and sends
each token's columns back to the rank the token came from (all-to-all). The backward mirrors
it: an all-to-all of the output gradient, ``value_bag``'s own backward, and a reduce-scatter
(sum) of the read weights' gradient. The table's gradient holds this rank's columns, summed over
the group's tokens.

Ranks may hold different numbers of tokens (an evaluation's last batch, or none): the counts
are exchanged on the host (``count_group``, gloo, so an accelerator is not waited for) and the
reads padded to the longest with weight-0 reads of row 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .values import value_bag

# torch 2.13 renamed these collectives; GPU nodes often carry an older build.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class SplitValueRead:
    """``value_bag`` for a table split by columns over ``group`` (same signature, same output)."""

    def __init__(self, group: dist.ProcessGroup, count_group: dist.ProcessGroup) -> None:
        """``count_group``: the same ranks on gloo (``group`` itself when that is gloo)."""
        self.group, self.count_group = group, count_group
        self.size = dist.get_world_size(group)

    def token_counts(self, n: int) -> list[int]:
        """Every group rank's number of tokens in this read, in group-rank order."""
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([n]), group=self.count_group)
        return [int(c) for c in counts]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The group's ``x`` (equal shapes), concatenated along dim 0 in group-rank order."""
        out = x.new_empty(self.size * x.shape[0], *x.shape[1:])
        _all_gather(out, x.contiguous(), group=self.group)
        return out

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        """Block i of ``x`` (dim 0 in ``size`` equal blocks) to group rank i; block i of the
        result came from group rank i."""
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=self.group)
        return out

    def scatter_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Block i (dim 0) of the sum of the group's ``x``, to group rank i."""
        out = x.new_empty(x.shape[0] // self.size, *x.shape[1:])
        _reduce_scatter(out, x.contiguous(), group=self.group)
        return out

    def __call__(self, indices, weights, table, sparse: bool = False, kernel: str = "torch"):
        """(N, R) reads of this rank's tokens -> (N, v): every column, gathered from the group."""
        return _SplitRead.apply(weights, table, indices, self, sparse, kernel)


class _SplitRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, table, indices, read: SplitValueRead, sparse, kernel):
        n = indices.shape[0]
        longest = max(read.token_counts(n))
        if longest > n:  # weight-0 reads of row 0: zero output, zero gradient
            indices = F.pad(indices, (0, 0, 0, longest - n))
            weights = F.pad(weights, (0, 0, 0, longest - n))
        group_indices, group_weights = read.gather(indices), read.gather(weights)
        # value_bag builds its own graph here (on the table itself: its gradient memory is
        # reused across steps); backward runs it with the group's gradient of the columns.
        with torch.enable_grad():
            group_weights.requires_grad_(ctx.needs_input_grad[0])
            columns = value_bag(group_indices, group_weights, table, sparse, kernel)
        width = table.shape[1]
        if any(ctx.needs_input_grad):
            ctx.read, ctx.n, ctx.longest, ctx.width = read, n, longest, width
            ctx.columns, ctx.inputs = columns, (group_weights, table)
        # Block i of the result: group rank i's columns of this rank's tokens.
        mine = read.exchange(columns.detach()).view(read.size, longest, width)
        return mine[:, :n].transpose(0, 1).reshape(n, read.size * width)

    @staticmethod
    def backward(ctx, grad):
        read, n, longest, width = ctx.read, ctx.n, ctx.longest, ctx.width
        blocks = grad.reshape(n, read.size, width).transpose(0, 1)  # block i: rank i's columns
        if longest > n:
            blocks = F.pad(blocks, (0, 0, 0, longest - n))
        grad_columns = read.exchange(blocks.reshape(read.size * longest, width))
        wanted = [x for x, need in zip(ctx.inputs, ctx.needs_input_grad[:2], strict=True) if need]
        grads = iter(torch.autograd.grad(ctx.columns, wanted, grad_columns))
        grad_weights = next(grads) if ctx.needs_input_grad[0] else None
        grad_table = next(grads) if ctx.needs_input_grad[1] else None
        if grad_weights is not None:  # each rank read its columns: the sum over the group
            grad_weights = read.scatter_sum(grad_weights)[:n]
        del ctx.columns, ctx.inputs
        return grad_weights, grad_table, None, None, None, None
