"""The C++ CPU passes' switch (PKM_CPU_OPS) and what users get where they cannot be built: the
PyTorch path with one warning (auto), an error (1), or no build at all (0)."""

import os
import shutil
import sys
import warnings

import pytest
import torch
import torch.utils.cpp_extension
from memory_references import bag_reference, lazy_adam_reference

import pkm_lm.memory.cpu_ops as cpu_ops_module
from pkm_lm.errors import ConfigError
from pkm_lm.memory import LazyAdam
from pkm_lm.memory.cpu_ops import CpuOpsError, cpu_ops, main
from pkm_lm.memory.values import value_bag


def failed_build(monkeypatch, why: str) -> None:
    monkeypatch.setattr(cpu_ops_module, "_build", lambda: (None, why))


def train_on_the_fallback():
    """A value-bag backward and two LazyAdam steps, checked against the references."""
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 20, (6, 4), generator=g)
    weights = torch.rand(6, 4, generator=g, dtype=torch.float64)
    grad_out = torch.randn(6, 3, generator=g, dtype=torch.float64)
    table = torch.nn.Parameter(torch.randn(20, 3, generator=g, dtype=torch.float64))
    start = table.detach().clone()
    value_bag(indices, weights, table, sparse=True).backward(grad_out)
    _, _, ref_grad = bag_reference(indices, weights, table, grad_out)
    torch.testing.assert_close(table.grad.to_dense(), ref_grad)
    LazyAdam([table], lr=0.1).step()
    rows = indices.unique()
    ref = lazy_adam_reference(start, [(rows, ref_grad[rows])], 0.1, (0.9, 0.999), 1e-8)
    torch.testing.assert_close(table.detach(), ref[0])


def test_pkm_cpu_ops_0_builds_nothing_and_takes_the_pytorch_path(monkeypatch):
    def no_build():
        raise AssertionError("PKM_CPU_OPS=0 must not build the extension")

    monkeypatch.setattr(cpu_ops_module, "_build", no_build)
    monkeypatch.setenv("PKM_CPU_OPS", "0")
    assert cpu_ops() is None
    train_on_the_fallback()


def test_a_failed_build_is_reported(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise OSError("c++: command not found\nmore compiler output")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    module, why = cpu_ops_module._build.__wrapped__()
    assert module is None and why.startswith("OSError: c++: command not found")


def test_a_failed_build_falls_back_with_one_warning(monkeypatch):
    failed_build(monkeypatch, "OSError: no compiler in test_a_failed_build_falls_back")
    monkeypatch.delenv("PKM_CPU_OPS", raising=False)
    with pytest.warns(UserWarning, match="could not be built .OSError: no compiler") as caught:
        assert cpu_ops() is None
        train_on_the_fallback()
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "PKM_CPU_OPS=1 makes it an error" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_ops() is None  # warned once only


def test_pkm_cpu_ops_1_makes_a_failed_build_an_error(monkeypatch):
    failed_build(monkeypatch, "RuntimeError: Error building extension\nlong compiler log")
    monkeypatch.setenv("PKM_CPU_OPS", "1")
    with pytest.raises(CpuOpsError, match="PKM_CPU_OPS=1 needs the fused C.. CPU ops") as err:
        cpu_ops()
    message = str(err.value)
    assert "\n" not in message and "PKM_CPU_OPS=0" in message and "ninja" in message
    table = torch.nn.Parameter(torch.randn(5, 2))
    out = value_bag(torch.tensor([[0, 3]]), torch.ones(1, 2), table)
    with pytest.raises(CpuOpsError):  # the backward does not fall back silently either
        out.sum().backward()


def test_an_unknown_pkm_cpu_ops_value_is_refused(monkeypatch):
    monkeypatch.setenv("PKM_CPU_OPS", "yes")
    with pytest.raises(ConfigError, match="PKM_CPU_OPS=yes is invalid: must be one of auto, 1, 0"):
        cpu_ops()


def test_setup_step_fails_with_the_compiler_output_and_what_to_do(monkeypatch, capsys):
    failed_build(monkeypatch, "RuntimeError: Error building extension\nfatal: omp.h not found")
    assert main() == 1
    err = capsys.readouterr().err
    assert "omp.h not found" in err
    assert err.splitlines()[-1].startswith("error: the fused C++ CPU ops could not be built")


@pytest.mark.skipif(os.environ.get("PKM_CPU_OPS") == "0", reason="PKM_CPU_OPS=0")
def test_the_extension_builds_where_a_toolchain_is_present(capsys):
    """On Linux with a compiler and ninja the C++ passes must build (a broken build would
    otherwise leave every user on the slower path with only a warning). macOS's Apple clang
    has no OpenMP: there the fallback is what users get, and what is tested."""
    if sys.platform != "linux":
        pytest.skip("the C++ passes are expected to build on Linux (macOS: no OpenMP in clang)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None or shutil.which("ninja") is None:
        pytest.skip(f"no C++ toolchain here ({compiler} and ninja): the fallback is tested")
    module, why = cpu_ops_module._build()
    assert module is not None, why
    assert main() == 0 and "fused C++ CPU ops built" in capsys.readouterr().out
