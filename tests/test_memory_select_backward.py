"""The sub-key score backward of accelerators (two matmuls over the dense score gradient)
against plain autograd, on CPU tensors."""

import torch

from pkm_lm.memory.select import dense_score_gradients


def test_dense_score_gradients_equal_autograd_through_topk():
    g = torch.Generator().manual_seed(0)
    heads, n, n_keys, d, knn = 3, 11, 20, 8, 5
    query = torch.randn(heads, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(heads, n_keys, d, generator=g, dtype=torch.float64, requires_grad=True)
    scores, indices = torch.bmm(query, keys.transpose(1, 2)).topk(knn, dim=-1)
    grad_scores = torch.randn(scores.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(scores, (query, keys), grad_scores)
    got = dense_score_gradients(query.detach(), keys.detach(), indices, grad_scores)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
