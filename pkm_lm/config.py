"""Structured configs of the trainer, registered in Hydra's ConfigStore.

Every dataclass validates itself in ``__post_init__`` (run by ``OmegaConf.to_object``), so a bad
override fails before any data is read or any model is built, with an error that names the
field, the value and what is allowed. Memory layer indices count from 1, as the paper words it
("L=16, N=2 -> layers 6 and 12", "layer 1 is worst"): ``model.memory.layers=[4]`` is the 4th block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from pkm_lm.errors import (
    ConfigError,
    check_choice,
    check_positive,
    check_probability,
    invalid,
    require,
    show,
)
from pkm_lm.memory import MemoryConfig
from pkm_lm.memory.config import map_saved_query_batchnorm


def spread_evenly(n_layers: int, count: int) -> list[int]:
    """1-based positions of ``count`` memories in ``n_layers`` blocks, as the paper spreads them.

    Spacing ceil(L / (N + 1)): L=16, N=2 -> [6, 12]; L=12, N=1 -> [6]; L=12, N=3 -> [3, 6, 9].
    """
    if count == 0:
        return []
    step = math.ceil(n_layers / (count + 1))
    positions = [i * step for i in range(1, count + 1)]
    if positions[-1] > n_layers:
        raise invalid(
            "model.memory.count",
            count,
            f"cannot be spread evenly over model.n_layers={n_layers} (positions {positions}); "
            "list them explicitly with model.memory.layers=[...]",
        )
    return positions


@dataclass
class MemoryPlacementConfig(MemoryConfig):
    """The memory layer's own settings plus where it goes in the Transformer.

    ``layers`` (explicit 1-based block indices) and ``count`` (N memories spread evenly) are
    alternatives; with both empty the model has no memory. ``position=replace`` puts the memory in
    place of the block's FFN, ``add`` inserts it after the whole block (XLM's ``4+`` syntax).
    """

    # Row-sparse value gradients + LazyAdam by default: they touch only the rows read.
    sparse_grad: bool = True
    layers: list[int] = field(default_factory=list)
    count: int = 0
    position: str = "replace"
    # One value table read by every memory layer of the model (each keeps its own query network,
    # norm and keys), as in "Memory Layers at Scale" (2024): |K| x v values once, not per layer.
    share_values: bool = False

    KEY_PREFIX = "model.memory."

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("model.memory.position", self.position, ("replace", "add"))
        require(self.count >= 0, "model.memory.count", self.count, "must be >= 0")
        require(
            not (self.count and self.layers),
            "model.memory.layers",
            self.layers,
            f"cannot be set with model.memory.count={self.count}: they are alternatives, set one",
        )
        require(
            len(set(self.layers)) == len(self.layers),
            "model.memory.layers",
            self.layers,
            "has duplicate indices",
        )


@dataclass
class ModelConfig:
    n_layers: int = 6
    dim: int = 512
    n_heads: int = 8
    ffn_mult: int = 4
    dropout: float = 0.1
    attn_dropout: float = 0.1
    # Pre-norm by default: it trains stably without a long warmup at every depth we test; the
    # paper's XLM used post-norm, available as norm=post.
    norm: str = "pre"
    # None: taken from the dataset's manifest when training; set it to build without data.
    vocab_size: int | None = None
    # Rows of the positional embedding; None: data.seq_len (filled in by TrainConfig).
    max_seq_len: int | None = None
    memory: MemoryPlacementConfig = field(default_factory=MemoryPlacementConfig)

    def __post_init__(self) -> None:
        for name in ("n_layers", "dim", "n_heads", "ffn_mult"):
            check_positive(f"model.{name}", getattr(self, name))
        for name in ("vocab_size", "max_seq_len"):
            if getattr(self, name) is not None:
                check_positive(f"model.{name}", getattr(self, name))
        divisors = [h for h in range(1, self.dim + 1) if self.dim % h == 0]
        require(
            self.dim % self.n_heads == 0,
            "model.n_heads",
            self.n_heads,
            f"must divide model.dim={self.dim} (divisors: {show(divisors[:12])}...)",
        )
        check_probability("model.dropout", self.dropout)
        check_probability("model.attn_dropout", self.attn_dropout)
        check_choice("model.norm", self.norm, ("pre", "post"))
        bad = [i for i in self.memory.layers if not 1 <= i <= self.n_layers]
        require(
            not bad,
            "model.memory.layers",
            self.memory.layers,
            f"indices {bad} out of range; layers count from 1 to model.n_layers={self.n_layers}",
        )
        require(
            self.memory.count <= self.n_layers,
            "model.memory.count",
            self.memory.count,
            f"exceeds model.n_layers={self.n_layers}",
        )
        spread_evenly(self.n_layers, self.memory.count)  # raises if it cannot be placed

    @property
    def memory_layers(self) -> list[int]:
        """Sorted 1-based indices of the blocks that carry a memory."""
        if self.memory.layers:
            return sorted(self.memory.layers)
        return spread_evenly(self.n_layers, self.memory.count)


@dataclass
class DataConfig:
    dir: str = "data/bin/books"
    seq_len: int = 256
    # Chunk-level shuffling; the paper keeps document order (long-range context).
    shuffle: bool = False

    def __post_init__(self) -> None:
        check_positive("data.seq_len", self.seq_len)


@dataclass
class OptimConfig:
    lr: float = 2.5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 4000
    # Memory values: their own optimiser at a constant lr, as the reference (XLM) does.
    value_lr: float = 1e-3
    # lazy_adam: row-sparse updates of the touched value rows (needs model.memory.sparse_grad for
    # its speed); adam: torch's dense Adam as XLM, needs model.memory.sparse_grad=false.
    value_optimizer: str = "lazy_adam"
    # Max global gradient norm (all parameters, sparse value gradients included); 0 disables.
    clip_norm: float = 5.0

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        require(self.value_lr > 0, "optim.value_lr", self.value_lr, "must be > 0")
        require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "optim.betas",
            self.betas,
            "must be two numbers in [0, 1)",
        )
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.clip_norm >= 0, "optim.clip_norm", self.clip_norm, "must be >= 0 (0 disables)")
        check_choice("optim.value_optimizer", self.value_optimizer, ("lazy_adam", "adam"))


@dataclass
class TrainLoopConfig:
    batch_size: int = 32  # global sequences per optimizer step, over all ranks and micro-steps
    micro_batch_size: int | None = None  # per rank and forward; None: batch_size / world size
    eval_batch_size: int | None = None  # per rank; None: the micro batch size
    max_steps: int = 1000
    eval_interval: int = 500
    checkpoint_interval: int = 500
    log_interval: int = 10
    seed: int = 0
    precision: str = "fp32"
    keep_checkpoints: int = 2
    device: str = "auto"  # auto: CUDA when available, else CPU
    # torch.compile of every block (pkm_lm/compile.py); off by default until measured on GPUs
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "eval_interval", "checkpoint_interval"):
            check_positive(f"train.{name}", getattr(self, name))
        for name in ("log_interval", "keep_checkpoints"):
            check_positive(f"train.{name}", getattr(self, name))
        for name in ("micro_batch_size", "eval_batch_size"):
            if getattr(self, name) is not None:
                check_positive(f"train.{name}", getattr(self, name))
        check_choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))

    def micro_steps(self, world_size: int) -> tuple[int, int]:
        """(micro batch size per rank, micro-steps per optimizer step) for this world size."""
        require(
            self.batch_size % world_size == 0,
            "train.batch_size",
            self.batch_size,
            f"cannot be split over {world_size} processes: use a multiple of {world_size}",
        )
        per_rank = self.batch_size // world_size
        micro = self.micro_batch_size or per_rank
        require(
            per_rank % micro == 0,
            "train.micro_batch_size",
            micro,
            "must divide the per-process batch train.batch_size / world_size = "
            f"{self.batch_size} / {world_size} = {per_rank}",
        )
        return micro, per_rank // micro


@dataclass
class DistributedConfig:
    # Query BatchNorm statistics over the global batch (all ranks); false keeps them per rank as
    # the reference did.
    sync_bn: bool = True
    # None: nccl on CUDA, gloo on CPU.
    backend: str | None = None
    # Ranks per group that splits every value table by columns (each holds |K| x v/N values and
    # their optimizer state); 1: every rank holds whole tables. Must divide the world size and
    # the value dim (checked when the world size is known).
    memory_parallel: int = 1

    def __post_init__(self) -> None:
        check_choice("distributed.backend", self.backend, (None, "gloo", "nccl"))
        check_positive("distributed.memory_parallel", self.memory_parallel)


@dataclass
class LoggerConfig:
    kind: str = "console"
    project: str = "pkm-lm"
    mode: str = "offline"  # wandb mode: offline needs no login and no network

    def __post_init__(self) -> None:
        check_choice("logger.kind", self.kind, ("console", "wandb"))
        check_choice("logger.mode", self.mode, ("offline", "online", "disabled"))


# Settings a resumed run must keep: they decide what it trains (the model, the sequences of each
# step, the layout of the values' optimizer state). Every other setting may change when a run
# resumes (docs/training.md, "Resuming with changed settings"): max_steps, the intervals,
# precision, device, micro-batch size, logger, data.dir, the optim hyper-parameters (the new
# ones apply from the resumed step on) and the memory kernel (the torch and Triton paths compute
# the same numbers).
_RESUME_FIXED = (
    "model.",
    "data.seq_len",
    "data.shuffle",
    "train.batch_size",
    "train.seed",
    "optim.value_optimizer",
)
_RESUME_FREE = ("model.memory.kernel",)


def flatten(tree: dict, sep: str = ".", prefix: str = "") -> dict:
    """{"a.b.c": value} for every non-dict value of a nested dict (keys joined by ``sep``)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        if self.model.max_seq_len is None:
            self.model.max_seq_len = self.data.seq_len
        require(
            self.model.max_seq_len >= self.data.seq_len,
            "model.max_seq_len",
            self.model.max_seq_len,
            f"must be >= data.seq_len={self.data.seq_len}",
        )
        require(
            not (self.optim.value_optimizer == "adam" and self.model.memory.sparse_grad),
            "optim.value_optimizer",
            self.optim.value_optimizer,
            "cannot take sparse gradients: set model.memory.sparse_grad=false, "
            "or use optim.value_optimizer=lazy_adam",
        )

    def check_resumable(self, saved: dict, source: str) -> list[str]:
        """Refuse to resume ``source``, trained under ``saved`` (a config as plain containers),
        with settings that change what it trains; return the settings that changed and may
        ("key: old -> new")."""
        now = flatten(OmegaConf.to_container(OmegaConf.structured(self)))
        # A setting the run's code did not have yet (absent from `saved`) kept its default then.
        changed = {
            key: f"{key}: {value!r} -> {now[key]!r}"
            for key, value in map_saved_query_batchnorm(flatten(saved)).items()
            if key in now and value != now[key] and key != "run_dir"  # (where, not what)
        }
        fixed = [
            change
            for key, change in changed.items()
            if key.startswith(_RESUME_FIXED) and key not in _RESUME_FREE
        ]
        if fixed:
            raise ConfigError(
                f"cannot resume {source}: it was trained with other settings "
                f"({'; '.join(fixed)}); use another run_dir or the original settings"
            )
        return [change for change in changed.values() if change not in fixed]


