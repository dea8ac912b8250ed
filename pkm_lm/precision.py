"""Mixed precision of ``train.precision``: the autocast context and the gradient scaler.

fp32 master weights always; ``bf16`` and ``fp16`` only change what autocast computes in, and only
fp16 needs a GradScaler (its range overflows, bf16's does not). The scaler skips a step whose
gradients hold an inf/NaN itself, without a host round trip when the optimizer is fused.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for ``train.precision`` (fp32: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (disabled, its methods pass gradients through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
