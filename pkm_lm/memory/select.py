"""Exact top-k key selection: product keys (Lample et al. 2019) and flat keys (baseline).

Both return ``(scores, indices)`` of shape ``(N, heads, knn)``: raw dot products sorted in
descending order and slot indices in ``[0, n_slots)``.
"""

from __future__ import annotations

import torch

from .values import eager, row_gradients


class _HalfTopk(torch.autograd.Function):
    """Top-k sub-keys of one query half, with a backward chosen for the device.

    On CPU only knn of the n_keys columns of the score gradient are non-zero, so both products
    are bags over the selected rows: O(N knn d) work, not O(N n d). On accelerators the bags
    gather a d-wide row per read and sort the reads (2 x 1 GB gathered per half at the paper's
    sizes, 8,192 tokens x 4 heads x 32 reads of 256 floats); two matmuls over the dense
    (H, N, n_keys) score gradient move ~70 MB and run on the matrix units instead.
    Every shape is known in advance: nothing waits for the device.
    """

    @staticmethod
    def forward(ctx, query, keys, knn):  # (H, N, d), (H, n, d) -> (H, N, knn) x 2
        scores, indices = torch.bmm(query, keys.transpose(1, 2)).topk(knn, dim=-1)
        ctx.save_for_backward(query, keys, indices)
        ctx.mark_non_differentiable(indices)
        return scores, indices

    @staticmethod
    def backward(ctx, grad_scores, _):
        query, keys, indices = ctx.saved_tensors
        if dense_backward(keys.device):
            grads = dense_score_gradients(query, keys, indices, grad_scores)
        else:
            grads = bag_score_gradients(query, keys, indices, grad_scores, ctx.needs_input_grad)
        return *grads, None


def dense_backward(device: torch.device) -> bool:
    """The score backward of ``device``: two dense matmuls (accelerators) or bags (CPU)."""
    return device.type != "cpu"


def bag_score_gradients(query, keys, indices, grad_scores, needs=(True, True)):
    """(grad_query, grad_keys) of the scores top-k picked, as bags over the selected rows:
    grad_query[h, n] sums grad_scores * keys[indices], grad_keys is that read's table gradient.
    ``needs``: which of the two to compute (None for the other)."""
    heads, n, d = keys.shape
    # Index into all heads' keys at once: head h's key j is row h * n + j.
    rows = (indices + torch.arange(heads, device=keys.device).view(-1, 1, 1) * n).flatten(0, 1)
    weights = grad_scores.flatten(0, 1).to(keys.dtype)  # (H*N, knn)
    grad_query = grad_keys = None
    if needs[0]:
        grad_query = torch.nn.functional.embedding_bag(
            rows, keys.reshape(-1, d), mode="sum", per_sample_weights=weights
        ).view(query.shape)
    if needs[1]:
        every_row = torch.arange(heads * n, device=keys.device)
        grad_keys, _ = row_gradients(rows, weights, query.reshape(-1, d).to(keys.dtype), every_row)
        grad_keys = grad_keys.view(keys.shape)
    return grad_query, grad_keys


def dense_score_gradients(query, keys, indices, grad_scores):
    """(grad_query, grad_keys) of ``bmm(query, keys^T)`` whose gradient is ``grad_scores`` at
    ``indices`` (unique per row, as top-k makes them) and zero elsewhere."""
    dense = torch.zeros(*query.shape[:2], keys.shape[1], dtype=keys.dtype, device=keys.device)
    dense.scatter_(-1, indices, grad_scores.to(keys.dtype))  # (H, N, n_keys)
    return torch.bmm(dense, keys).to(query.dtype), torch.bmm(
        dense.transpose(1, 2), query.to(keys.dtype)
    )


def _half_topk(query, keys, knn: int):
    """``_HalfTopk`` for ``query``'s device. With the dense backward, torch.compile traces the
    scores, the top-k, the candidate merge and their backward into one graph; the CPU's bags
    call C++ passes Dynamo cannot trace, so there it stays eager (a graph break)."""
    if dense_backward(query.device):
        return _HalfTopk.apply(query, keys, knn)
    return _eager_half_topk(query, keys, knn)


@eager
def _eager_half_topk(query: torch.Tensor, keys: torch.Tensor, knn: int):
    return _HalfTopk.apply(query, keys, knn)


def candidate_pairs(knn: int) -> torch.Tensor:
    """(2, P) ranks (a, b) of the two sorted sub-key lists that can reach the joint top-k.

    With both lists sorted, the (a+1)(b+1) pairs (a' <= a, b' <= b) all score at least as high as
    (a, b); so (a, b) can only be in the top-k if (a+1)(b+1) <= knn. This keeps about
    knn * ln(knn) of the knn**2 candidates (119 of 1024 for knn=32) and is still exact.
    """
    a_ranks, b_ranks = [], []
    for a in range(knn):
        for b in range(knn // (a + 1)):
            a_ranks.append(a)
            b_ranks.append(b)
    return torch.tensor([a_ranks, b_ranks])


def product_topk(
    query: torch.Tensor,
    sub_keys: torch.Tensor,
    knn: int,
    pairs: torch.Tensor,
):
    """Top-k over the n_keys**2 product keys of each head, without scoring them all.

    query: (N, heads, k_dim); sub_keys: (heads, 2, n_keys, k_dim // 2); pairs:
    ``candidate_pairs(knn)`` on the query's device (kept there by the caller: building it
    per call would copy it from the host every forward).
    """
    n, heads, k_dim = query.shape
    n_keys = sub_keys.shape[2]
    halves = query.view(n, heads, 2, k_dim // 2).permute(2, 1, 0, 3)  # (2, H, N, k_dim/2)
    # Best knn sub-keys of each half, sorted descending: (H, N, knn) each.
    s1, i1 = _half_topk(halves[0], sub_keys[:, 0], knn)
    s2, i2 = _half_topk(halves[1], sub_keys[:, 1], knn)
    a, b = pairs
    candidates = s1[..., a] + s2[..., b]  # (H, N, P)
    scores, best = candidates.topk(knn, dim=-1)  # (H, N, knn)
    indices = i1.gather(-1, a[best]) * n_keys + i2.gather(-1, b[best])
    return scores.transpose(0, 1), indices.transpose(0, 1)


def flat_topk(query: torch.Tensor, keys: torch.Tensor, knn: int, chunk_size: int = 65536):
    """Exhaustive top-k over explicit keys, in chunks of keys so the score matrix stays small.

    query: (N, heads, k_dim); keys: (heads, n_slots, k_dim). Selection runs without autograd;
    the selected scores are recomputed from the gathered keys so gradients reach keys and query.
    """
    q = query.transpose(0, 1)  # (H, N, k_dim)
    best_scores = best_indices = None
    with torch.no_grad():
        for start in range(0, keys.shape[1], chunk_size):
            block = torch.bmm(q, keys[:, start : start + chunk_size].transpose(1, 2))
            s, i = block.topk(min(knn, block.shape[-1]), dim=-1)
            i = i + start
            if best_scores is not None:
                s, pos = torch.cat([best_scores, s], -1).topk(knn, dim=-1)
                i = torch.cat([best_indices, i], -1).gather(-1, pos)
            best_scores, best_indices = s, i
    selected = keys[torch.arange(keys.shape[0], device=keys.device)[:, None, None], best_indices]
    scores = torch.einsum("hnd,hnkd->hnk", q, selected.to(q.dtype))
    scores, order = scores.sort(dim=-1, descending=True)  # recomputed scores may reorder ties
    return scores.transpose(0, 1), best_indices.gather(-1, order).transpose(0, 1)
