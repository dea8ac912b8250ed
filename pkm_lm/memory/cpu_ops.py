"""Fused CPU passes in C++ (``csrc/cpu_ops.cpp``): the value/sub-key backward that reads each
row once for both its gradient and its reads' weight gradients, and LazyAdam's row update in
one gather-update-scatter pass. On a 2-core machine they halve LazyAdam's step and save a pass
over the rows read in the backward.

Built on first use by torch's extension loader (a C++ compiler with OpenMP and ninja are
needed; ``make setup`` builds it ahead, into torch's extension cache, with ``main``). The
PyTorch compositions in ``values.py`` and ``optim.py`` compute the same numbers and are the
fallback. ``PKM_CPU_OPS`` says which to use, read at each call (so a caller can switch it):

- ``auto`` (unset): the C++ passes; where they cannot be built, a warning (once) and the fallback;
- ``1``: the C++ passes or an error: a build failure is not hidden (``make test`` sets this);
- ``0``: the PyTorch compositions, nothing is built.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

from pkm_lm.errors import UserError, check_choice

ENV = "PKM_CPU_OPS"
MODES = ("auto", "1", "0")
_NEEDS = "a C++ compiler with OpenMP, and ninja (`pip install ninja`)"
_HOW_TO_FIX = f"install {_NEEDS}, or set PKM_CPU_OPS=0 for the slower PyTorch path"


class CpuOpsError(UserError, RuntimeError):
    """PKM_CPU_OPS=1 asked for the C++ passes and they could not be built."""


def mode() -> str:
    """``PKM_CPU_OPS`` as set now: auto, 1 or 0."""
    value = os.environ.get(ENV, "auto")
    check_choice(ENV, value, MODES)
    return value


@functools.cache
def _build() -> tuple[object | None, str]:
    """(the compiled module, "") or (None, why it could not be built); tried once a process."""
    try:
        from torch.utils.cpp_extension import load

        source = Path(__file__).with_name("csrc") / "cpu_ops.cpp"
        # The name carries the source's hash: checkouts of different versions (or an upgrade)
        # each get their own build in torch's extension cache instead of loading another's.
        name = "pkm_lm_cpu_ops_" + hashlib.sha1(source.read_bytes()).hexdigest()[:12]
        # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds (serial without it).
        flags = ["-O3", "-fno-math-errno", "-fopenmp"]
        return load(name, [str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"]), ""
    except Exception as err:  # no compiler, no ninja, no OpenMP, headers missing, a bad build
        return None, f"{type(err).__name__}: {err}"


def _first_line(why: str) -> str:
    return (why.strip().splitlines() or [""])[0]


@functools.cache
def _warn_fallback(why: str) -> None:
    warnings.warn(
        f"pkm_lm.memory: the fused C++ CPU ops could not be built ({_first_line(why)}); using "
        f"the slower PyTorch path. They need {_NEEDS}; PKM_CPU_OPS=0 silences this warning, "
        "PKM_CPU_OPS=1 makes it an error",
        stacklevel=3,
    )


def cpu_ops():
    """The compiled module, or None where the PyTorch compositions are to be used
    (``PKM_CPU_OPS=0``, or ``auto`` and the build failed: warned once)."""
    chosen = mode()
    if chosen == "0":
        return None
    module, why = _build()
    if module is None:
        if chosen == "1":
            raise CpuOpsError(
                "PKM_CPU_OPS=1 needs the fused C++ CPU ops, which could not be built "
                f"({_first_line(why)}): {_HOW_TO_FIX}"
            )
        _warn_fallback(why)
    return module


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


def main() -> int:
    """Build the extension now (``make setup``): the compiler's output and what to do if it
    fails (exit status 1), the module's path if it builds."""
    module, why = _build()
    if module is None:
        print(why, file=sys.stderr)
        print(f"error: the fused C++ CPU ops could not be built: {_HOW_TO_FIX}", file=sys.stderr)
        return 1
    print(f"pkm_lm.memory: fused C++ CPU ops built ({module.__file__})")
    return 0
