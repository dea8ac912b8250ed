"""One memory layer alone, at given shapes: its inference forward and its training step
(forward, backward, clip, optimizer), with profiler regions, and their timing on a device.

The training step is the trainer's for this layer: autocast in the run's precision, the loss
in fp32, gradient clipping over every parameter (``pkm_lm.memory.clip_grad_norm_``, sparse
gradients included), then the optimizers (dense values: Adam on everything, fused on CUDA;
sparse values: LazyAdam on the table, Adam on the rest).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from pkm_lm.memory import LazyAdam, MemoryConfig, ProductKeyMemory, clip_grad_norm_
from pkm_lm.precision import autocast

from .roofline import LayerShapes
from .targets import spread


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings for MemoryConfig fields (ints, floats, true/false/null, strings),
    so that options added to the layer can be measured without changing this code."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            from pkm_lm.errors import ConfigError

            raise ConfigError(f"--memory {item!r} is invalid: must be key=value")
        low = raw.lower()
        if low in ("true", "false", "null", "none"):
            out[key] = {"true": True, "false": False}.get(low)
            continue
        for cast in (int, float):
            try:
                out[key] = cast(raw)
                break
            except ValueError:
                pass
        else:
            out[key] = raw
    return out


@dataclass
class LayerStep:
    layer: ProductKeyMemory
    optimizers: list[torch.optim.Optimizer]
    x: torch.Tensor
    precision: str
    max_norm: float = 1.0

    @property
    def device(self) -> torch.device:
        return self.x.device

    @torch.no_grad()
    def forward(self) -> None:
        """Inference: eval mode (the norm's running statistics), no autograd."""
        self.layer.eval()
        with autocast(self.device, self.precision):
            self.layer(self.x)

    def train_step(self) -> None:
        self.layer.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            out = self.layer(self.x)
        out.float().pow(2).mean().backward()
        with record_function("clip"):
            clip_grad_norm_(self.layer.parameters(), self.max_norm)
        with record_function("optimizer"):
            for opt in self.optimizers:
                opt.step()


def memory_config(shapes: LayerShapes, overrides: dict | None = None) -> MemoryConfig:
    fields = dict(n_keys=shapes.n_keys, heads=shapes.heads, knn=shapes.knn, k_dim=shapes.k_dim)
    return MemoryConfig(**{**fields, **(overrides or {})})


def build_step(
    shapes: LayerShapes,
    device: torch.device,
    precision: str = "fp32",
    overrides: dict | None = None,
    seed: int = 0,
) -> LayerStep:
    torch.manual_seed(seed)
    layer = ProductKeyMemory(shapes.dim, shapes.dim, memory_config(shapes, overrides)).to(device)
    fused = True if device.type == "cuda" else None
    if layer.config.sparse_grad:
        values = layer.values.weight
        rest = [p for p in layer.parameters() if p is not values]
        opts = [LazyAdam([values], lr=1e-3, kernel=layer.config.kernel)]
        opts.append(torch.optim.Adam(rest, lr=1e-3, fused=fused))
    else:
        opts = [torch.optim.Adam(layer.parameters(), lr=1e-3, fused=fused)]
    x = torch.randn(shapes.tokens, shapes.dim, device=device)
    return LayerStep(layer, opts, x, precision)


@dataclass
class Timing:
    """Seconds of each timed call; the median and the spread (max - min) / median."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        return spread(self.seconds)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "spread": self.spread, "seconds": self.seconds}


def time_calls(fn, device: torch.device, repeats: int, warmup: int = 2) -> Timing:
    """Each call timed alone, the device synchronised before and after it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return Timing(out)
