"""Data pipeline: raw text -> Moses -> BPE -> binary token shards -> training batches.

from pkm_lm.data import open_split, TokenStream, eval_batches, Vocabulary, load_manifest
"""

from .loader import TokenArray, TokenStream, eval_batches, open_split
from .manifest import load_manifest
from .shards import ShardError
from .vocab import Vocabulary

__all__ = [
    "ShardError",
    "TokenArray",
    "TokenStream",
    "Vocabulary",
    "eval_batches",
    "load_manifest",
    "open_split",
]
