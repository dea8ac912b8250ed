"""A value table cast to bf16 for inference: the same slots, outputs within bf16 rounding of
the fp32 table's, on every value-read path, and through load_run for evaluate/generate."""

import pytest
import torch

from pkm_lm.memory import MemoryConfig, ProductKeyMemory


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("v_dim", [None, 12])  # None: the output dim; 12: through value_proj
def test_a_bf16_table_reads_the_same_slots_within_bf16_rounding(kernel, v_dim):
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=8, v_dim=v_dim, kernel=kernel)
    mem = ProductKeyMemory(16, 16, cfg).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = mem(x)
        selected = mem.select(mem.query(x.reshape(-1, 16)))[1]
        mem.values.to(torch.bfloat16)
        got = mem(x)
        assert torch.equal(mem.select(mem.query(x.reshape(-1, 16)))[1], selected)
    assert got.dtype == torch.float32, "the output keeps the input's dtype"
    # bf16 keeps 8 mantissa bits: each value moves by at most 2^-9 of itself.
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=0, atol=float(scale) * 2**-7)
    assert not torch.equal(got, expected), "the values were read in bf16"
