"""MemoryConfig rejects bad values with an error that names the field and what is allowed."""

import importlib.util

import pytest
import torch

from pkm_lm.memory import LazyAdam, MemoryConfig, config


@pytest.mark.parametrize(
    "kwargs,field,allowed",
    [
        (dict(n_keys=1), "n_keys", ">= 2"),
        (dict(heads=0), "heads", ">= 1"),
        (dict(n_keys=8, knn=9), "knn", "[1, memory.n_keys=8]"),
        (dict(knn=0), "knn", "[1, memory.n_keys"),
        (dict(k_dim=7), "k_dim", "even"),
        (dict(v_dim=0), "v_dim", ">= 1"),
        (dict(keys="hash"), "keys", "product, flat"),
        (dict(query_net="cnn"), "query_net", "linear, mlp"),
        (dict(input_dropout=1.0), "input_dropout", "[0, 1)"),
        (dict(query_dropout=-0.1), "query_dropout", "[0, 1)"),
        (dict(value_dropout=2), "value_dropout", "[0, 1)"),
        (dict(kernel="cuda"), "kernel", "torch, triton, auto"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        MemoryConfig(**kwargs)
    message = str(err.value)
    assert f"memory.{field}=" in message and allowed in message


def test_defaults_are_the_papers():
    cfg = MemoryConfig()
    assert (cfg.heads, cfg.knn, cfg.k_dim, cfg.n_slots) == (4, 32, 512, 512**2)
    assert cfg.query_norm == "batchnorm" and cfg.keys == "product"


def test_triton_kernel_without_triton_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "triton" else real_find_spec(name)
    )
    with pytest.raises(
        ValueError, match=r"memory.kernel=triton is invalid: needs .*pip install triton"
    ):
        MemoryConfig(kernel="triton")


def test_auto_kernel_is_triton_on_cuda_when_installed(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # devices as names: no GPU needed
    assert config.pick_kernel("auto", cpu) == "torch"
    assert config.pick_kernel("triton", cpu) == "triton"  # explicit choices are kept
    monkeypatch.setattr(config, "triton_installed", lambda: True)
    assert config.pick_kernel("auto", cuda) == "triton"
    monkeypatch.setattr(config, "triton_installed", lambda: False)
    assert config.pick_kernel("auto", cuda) == "torch"
    MemoryConfig(kernel="auto")  # needs no triton


def test_lazy_adam_kernel_is_validated(monkeypatch):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="kernel='cuda' is invalid"):
        LazyAdam([p], kernel="cuda")
    monkeypatch.setattr("pkm_lm.memory.optim.triton_installed", lambda: False)
    with pytest.raises(ValueError, match="pip install triton"):
        LazyAdam([p], kernel="triton")
