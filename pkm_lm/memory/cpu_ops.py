"""Fused CPU passes in C++ (``csrc/cpu_ops.cpp``): the value/sub-key backward that reads each
row once for both its gradient and its reads' weight gradients, and LazyAdam's row update in
one gather-update-scatter pass. On a 2-core machine they halve LazyAdam's step and save a pass
over the rows read in the backward.

Built on first use by torch's extension loader (a C++ compiler is needed; ``make setup`` builds
it ahead, into torch's extension cache). Where it cannot be built the callers use their PyTorch
compositions, which are the reference the tests hold the C++ to; ``PKM_CPU_OPS=0`` asks for
those explicitly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch


@functools.cache
def cpu_ops():
    """The compiled module, or None (disabled, or the build failed: warned once)."""
    if os.environ.get("PKM_CPU_OPS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        source = Path(__file__).with_name("csrc") / "cpu_ops.cpp"
        # The name carries the source's hash: checkouts of different versions (or an upgrade)
        # each get their own build in torch's extension cache instead of loading another's.
        name = "pkm_lm_cpu_ops_" + hashlib.sha1(source.read_bytes()).hexdigest()[:12]
        # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds (serial without it).
        flags = ["-O3", "-fno-math-errno", "-fopenmp"]
        return load(name, [str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"])
    except Exception as err:  # no compiler, no ninja, headers missing: all mean "not here"
        warnings.warn(
            f"pkm_lm.memory: the fused CPU ops could not be built ({type(err).__name__}: {err}); "
            "using the slower PyTorch path",
            stacklevel=2,
        )
        return None


def fused_cpu(*tensors) -> object | None:
    """The compiled module when it is available and every tensor is on the CPU, its floating
    ones in fp32 or fp64 (what the C++ handles), else None."""
    if all(
        t.device.type == "cpu"
        and (not t.is_floating_point() or t.dtype in (torch.float32, torch.float64))
        for t in tensors
    ):
        return cpu_ops()
    return None
