"""The Transformer LM: memory placement, causality, meta-device build."""

from __future__ import annotations

import pytest
import torch

from pkm_lm.config import ModelConfig
from pkm_lm.memory import ProductKeyMemory
from pkm_lm.model import FeedForward, build_model

torch.set_num_threads(1)


def tiny(**memory) -> ModelConfig:
    cfg = ModelConfig(
        n_layers=4, dim=32, n_heads=4, vocab_size=50, max_seq_len=16, dropout=0.0, attn_dropout=0.0
    )
    for k, v in {"n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16, **memory}.items():
        setattr(cfg.memory, k, v)
    cfg.memory.__post_init__()
    cfg.__post_init__()
    return cfg


def kinds(model) -> list[tuple[str, str | None]]:
    """Per block: what its FFN slot holds, and what follows the block."""
    return [
        (type(b.ffn.fn).__name__, type(b.mem.fn).__name__ if b.mem is not None else None)
        for b in model.blocks
    ]


def test_explicit_layers_replace_the_ffn_one_based():
    model = build_model(tiny(layers=[2, 4]))
    mem, ffn = "ProductKeyMemory", "FeedForward"
    assert kinds(model) == [(ffn, None), (mem, None), (ffn, None), (mem, None)]
    assert sorted(model.memories) == [2, 4]
    assert model.memories[2] is model.blocks[1].ffn.fn


def test_add_keeps_the_ffn_and_follows_the_block():
    model = build_model(tiny(layers=[3], position="add"))
    assert kinds(model)[2] == ("FeedForward", "ProductKeyMemory")
    assert sum(isinstance(m, FeedForward) for m in model.modules()) == 4
    assert sum(isinstance(m, ProductKeyMemory) for m in model.modules()) == 1


def test_count_spreads_memories_evenly():
    model = build_model(tiny(count=1))
    assert sorted(model.memories) == [2]  # ceil(4 / 2) = 2
    assert sum(isinstance(m, ProductKeyMemory) for m in model.modules()) == 1


def test_no_memory_by_default():
    model = build_model(tiny())
    assert model.memories == {} and model.value_parameters() == []


def test_meta_build_allocates_nothing_and_init_is_seeded():
    cfg = tiny(layers=[2])
    meta = build_model(cfg, "meta")
    assert all(t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(0)
    b = build_model(cfg)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.isfinite(x.float()).all(), name
        assert torch.equal(x, y), name
    # Embeddings N(0, dim^-1/2); query BN starts as identity with fresh running stats.
    assert abs(a.tok_emb.weight.std().item() - 32**-0.5) < 0.03
    bn = a.memories[2].query_norm
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("position", ["replace", "add"])
def test_causal_and_shapes(norm, position):
    cfg = tiny(layers=[2], position=position)
    cfg.norm = norm
    model = build_model(cfg).eval()
    x = torch.randint(0, 50, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 10, 50)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_output_is_tied_to_token_embedding():
    """Token 7 is not in the input: its embedding row reaches the logits only as the output
    projection's row 7, so changing it changes logit 7 alone, and its gradient is that of the
    output projection."""
    model = build_model(tiny(layers=[2])).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not any("head" in n for n in names)
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    logits = model(idx)
    logits[..., 7].sum().backward()
    grad = model.tok_emb.weight.grad
    assert grad[7].abs().sum() > 0 and not grad[8:].any()  # rows of absent tokens: row 7 only
    with torch.no_grad():
        model.tok_emb.weight[7] += torch.randn(32)  # (not a constant: the final norm's
        # output sums to zero over the features, so a constant shift would leave logit 7 alone)
        changed = model(idx)
    assert torch.equal(changed[..., :7], logits[..., :7].detach())
    assert torch.equal(changed[..., 8:], logits[..., 8:].detach())
    assert not torch.allclose(changed[..., 7], logits[..., 7].detach(), atol=1e-3)


def test_value_parameters_get_sparse_gradients():
    model = build_model(tiny(layers=[2], sparse_grad=True))
    model(torch.randint(0, 50, (2, 8))).logsumexp(-1).mean().backward()
    (values,) = model.value_parameters()
    assert values.grad.is_sparse


def test_too_long_input_is_rejected():
    model = build_model(tiny())
    with pytest.raises(ValueError, match="model.max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
