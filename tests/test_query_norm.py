"""model.memory.query_norm: batchnorm | layernorm | none, its older name, and causality."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tiny_trainer import build_trainer

from pkm_lm.causality import future_leak, main
from pkm_lm.config import ModelConfig, TrainConfig, register_configs, to_train_config
from pkm_lm.distributed import SyncedBatchNorm1d, sync_query_batchnorms
from pkm_lm.errors import ConfigError
from pkm_lm.memory import MemoryConfig, ProductKeyMemory
from pkm_lm.model import build_model

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def tiny_model(query_norm: str, seed: int = 0):
    cfg = ModelConfig(
        n_layers=2, dim=32, n_heads=4, vocab_size=50, max_seq_len=16, dropout=0.0, attn_dropout=0.0
    )
    cfg.memory = type(cfg.memory)(
        n_keys=8, heads=2, knn=4, k_dim=16, layers=[2], query_norm=query_norm
    )
    torch.manual_seed(seed)
    return build_model(cfg)


def test_choices_and_a_clear_error_for_an_unknown_one():
    for kind, module in (("batchnorm", "BatchNorm1d"), ("layernorm", "GroupNorm"), ("none", None)):
        mem = ProductKeyMemory(12, 12, MemoryConfig(n_keys=4, heads=2, knn=2, query_norm=kind))
        assert type(mem.query_norm).__name__ == (module or "NoneType")
    assert MemoryConfig().query_norm == "batchnorm"  # the paper's, for reproduction
    with pytest.raises(ConfigError) as err:
        MemoryConfig(query_norm="groupnorm")
    assert str(err.value) == (
        "memory.query_norm=groupnorm is invalid: must be one of batchnorm, layernorm, none"
    )


def test_layernorm_normalises_each_heads_query_per_token():
    mem = ProductKeyMemory(
        12, 12, MemoryConfig(n_keys=4, heads=3, knn=2, k_dim=8, query_norm="layernorm")
    )
    x = torch.randn(5, 12) * 4 + 2
    q = mem.query(x)  # (5, 3, 8); the affine starts as the identity
    torch.testing.assert_close(q.mean(-1), torch.zeros(5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.var(-1, unbiased=False), torch.ones(5, 3), atol=1e-3, rtol=0)
    torch.testing.assert_close(mem.query(x[2:3]), q[2:3])  # a token alone: the same query


@pytest.mark.parametrize("old,new", [(True, "batchnorm"), (False, "none")])
def test_older_query_batchnorm_maps_to_query_norm(old, new):
    assert MemoryConfig(query_batchnorm=old).query_norm == new
    # A run's saved config.yaml written before query_norm existed, read through the schema.
    saved = OmegaConf.create({"model": {"memory": {"query_batchnorm": old, "layers": [1]}}})
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))
    assert (cfg.model.memory.query_norm, cfg.model.memory.query_batchnorm) == (new, None)
    # Its resolved config reads back the same (query_batchnorm: null after the mapping).
    again = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.structured(cfg))
    assert OmegaConf.to_object(again).model.memory.query_norm == new


def test_contradicting_old_and_new_names_is_an_error():
    with pytest.raises(ConfigError, match=r"memory.query_batchnorm=true is invalid: contradicts "
                       r"memory.query_norm=layernorm"):  # fmt: skip
        MemoryConfig(query_batchnorm=True, query_norm="layernorm")
    assert MemoryConfig(query_batchnorm=False, query_norm="none").query_norm == "none"


def test_state_dict_saved_as_query_bn_loads():
    model = tiny_model("batchnorm")
    with torch.no_grad():
        model.memories[2].query_norm.running_mean.fill_(0.5)
    old = {k.replace(".query_norm.", ".query_bn."): v for k, v in model.state_dict().items()}
    assert any(".query_bn." in k for k in old)
    fresh = tiny_model("batchnorm", seed=1)
    fresh.load_state_dict(old)  # strict: every renamed key is found
    assert torch.equal(fresh.memories[2].query_norm.running_mean, torch.full((32,), 0.5))


@pytest.mark.parametrize("query_norm", ["layernorm", "none"])
def test_causal_norms_leave_earlier_outputs_exactly_unchanged_in_training(query_norm):
    model = tiny_model(query_norm).train()
    tokens = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    for t in (0, 7, 14):
        assert future_leak(model, tokens, t, training=True) == (0.0, 0.0)


def test_batchnorm_leaks_the_future_in_training_only():
    model = tiny_model("batchnorm").train()
    tokens = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    bn = model.memories[2].query_norm
    before = bn.running_mean.clone()
    largest, mean = future_leak(model, tokens, 7, training=True)
    assert largest >= mean > 1e-6
    assert future_leak(model, tokens, 7, training=False) == (0.0, 0.0)
    assert torch.equal(bn.running_mean, before) and model.training  # left as it was


def test_leak_report_of_a_trained_run(corpus, tmp_path):
    steps = ["train.max_steps=1", "train.eval_interval=1", "train.checkpoint_interval=1"]
    build_trainer(corpus, "cpu", tmp_path / "run", *steps).fit()
    out = tmp_path / "leak.md"
    main([str(tmp_path / "run"), "--out", str(out)])
    row = out.read_text().splitlines()[-1].split(" | ")
    assert row[1:4] == ["batchnorm", "1", "16 x 32"]  # the trainer's default query norm
    largest, mean = map(float, row[4].split(" / "))
    assert largest >= mean > 0 and row[5] == "0 / 0 |"


@pytest.mark.parametrize("old,resumable", [(True, True), (False, False)])
def test_a_run_saved_with_query_batchnorm_resumes_with_the_norm_it_meant(old, resumable):
    saved = {"model": {"memory": {"query_batchnorm": old}}}
    now = TrainConfig()  # query_norm=batchnorm
    if resumable:
        assert now.check_resumable(saved, "old run") == []
    else:
        with pytest.raises(ConfigError, match="model.memory.query_norm: 'none' -> 'batchnorm'"):
            now.check_resumable(saved, "old run")


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
def test_only_batchnorm_is_synced_across_ranks(query_norm):
    model = tiny_model(query_norm)
    keys = list(model.state_dict())
    sync_query_batchnorms(model.memories)
    synced = isinstance(model.memories[2].query_norm, SyncedBatchNorm1d)
    assert synced == (query_norm == "batchnorm")
    assert list(model.state_dict()) == keys  # checkpoints unchanged by the swap


def test_an_unknown_override_names_the_key_as_typed():
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        dcfg = compose("train", ["model.memory.query_norm=groupnorm"])
    with pytest.raises(ConfigError) as err:
        to_train_config(dcfg)
    assert str(err.value) == (
        "model.memory.query_norm=groupnorm is invalid: must be one of batchnorm, layernorm, none"
    )
