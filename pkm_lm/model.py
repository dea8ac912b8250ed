"""Decoder-only Transformer LM whose chosen blocks carry a Product Key Memory.

Built on the ``meta`` device and initialised afterwards (``build_model``), so a paper-size model
(|K| = 512^2 values per memory) can be inspected without allocating it. Block indices in the
config count from 1, as the paper's wording; ``TransformerLM.memories`` is keyed the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pkm_lm.config import ModelConfig
from pkm_lm.errors import DataError, NotFoundError
from pkm_lm.memory import ProductKeyMemory
from pkm_lm.memory.layer import rename_query_bn

# The files of an exported model (pkm_lm/export.py), beside its tokenizer.
WEIGHTS = "model.safetensors"
CONFIG_JSON = "config.json"


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attn_dropout = cfg.attn_dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.dim, cfg.ffn_mult * cfg.dim)
        self.proj = nn.Linear(cfg.ffn_mult * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Residual(nn.Module):
    """x + f(x) with dropout, and its LayerNorm before f (pre-norm) or after the sum (post-norm)."""

    def __init__(self, fn: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(cfg.dim)
        self.pre_norm = cfg.norm == "pre"
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(self.fn(self.norm(x)))
        return self.norm(x + self.dropout(self.fn(x)))


class Block(nn.Module):
    """Attention then FFN; with a memory, it replaces the FFN or follows the block (``add``)."""

    def __init__(self, cfg: ModelConfig, memory: ProductKeyMemory | None) -> None:
        super().__init__()
        self.attn = Residual(CausalSelfAttention(cfg), cfg)
        replace = memory is not None and cfg.memory.position == "replace"
        self.ffn = Residual(memory if replace else FeedForward(cfg), cfg)
        self.mem = Residual(memory, cfg) if memory is not None and not replace else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ffn(self.attn(x))
        return self.mem(x) if self.mem is not None else x


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None or cfg.max_seq_len is None:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size} and model.max_seq_len={cfg.max_seq_len} "
                "must be set before building (the trainer takes them from the data)"
            )
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        mem_layers = set(cfg.memory_layers)
        # 1-based block index -> its memory, the convention of configs and metrics.
        self.memories: dict[int, ProductKeyMemory] = {}
        shared = None  # with share_values: the first memory's table, read by every memory
        blocks = []
        for i in range(1, cfg.n_layers + 1):
            memory = None
            if i in mem_layers:
                memory = ProductKeyMemory(cfg.dim, cfg.dim, cfg.memory, values=shared)
                self.memories[i] = memory
                if cfg.memory.share_values:
                    shared = memory.values
            blocks.append(Block(cfg, memory))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(cfg.dim) if cfg.norm == "pre" else nn.Identity()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) logits; output projection tied to ``tok_emb``."""
        t = idx.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} > model.max_seq_len={self.cfg.max_seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.dropout(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.final_norm(x), self.tok_emb.weight)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TransformerLM:
        """The model of an export folder (``python -m pkm_lm.export``), in eval mode on ``device``.

        Weights exported in bf16 are cast to ``dtype`` (fp32 by default).
        """
        folder = Path(path)
        for name in (CONFIG_JSON, WEIGHTS):
            if not (folder / name).is_file():
                raise NotFoundError(f"{folder / name} not found: is {folder} an exported model?")
        try:
            config = json.loads((folder / CONFIG_JSON).read_text(encoding="utf-8"))
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), config))
        except (ValueError, OmegaConfBaseException) as e:  # bad JSON, or a field the schema rejects
            raise DataError(f"{folder / CONFIG_JSON} is not a valid model config: {e}") from e
        # Imported here: only exported models need safetensors, training and evaluation do not.
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(folder / WEIGHTS)
        except SafetensorError as e:
            raise DataError(
                f"{folder / WEIGHTS} is not a complete safetensors file ({e}); export it again"
            ) from e
        rename_query_bn(tensors)  # an export of an earlier version
        skeleton = build_model(cfg, "meta")
        # A shared tensor is stored once (safetensors refuses aliases), under its first name.
        tensors.update({a: tensors[n] for a, n in skeleton.shared_names().items() if n in tensors})
        problems = _mismatches(skeleton.state_dict(), tensors)
        if problems:
            raise DataError(f"{folder / WEIGHTS} does not fit {folder / CONFIG_JSON}: {problems}")
        model = build_model(cfg, device)
        model.load_state_dict(tensors)
        return model.to(dtype=dtype).eval()

    def value_parameters(self) -> list[nn.Parameter]:
        """The memories' value tables, each once (a shared table is one parameter): the
        parameters of the value optimiser."""
        return list(dict.fromkeys(mem.values.weight for mem in self.memories.values()))

    def num_params(self, exclude_token_embedding: bool = False) -> int:
        """Parameter count, a shared tensor counted once; without the (vocabulary-dependent,
        tied) token embedding on request."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_token_embedding else n

    def param_summary(self) -> str:
        """The parameter count for the training log, with the memory values and who reads them."""
        tables = self.value_parameters()
        n_values = sum(p.numel() for p in tables)
        layers = list(self.memories)
        if len(tables) < len(layers):
            readers = f"one table read by the memories of layers {layers}"
        else:
            readers = f"{len(tables)} table{'s' * (len(tables) != 1)}"
        return f"{self.num_params():,} parameters ({n_values:,} in memory values: {readers})"

    def shared_names(self) -> dict[str, str]:
        """State-dict name -> the first name of the same tensor, for the names a shared tensor
        has beyond its first (a shared value table has one per memory layer)."""
        first: dict[int, str] = {}
        aliases = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in first:
                aliases[name] = first[id(p)]
            else:
                first[id(p)] = name
        return aliases

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer (after ``to_empty``): XLM's N(0, dim^-1/2)
        embeddings, the memory's keys/values init, torch's defaults for Linear and the norms."""
        in_memory = {id(m) for mem in self.memories.values() for m in mem.modules()}
        for module in self.modules():
            if isinstance(module, ProductKeyMemory):
                module.reset_memory_parameters()  # keys and values; its Linear/BN below
            elif isinstance(module, nn.Embedding) and id(module) not in in_memory:
                nn.init.normal_(module.weight, std=self.cfg.dim**-0.5)
            elif isinstance(module, (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)):
                module.reset_parameters()


def _mismatches(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What keeps ``found`` from loading into a model whose state dict is ``expected``."""

    def first(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    parts = [
        f"{what} {first(names)}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if names
    ]
    return "; ".join(parts)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> TransformerLM:
    """Construct on ``meta`` (no allocation), then, unless ``device`` is meta, allocate and init."""
    with torch.device("meta"):
        model = TransformerLM(cfg)
    if torch.device(device).type == "meta":
        return model
    return materialize(model, device)


def materialize(model: TransformerLM, device: torch.device | str) -> TransformerLM:
    """Allocate a model built on ``meta`` on ``device`` and initialise it (value tables split
    over ranks on the meta device get only their columns)."""
    model.to_empty(device=device)
    model.init_weights()
    return model
