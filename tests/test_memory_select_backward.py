"""Both sub-key score backwards, the CPU's bags and the accelerators' two matmuls over the
dense score gradient, against plain autograd through top-k (on CPU tensors)."""

import pytest
import torch

from pkm_lm.memory import select
from pkm_lm.memory.select import bag_score_gradients, dense_score_gradients


@pytest.mark.parametrize("backward", [bag_score_gradients, dense_score_gradients])
def test_score_gradients_equal_autograd_through_topk(backward):
    g = torch.Generator().manual_seed(0)
    heads, n, n_keys, d, knn = 3, 11, 20, 8, 5
    query = torch.randn(heads, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(heads, n_keys, d, generator=g, dtype=torch.float64, requires_grad=True)
    scores, indices = torch.bmm(query, keys.transpose(1, 2)).topk(knn, dim=-1)
    grad_scores = torch.randn(scores.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(scores, (query, keys), grad_scores)
    got = backward(query.detach(), keys.detach(), indices, grad_scores)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_with_the_dense_backward_selection_compiles_into_one_graph(monkeypatch):
    """What torch.compile does with a GPU's selection, forced on CPU: no graph break, and the
    same slots, scores and gradients as eager."""
    monkeypatch.setattr(select, "dense_backward", lambda device: True)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(9, 2, 8, generator=g, requires_grad=True)
    sub_keys = torch.randn(2, 2, 6, 4, generator=g, requires_grad=True)
    pairs = select.candidate_pairs(4)

    def run(fn):
        scores, indices = fn(query, sub_keys, 4, pairs)
        return indices, scores, *torch.autograd.grad(scores.sin().sum(), (query, sub_keys))

    torch._dynamo.reset()
    compiled = torch.compile(select.product_topk, fullgraph=True, backend="aot_eager")
    expected, got = run(select.product_topk), run(compiled)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1:], expected[1:])
