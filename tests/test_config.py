"""Config composition and validation: every shipped experiment, every validation error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pkm_lm.config import TrainConfig, register_configs, spread_evenly, to_train_config
from pkm_lm.errors import ConfigError
from pkm_lm.model import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(
    p.relative_to(CONFIGS / "experiment").with_suffix("").as_posix()
    for p in (CONFIGS / "experiment").rglob("*.yaml")
)
CLAIM = re.compile(r"^#\s*n_params:\s*([\d,_]+)", re.MULTILINE)
VOCAB = 1000  # stands in for the dataset's vocabulary when building without data

register_configs()


def compose_train(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return to_train_config(compose("train", overrides=overrides))


def expected_params(cfg: TrainConfig) -> int:
    """Parameter count written out from the architecture, independently of the model code."""
    m, d = cfg.model, cfg.model.dim
    n = VOCAB * d + m.max_seq_len * d  # tied token embedding, positions
    ln = 2 * d
    attn = 3 * d * d + 3 * d + d * d + d + ln
    ffn = 2 * m.ffn_mult * d * d + m.ffn_mult * d + d + ln
    mem_cfg = m.memory
    q = mem_cfg.heads * mem_cfg.k_dim
    v_dim = mem_cfg.v_dim or d
    mem = d * q + q if mem_cfg.query_net == "linear" else d * d + d + d * q + q
    mem += 2 * q if mem_cfg.query_norm != "none" else 0
    if mem_cfg.keys == "product":
        mem += mem_cfg.heads * 2 * mem_cfg.n_keys * (mem_cfg.k_dim // 2)
    else:
        mem += mem_cfg.heads * mem_cfg.n_slots * mem_cfg.k_dim
    mem += mem_cfg.n_slots * v_dim + (v_dim * d + d if v_dim != d else 0)
    mem += d * d if mem_cfg.gated else 0
    n_mem = len(m.memory_layers)
    per_mem = mem + ln  # its residual LayerNorm, in place of the FFN's or its own
    n_ffn = m.n_layers - (n_mem if mem_cfg.position == "replace" else 0)
    final = ln if m.norm == "pre" else 0
    # A shared value table is counted once, not once per memory layer.
    shared = (n_mem - 1) * mem_cfg.n_slots * v_dim if mem_cfg.share_values and n_mem else 0
    return n + m.n_layers * attn + n_ffn * ffn + n_mem * per_mem + final - shared


def test_experiments_are_found():
    assert {"demo_0mem", "demo_1mem", "12L_1mem"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds_on_meta(name):
    cfg = compose_train([f"+experiment={name}"])
    cfg.model.vocab_size = VOCAB
    model = build_model(cfg.model, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == expected_params(cfg)
    assert sorted(model.memories) == cfg.model.memory_layers
    claim = CLAIM.search((CONFIGS / "experiment" / f"{name}.yaml").read_text())
    if claim:  # "# n_params: N": parameters without the (vocabulary-sized) token embedding
        assert model.num_params(exclude_token_embedding=True) == int(
            re.sub(r"[,_]", "", claim.group(1))
        )


@pytest.mark.parametrize("name", ["demo_0mem", "demo_1mem", "12L_1mem"])
def test_trainer_experiments_state_their_parameter_count(name):
    assert CLAIM.search((CONFIGS / "experiment" / f"{name}.yaml").read_text())


def test_paper_12L_1mem_matches_the_paper_setting():
    cfg = compose_train(["+experiment=12L_1mem"])
    m = cfg.model
    assert (m.n_layers, m.dim, m.n_heads) == (12, 1024, 16)
    assert (m.memory.n_keys**2, m.memory.heads, m.memory.knn, m.memory.k_dim) == (
        512**2,
        4,
        32,
        512,
    )
    assert m.memory_layers == [6] and m.memory.query_norm == "batchnorm"
    assert (cfg.optim.lr, cfg.optim.value_lr, cfg.optim.betas) == (2.5e-4, 1e-3, [0.9, 0.98])


@pytest.mark.parametrize(
    ("n_layers", "count", "expected"),
    [
        (16, 2, [6, 12]),
        (12, 1, [6]),
        (12, 2, [4, 8]),
        (12, 3, [3, 6, 9]),
        (24, 1, [12]),
        (6, 0, []),
    ],
)
def test_spread_evenly_follows_the_paper(n_layers, count, expected):
    assert spread_evenly(n_layers, count) == expected


def test_defaults_and_resolved_values():
    cfg = compose_train([])
    assert cfg.model.max_seq_len == cfg.data.seq_len
    assert cfg.model.memory.sparse_grad and cfg.optim.value_optimizer == "lazy_adam"
    assert cfg.model.memory_layers == []
    cfg = compose_train(["model.n_layers=16", "model.memory.count=2"])
    assert cfg.model.memory_layers == [6, 12]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.memory.layers=[7]"], "model.memory.layers=[7] is invalid: indices [7] out of"),
        (["model.memory.layers=[0]"], "count from 1"),
        (["model.memory.layers=[2,2]"], "model.memory.layers=[2, 2] is invalid: has duplicate"),
        (["model.memory.layers=[2]", "model.memory.count=1"], "alternatives"),
        (["model.memory.count=7"], "model.memory.count=7 is invalid: exceeds model.n_layers=6"),
        (["model.n_layers=5", "model.memory.count=3"], "cannot be spread evenly"),
        (
            ["model.memory.position=after"],
            "model.memory.position=after is invalid: must be one of replace, add",
        ),
        (["model.n_heads=7"], "model.n_heads=7 is invalid: must divide model.dim=512"),
        (["model.norm=mid"], "model.norm=mid is invalid: must be one of pre, post"),
        (["model.dropout=1.5"], "model.dropout=1.5 is invalid: must be a probability in [0, 1)"),
        (["model.memory.k_dim=7"], "model.memory.k_dim=7 is invalid: must be an even integer"),
        (
            ["model.memory.knn=1000"],
            "model.memory.knn=1000 is invalid: must be an integer in [1, model.memory.n_keys=512]",
        ),
        (["data.seq_len=0"], "data.seq_len=0 is invalid: must be an integer >= 1"),
        (
            ["model.max_seq_len=100"],
            "model.max_seq_len=100 is invalid: must be >= data.seq_len=256",
        ),
        (
            ["train.precision=fp8"],
            "train.precision=fp8 is invalid: must be one of fp32, bf16, fp16",
        ),
        (["train.batch_size=0"], "train.batch_size=0 is invalid"),
        (
            ["optim.value_optimizer=sgd"],
            "optim.value_optimizer=sgd is invalid: must be one of lazy_adam, adam",
        ),
        (["optim.value_optimizer=adam"], "model.memory.sparse_grad=false"),
        (["optim.betas=[0.9]"], "optim.betas=[0.9] is invalid"),
        (["optim.clip_norm=-1"], "optim.clip_norm=-1.0 is invalid"),
        (
            ["distributed.backend=mpi"],
            "distributed.backend=mpi is invalid: must be one of null, gloo, nccl",
        ),
    ],
)
def test_validation_errors_name_the_key_as_typed(overrides, message):
    """One wording (``KEY=VALUE is invalid: RULE``) and the key as it is written on the command line."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_train(overrides)


