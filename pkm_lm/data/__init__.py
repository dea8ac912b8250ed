"""Data pipeline: raw text -> Moses -> BPE -> binary token shards -> training batches.

    from pkm_lm.data import open_split, TokenStream, eval_batches, Vocabulary, load_manifest

The loader (which needs torch) is imported on first use, so preprocessing processes and
their workers never load torch.
"""

from .manifest import load_manifest
from .shards import ShardError
from .vocab import Vocabulary

_LOADER = ("TokenArray", "TokenStream", "eval_batches", "open_split")

__all__ = ["ShardError", "Vocabulary", "load_manifest", *_LOADER]


def __getattr__(name: str):
    if name in _LOADER:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
