"""MemoryStats on hand-made access patterns and merging (summed over 2 gloo ranks: in
tests/test_distributed.py, with the other 2-rank checks)."""

import math

import pytest
import torch

from pkm_lm.memory import MemoryConfig, MemoryStats, ProductKeyMemory


def test_uniform_access_full_usage_zero_kl():
    stats = MemoryStats(10)
    stats.update(torch.arange(10).view(5, 1, 2), torch.full((5, 1, 2), 0.5))
    m = stats.compute()
    assert m["usage"] == 100.0
    assert abs(m["kl_weights"]) < 1e-12 and abs(m["kl_counts"]) < 1e-12
    assert abs(m["gini_weights"]) < 1e-12
    assert (m["top50_counts"], m["top90_counts"], m["top99_counts"]) == (5, 9, 10)


def test_single_slot_kl_is_log_slots():
    stats = MemoryStats(16)
    stats.update(torch.full((7, 2, 3), 5), torch.rand(7, 2, 3))
    m = stats.compute()
    assert m["usage"] == 100.0 / 16
    assert math.isclose(m["kl_weights"], math.log(16)) and math.isclose(
        m["kl_counts"], math.log(16)
    )
    assert math.isclose(m["gini_counts"], 1 - 1 / 16)
    assert m["top50_weights"] == m["top99_weights"] == 1


def test_weights_and_counts_differ_when_weights_do():
    stats = MemoryStats(4)
    stats.update(torch.tensor([[0, 1]]), torch.tensor([[0.9, 0.1]]))
    m = stats.compute()
    assert m["usage"] == 50.0
    assert math.isclose(m["kl_counts"], math.log(4) - math.log(2))
    expected = math.log(4) + 0.9 * math.log(0.9) + 0.1 * math.log(0.1)
    assert math.isclose(m["kl_weights"], expected, rel_tol=1e-6)


def test_merge_equals_one_pass_and_reset():
    idx, w = torch.randint(0, 50, (40, 4, 3)), torch.rand(40, 4, 3)
    whole, a, b = MemoryStats(50), MemoryStats(50), MemoryStats(50)
    whole.update(idx, w)
    a.update(idx[:15], w[:15])
    b.update(idx[15:], w[15:])
    a.merge(b)
    assert a.compute() == pytest.approx(whole.compute())
    a.reset()
    assert a.compute()["usage"] == 0.0


def test_layer_feeds_stats_on_forward():
    torch.manual_seed(0)
    mem = ProductKeyMemory(8, 8, MemoryConfig(n_keys=4, heads=2, knn=3, k_dim=4)).eval()
    mem.stats = MemoryStats(16)
    mem(torch.randn(5, 8))
    assert mem.stats.counts.sum().item() == 5 * 2 * 3
    assert math.isclose(
        mem.stats.weights.sum().item(), 5 * 2, rel_tol=1e-6
    )  # softmax sums to 1 per head
