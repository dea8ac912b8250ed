"""Atomic checkpoints in ``run_dir/checkpoints``: ``step_XXXXXXX.pt`` plus a JSON beside it.

The ``.pt`` is written to a temporary name and renamed, then its JSON metadata; a checkpoint is
complete once its JSON exists, so a run killed mid-write resumes from the previous one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from pkm_lm.atomic import atomic_write, atomic_write_text

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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # weights_only=False: the state holds RNG states and the data loader's plain-Python state.
    return torch.load(path, map_location=map_location, weights_only=False)