def test_batch_must_split_over_world_size_and_micro_batches():
    t = compose_train(["train.batch_size=8", "train.micro_batch_size=2"]).train
    assert t.micro_steps(1) == (2, 4)
    assert t.micro_steps(2) == (2, 2)
    with pytest.raises(ConfigError, match="train.batch_size=8 is invalid: cannot be split over 3"):
        t.micro_steps(3)
    with pytest.raises(ConfigError, match="train.micro_batch_size=3 is invalid: must divide"):
        compose_train(["train.batch_size=8", "train.micro_batch_size=3"]).train.micro_steps(1)


def test_typo_in_override_fails():
    with pytest.raises(Exception, match="model.dimm"):
        compose_train(["model.dimm=3"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = compose_train(["+experiment=demo_1mem"])
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    again = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
    )
    assert again == cfg


def test_logger_group_selects_wandb_offline():
    cfg = compose_train(["logger=wandb"])
    assert (cfg.logger.kind, cfg.logger.mode) == ("wandb", "offline")
    assert compose_train([]).logger.kind == "console"


def test_resume_check_refuses_what_changes_the_training_and_allows_the_rest():
    saved = OmegaConf.to_container(OmegaConf.structured(compose_train([])))
    same = compose_train(["train.max_steps=7", "train.device=cpu", "train.precision=bf16"])
    same.check_resumable(saved, "ckpt")  # intervals, device and precision may change
    changed = compose_train(["model.dim=256", "train.seed=3", "train.device=cpu"])
    with pytest.raises(ValueError, match=r"cannot resume ckpt") as err:
        changed.check_resumable(saved, "ckpt")
    assert "model.dim: 512 -> 256" in str(err.value) and "train.seed: 0 -> 3" in str(err.value)
    assert "device" not in str(err.value)


def test_resume_check_accepts_an_older_run_and_another_memory_kernel():
    saved = OmegaConf.to_container(OmegaConf.structured(compose_train([])))
    del saved["model"]["memory"]["gated"]  # a setting the run's code did not have yet
    saved["model"]["memory"]["kernel"] = "torch"  # how the layer computes, not what
    compose_train([]).check_resumable(saved, "ckpt")
    saved["model"]["memory"]["knn"] = 16
    with pytest.raises(ValueError, match=r"model\.memory\.knn: 16 -> 32"):
        compose_train([]).check_resumable(saved, "ckpt")


def test_train_device_is_validated():
    with pytest.raises(ValueError, match=r"train\.device=.?gpu") as err:
        compose_train(["train.device=gpu"])
    assert all(choice in str(err.value) for choice in ("auto", "cpu", "cuda"))