VALUE_DTYPES = ("float32", "bfloat16")  # dtypes of the value tables at inference


@dataclass
class EvaluateConfig:
    run_dir: str = "???"
    split: str = "test"
    batch_size: int | None = None  # per rank; None: the run's eval batch size
    checkpoint: str | None = None  # None: the newest complete checkpoint of the run
    device: str | None = None  # auto, cpu or cuda; None: the run's train.device
    # bfloat16: the memory value tables are read in bf16 (half the bytes; outputs move by bf16
    # rounding of the values, the slots selected do not change)
    value_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_choice("device", self.device, (None, "auto", "cpu", "cuda"))
        check_choice("value_dtype", self.value_dtype, VALUE_DTYPES)


@dataclass
class GenerateConfig:
    run_dir: str = "???"
    prompt: str = ""
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 40
    num_samples: int = 1
    seed: int = 0
    checkpoint: str | None = None
    device: str | None = None  # auto, cpu or cuda; None: the run's train.device
    value_dtype: str = "float32"  # as EvaluateConfig.value_dtype

    def __post_init__(self) -> None:
        check_choice("device", self.device, (None, "auto", "cpu", "cuda"))
        check_choice("value_dtype", self.value_dtype, VALUE_DTYPES)
        check_positive("max_new_tokens", self.max_new_tokens)
        check_positive("num_samples", self.num_samples)
        require(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        if self.top_k is not None:
            check_positive("top_k", self.top_k)


def register_configs() -> None:
    """Make the schemas available to the YAML files in ``configs/`` (``defaults: [base_*]``)."""
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    cs.store(name="base_evaluate", node=EvaluateConfig)
    cs.store(name="base_generate", node=GenerateConfig)


def to_train_config(cfg: Any) -> TrainConfig:
    """Resolve and validate a composed DictConfig into the dataclass tree."""
    return OmegaConf.to_object(cfg)
