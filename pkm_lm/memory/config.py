"""Configuration of a Product Key Memory layer, validated on construction."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

KEY_TYPES = ("product", "flat")
QUERY_NETS = ("linear", "mlp")
KERNELS = ("torch", "triton", "auto")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def pick_kernel(kernel: str, device) -> str:
    """ "torch" or "triton" for tensors on ``device``: "auto" is triton on CUDA if installed."""
    if kernel != "auto":
        return kernel
    return "triton" if device.type == "cuda" and triton_installed() else "torch"


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"memory.{field}={value!r} is invalid: {allowed}")


@dataclass
class MemoryConfig:
    """Hyper-parameters of one memory layer (paper defaults: H=4, k=32, |K|=512^2, d_q=512)."""

    n_keys: int = 512  # sub-keys per half: the memory has n_keys**2 slots
    heads: int = 4
    knn: int = 32  # slots read per head and token
    k_dim: int = 512  # query size d_q, split into two halves of k_dim // 2
    v_dim: int | None = None  # value size; None = the layer's output dim
    keys: str = "product"  # "product" (n_keys**2 implicit keys) | "flat" (explicit keys, baseline)
    query_net: str = "linear"  # "linear" | "mlp" (Linear-ReLU-Linear, hidden = input dim)
    query_batchnorm: bool = True  # BN on queries: raises key usage on large memories (paper 4.5)
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0  # dropout on the softmax weights of the selected slots
    gated: bool = False  # multiply the output by SiLU(W x), as in "Memory Layers at Scale" (2024)
    sparse_grad: bool = False  # value table gets a row-sparse gradient: use LazyAdam / SparseAdam
    # value read and sub-key score backward: "torch" (any device) | "triton" (fused kernels,
    # CUDA) | "auto" (triton on CUDA when it is installed, torch elsewhere)
    kernel: str = "torch"

    def __post_init__(self) -> None:
        _require(
            isinstance(self.n_keys, int) and self.n_keys >= 2,
            "n_keys",
            self.n_keys,
            "an integer >= 2 (the memory has n_keys**2 slots)",
        )
        _require(
            isinstance(self.heads, int) and self.heads >= 1, "heads", self.heads, "an integer >= 1"
        )
        _require(
            isinstance(self.knn, int) and 1 <= self.knn <= self.n_keys,
            "knn",
            self.knn,
            f"an integer in [1, n_keys={self.n_keys}]",
        )
        _require(
            isinstance(self.k_dim, int) and self.k_dim >= 2 and self.k_dim % 2 == 0,
            "k_dim",
            self.k_dim,
            "an even integer >= 2 (it is split into two halves)",
        )
        _require(
            self.v_dim is None or (isinstance(self.v_dim, int) and self.v_dim >= 1),
            "v_dim",
            self.v_dim,
            "None (= output dim) or an integer >= 1",
        )
        _require(self.keys in KEY_TYPES, "keys", self.keys, f"one of {KEY_TYPES}")
        _require(self.query_net in QUERY_NETS, "query_net", self.query_net, f"one of {QUERY_NETS}")
        _require(self.kernel in KERNELS, "kernel", self.kernel, f"one of {KERNELS}")
        if self.kernel == "triton" and importlib.util.find_spec("triton") is None:
            raise ValueError(
                "memory.kernel='triton' needs the triton package, which is not installed: "
                "`pip install triton` (Linux; CUDA builds of torch bring it), or use "
                "memory.kernel='torch'"
            )
        for name in ("input_dropout", "query_dropout", "value_dropout"):
            p = getattr(self, name)
            _require(
                isinstance(p, (int, float)) and 0.0 <= p < 1.0, name, p, "a probability in [0, 1)"
            )

    @property
    def n_slots(self) -> int:
        """|K|, the number of memory slots (rows of the value table)."""
        return self.n_keys**2
