"""Atomic checkpoints in ``run_dir/checkpoints``: ``step_XXXXXXX.pt`` plus a JSON beside it, and
``load_run``, the trained model of a run directory.

The ``.pt`` is written to a temporary name and renamed, then its JSON metadata; a checkpoint is
complete once its JSON exists, so a run killed mid-write resumes from the previous one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from pkm_lm.atomic import atomic_write, atomic_write_text
from pkm_lm.config import TrainConfig
from pkm_lm.errors import NotFoundError
from pkm_lm.model import TransformerLM, build_model

_NAME = re.compile(r"^step_(\d+)\.json$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], meta: dict, keep: int):
    """Write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep``."""
    ckpt_dir = checkpoint_dir(run_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:07d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write_text(path.with_suffix(".json"), json.dumps({"step": step, **meta}, indent=2))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.with_suffix(".json").unlink()
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (their JSON written), oldest first."""
    ckpt_dir = checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for meta in ckpt_dir.iterdir():
        m = _NAME.match(meta.name)
        if m and meta.with_suffix(".pt").is_file():
            found.append((int(m.group(1)), meta.with_suffix(".pt")))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """The state saved at ``path``, on the CPU (RNG states must stay there; ``load_state_dict``
    moves the rest to its parameters' device). ``mmap``: tensors stay in the file until read, so
    a paper-scale checkpoint on each of 8 ranks does not need 8 copies in host memory; pass
    False when the tensors are kept on the CPU (a CPU optimizer would keep the file mapped)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"checkpoint {path} does not exist")
    # weights_only=False: the state holds RNG states and the data loader's plain-Python state.
    return torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The validated config a training run wrote to ``run_dir/config.yaml``."""
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise NotFoundError(f"{cfg_path} not found: is run_dir={run_dir} a training run?")
    schema = OmegaConf.structured(TrainConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(cfg_path)))


def load_run(
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    checkpoint: str | Path | None = None,
    value_dtype: torch.dtype | None = None,
) -> tuple[TransformerLM, TrainConfig, dict[str, Any]]:
    """The trained model of ``run_dir`` on ``device`` (from its newest complete checkpoint, or
    ``checkpoint``), its config, and the checkpoint's state (on the CPU, memory-mapped: the
    optimizer state is not read unless used). ``value_dtype``: cast the memory value tables
    (e.g. bf16 for inference: a memory's reads move half the bytes)."""
    cfg = read_run_config(run_dir)
    ckpt_path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt_path is None:
        raise NotFoundError(f"no complete checkpoint in {checkpoint_dir(run_dir)}")
    state = load_checkpoint(ckpt_path)
    model = build_model(cfg.model, device)
    model.load_state_dict(state["model"])
    if value_dtype is not None:
        for memory in model.memories.values():
            memory.values.to(value_dtype)
    return model, cfg, state
