"""``train.compile=true``: torch.compile of every Transformer block, in place.

Each block is compiled on its own (``nn.Module.compile``: parameter names, and so checkpoints,
stay those of the eager model). The memory's value read stays eager (``value_bag`` runs C++ or
Triton kernels and keeps a gradient hook: ``values.eager``, torch.compiler.disable, marks it),
and so does its per-half sub-key top-k on CPU, whose backward runs C++ bags; on accelerators
the sub-key scores, top-k, candidate merge and their backward compile with the rest.
``graph_breaks`` lists the breaks, for tests and logs.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module) -> None:
    """Compile each of ``model.blocks`` in place (shapes are fixed: no dynamic-shape graphs)."""
    for block in model.blocks:
        block.compile(dynamic=False)


def graph_breaks(model: nn.Module, idx: torch.Tensor) -> list[str]:
    """Why Dynamo breaks the graph in each block, one line per break, for tokens ``idx``."""
    reasons = []
    with torch.no_grad():
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for i, block in enumerate(model.blocks, start=1):
            forward = getattr(block, "_orig_mod", block).forward
            explained = torch._dynamo.explain(forward)(x)
            found = dict.fromkeys(_describe(b) for b in explained.break_reasons)  # once each
            reasons += [f"block {i}: {reason}" for reason in found]
            x = forward(x)
    return reasons


def _describe(graph_break) -> str:
    """'<function of the model where it broke>: <first line of Dynamo's reason>'."""
    frame = graph_break.user_stack[-1] if graph_break.user_stack else None
    where = f"{frame.name} ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame else "?"
    return f"{where}: {str(graph_break.reason).strip().splitlines()[0]}"
