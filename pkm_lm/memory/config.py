"""Configuration of a Product Key Memory layer, validated on construction."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import ClassVar

from pkm_lm.errors import check_choice, check_probability, invalid, require

KEY_TYPES = ("product", "flat")
QUERY_NETS = ("linear", "mlp")
QUERY_NORMS = ("batchnorm", "layernorm", "none")
KERNELS = ("torch", "triton", "auto")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def pick_kernel(kernel: str, device) -> str:
    """ "torch" or "triton" for tensors on ``device``: "auto" is triton on CUDA if installed."""
    if kernel != "auto":
        return kernel
    return "triton" if device.type == "cuda" and triton_installed() else "torch"


def query_norm_of(query_batchnorm: bool) -> str:
    """The ``query_norm`` that the older ``query_batchnorm`` flag meant."""
    return "batchnorm" if query_batchnorm else "none"


def map_saved_query_batchnorm(flat: dict, prefix: str = "model.memory.") -> dict:
    """A flattened saved config ({"model.memory.knn": 32, ...}) written with the older
    ``query_batchnorm``, as the current schema writes it: ``query_norm`` set, the flag null."""
    flag = flat.get(prefix + "query_batchnorm")
    if flag is None:
        return flat
    return {**flat, prefix + "query_batchnorm": None, prefix + "query_norm": query_norm_of(flag)}


@dataclass
class MemoryConfig:
    """Hyper-parameters of one memory layer (paper defaults: H=4, k=32, |K|=512^2, d_q=512).

    Which gradient to use: the default (``sparse_grad=False``) gives the value table an
    ordinary dense gradient, so any optimizer works (torch's Adam/AdamW, DDP's all-reduce);
    on CPU it is faster than lucidrains' product-key-memory (forward+backward measured at
    128^2-1024^2 slots, full steps at 128^2-512^2).
    ``sparse_grad=True`` is the lean one: it writes only the rows a step read, and with
    ``LazyAdam`` the optimizer touches only those rows (no |K| x v_dim gradient or update;
    on CPU 1.2-1.7x faster steps than the default with torch's Adam, even with fused Adam);
    use it for large memories, with ``LazyAdam`` (or ``torch.optim.SparseAdam``).
    """

    n_keys: int = 512  # sub-keys per half: the memory has n_keys**2 slots
    heads: int = 4
    knn: int = 32  # slots read per head and token
    k_dim: int = 512  # query size d_q, split into two halves of k_dim // 2
    v_dim: int | None = None  # value size; None = the layer's output dim
    keys: str = "product"  # "product" (n_keys**2 implicit keys) | "flat" (explicit keys, baseline)
    query_net: str = "linear"  # "linear" | "mlp" (Linear-ReLU-Linear, hidden = input dim)
    # Normalisation of the queries: "batchnorm" (the paper's; raises key usage on large memories,
    # section 4.5, but in training normalises with the whole batch's statistics, later positions
    # included, so it is not causal) | "layernorm" (each head's query on its own: causal) | "none"
    query_norm: str = "batchnorm"
    # Superseded by query_norm; kept so that configs and runs written before it still load:
    # true is query_norm=batchnorm, false query_norm=none. Read once, then null.
    query_batchnorm: bool | None = None
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0  # dropout on the softmax weights of the selected slots
    gated: bool = False  # multiply the output by SiLU(W x), as in "Memory Layers at Scale" (2024)
    sparse_grad: bool = False  # value table gets a row-sparse gradient: use LazyAdam / SparseAdam
    # value read and sub-key score backward: "torch" (any device) | "triton" (fused kernels,
    # CUDA) | "auto" (triton on CUDA when it is installed, torch elsewhere; measured 3-4x
    # faster than the torch path on an H200 at the paper's sizes)
    kernel: str = "auto"

    # Errors name a field as `KEY_PREFIX + field`; the trainer's schema sets "model.memory.".
    KEY_PREFIX: ClassVar[str] = "memory."

    def __post_init__(self) -> None:
        key = self.KEY_PREFIX
        require(
            isinstance(self.n_keys, int) and self.n_keys >= 2,
            key + "n_keys",
            self.n_keys,
            "must be an integer >= 2 (the memory has n_keys**2 slots)",
        )
        require(
            isinstance(self.heads, int) and self.heads >= 1,
            key + "heads",
            self.heads,
            "must be an integer >= 1",
        )
        require(
            isinstance(self.knn, int) and 1 <= self.knn <= self.n_keys,
            key + "knn",
            self.knn,
            f"must be an integer in [1, {key}n_keys={self.n_keys}]",
        )
        require(
            isinstance(self.k_dim, int) and self.k_dim >= 2 and self.k_dim % 2 == 0,
            key + "k_dim",
            self.k_dim,
            "must be an even integer >= 2 (it is split into two halves)",
        )
        require(
            self.v_dim is None or (isinstance(self.v_dim, int) and self.v_dim >= 1),
            key + "v_dim",
            self.v_dim,
            "must be null (= the output dim) or an integer >= 1",
        )
        check_choice(key + "keys", self.keys, KEY_TYPES)
        check_choice(key + "query_net", self.query_net, QUERY_NETS)
        self._map_query_batchnorm()
        check_choice(key + "query_norm", self.query_norm, QUERY_NORMS)
        check_choice(key + "kernel", self.kernel, KERNELS)
        if self.kernel == "triton" and importlib.util.find_spec("triton") is None:
            raise invalid(
                key + "kernel",
                self.kernel,
                "needs the triton package, which is not installed: `pip install triton` "
                f"(Linux; CUDA builds of torch bring it), or use {key}kernel=torch",
            )
        for name in ("input_dropout", "query_dropout", "value_dropout"):
            check_probability(key + name, getattr(self, name))

    def _map_query_batchnorm(self) -> None:
        """Turn the older ``query_batchnorm`` flag into ``query_norm`` (refusing a contradiction)."""
        if self.query_batchnorm is None:
            return
        key = self.KEY_PREFIX
        mapped = query_norm_of(self.query_batchnorm)
        require(
            self.query_norm in ("batchnorm", mapped),
            key + "query_batchnorm",
            self.query_batchnorm,
            f"contradicts {key}query_norm={self.query_norm}: it is the older name of "
            f"{key}query_norm={mapped}; set only {key}query_norm",
        )
        self.query_norm, self.query_batchnorm = mapped, None

    @property
    def n_slots(self) -> int:
        """|K|, the number of memory slots (rows of the value table)."""
        return self.n_keys**2
