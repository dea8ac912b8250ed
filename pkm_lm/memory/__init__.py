"""Product Key Memory layer (Lample et al., 2019), usable on its own in any PyTorch model.

    from pkm_lm.memory import MemoryConfig, ProductKeyMemory
    mem = ProductKeyMemory(512, 512, MemoryConfig(n_keys=512, heads=4, knn=32))

This package imports nothing from the trainer or Hydra.
"""

from .config import MemoryConfig
from .layer import ProductKeyMemory
from .optim import LazyAdam, clip_grad_norm_, sparse_rows
from .stats import MemoryStats

__all__ = [
    "MemoryConfig",
    "ProductKeyMemory",
    "MemoryStats",
    "LazyAdam",
    "clip_grad_norm_",
    "sparse_rows",
]
