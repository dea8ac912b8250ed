"""On a GPU, at the paper's sizes, bf16 and fp16 autocast select exactly the slots fp32 selects
(the CPU test of the same property runs in test_memory_layer.py): the layer scores in fp32
whatever autocast computes the rest in, and whichever kernel and matmul precision the scores
use, the selection must equal that of fp32 matmuls with TF32 off. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from pkm_lm.memory import MemoryConfig, ProductKeyMemory
from pkm_lm.memory.config import triton_installed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _exact_selection(select, query: torch.Tensor):
    """The layer's selection of ``query`` in fp32 matmuls with TF32 off."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return select(query.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_autocast_selects_exactly_the_fp32_slots_at_paper_sizes(dtype, kernel):
    if kernel == "triton" and not triton_installed():
        pytest.skip("triton is not installed")
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=512, heads=4, knn=32, k_dim=512, kernel=kernel)
    mem = ProductKeyMemory(1024, 1024, cfg).cuda().eval()
    x = torch.randn(8192, 1024, device="cuda")  # one GPU's 32 x 256 tokens
    seen, select = [], mem.select

    def recording_select(q):
        seen.append((q, *select(q)))
        return seen[-1][1:]

    mem.select = recording_select
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        mem(x)
    query, scores, indices = seen[0]
    with torch.no_grad():
        ref_scores, ref_indices = _exact_selection(select, query)
    assert scores.dtype == torch.float32
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
