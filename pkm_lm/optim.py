"""Optimisers of the trainer: Adam with an inverse-sqrt schedule for the network, and a separate
optimiser at a constant, higher lr for the memory values (as the reference, XLM, does)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from pkm_lm.config import OptimConfig
from pkm_lm.memory import LazyAdam, clip_grad_norm_


def inverse_sqrt(step: int, warmup_steps: int) -> float:
    """lr multiplier at optimizer step ``step`` (0-based): linear warmup to 1, then
    sqrt(warmup / step) (Vaswani et al. 2017, scaled so that the peak is the configured lr)."""
    s = step + 1
    if warmup_steps == 0:
        return 1.0 / math.sqrt(s)
    return min(s / warmup_steps, math.sqrt(warmup_steps / s))


@dataclass
class Optimizers:
    """The network's optimiser and schedule, the values' optimiser (None without memory)."""

    base: torch.optim.Optimizer
    schedule: LambdaLR
    values: torch.optim.Optimizer | None

    @property
    def all(self) -> list[torch.optim.Optimizer]:
        return [self.base] + ([self.values] if self.values is not None else [])

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {
            "base": self.base.state_dict(),
            "schedule": self.schedule.state_dict(),
            "values": self.values.state_dict() if self.values is not None else None,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.base.load_state_dict(sd["base"])
        self.schedule.load_state_dict(sd["schedule"])
        if self.values is not None:
            self.values.load_state_dict(sd["values"])

    def apply_settings(self, cfg: OptimConfig) -> None:
        """Give restored optimisers the hyper-parameters of ``cfg`` (a loaded state carries the
        old ones): lr, betas and eps from the current step on; the moments and the step count
        stay. The network's lr is the schedule's at this step (warmup_steps may change too)."""
        self.schedule.base_lrs = [cfg.lr] * len(self.base.param_groups)
        for group, lr_lambda in zip(self.base.param_groups, self.schedule.lr_lambdas, strict=True):
            group.update(initial_lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
            group["lr"] = cfg.lr * lr_lambda(self.schedule.last_epoch)
        for group in self.values.param_groups if self.values is not None else []:
            group.update(lr=cfg.value_lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_optimizers(model: nn.Module, values: list[nn.Parameter], cfg: OptimConfig) -> Optimizers:
    """Split ``model``'s parameters into the value tables (``values``) and the rest."""
    value_ids = {id(p) for p in values}
    base_params = [p for p in model.parameters() if id(p) not in value_ids]
    # fused: one kernel for all parameters, ~7x faster than foreach on CPU (measured, 4M params)
    base = torch.optim.Adam(base_params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    schedule = LambdaLR(base, lambda step: inverse_sqrt(step, cfg.warmup_steps))
    value_opt = None
    if values:
        betas = tuple(cfg.betas)
        if cfg.value_optimizer == "lazy_adam":
            value_opt = LazyAdam(values, lr=cfg.value_lr, betas=betas, eps=cfg.eps)
        else:
            value_opt = torch.optim.Adam(
                values, lr=cfg.value_lr, betas=betas, eps=cfg.eps, fused=True
            )
    return Optimizers(base, schedule, value_opt)


def clip_gradients(
    params: list[nn.Parameter], max_norm: float, split: list[nn.Parameter] = (), group=None
) -> torch.Tensor:
    """Total gradient norm over ``params`` (sparse value gradients included), clipped to
    ``max_norm`` unless it is 0; ``split``: value tables split by columns over ``group``."""
    return clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), split, group)
