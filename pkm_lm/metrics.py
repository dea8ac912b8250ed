"""Where the trainer's numbers go: ``run_dir/metrics.jsonl`` (the contract scripts parse), a fixed
console line, optionally wandb, and a loss-curve plot at the end. Only rank 0 builds these."""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from pkm_lm.atomic import atomic_write_text, save_figure
from pkm_lm.config import flatten
from pkm_lm.errors import NotInstalledError
from pkm_lm.memory import MemoryStats

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records of steps after ``step`` (written by a run that was killed before it could
    checkpoint them), so a resumed run does not log those steps twice."""
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


@contextlib.contextmanager
def memory_stats(model: nn.Module) -> Iterator[dict[int | str, MemoryStats]]:
    """Fresh usage/KL accumulators on every memory of ``model`` (keyed by 1-based layer) while
    the block runs; the accumulators they replaced come back afterwards, so an evaluation inside
    training leaves the training usage gathered since the last log intact. When the memories
    share one value table, the key "table" holds its usage by all of them together."""
    saved = {layer: mem.stats for layer, mem in model.memories.items()}
    table = None
    if len(model.memories) > 1 and len(model.value_parameters()) == 1:
        first = next(iter(model.memories.values()))
        table = MemoryStats(first.config.n_slots, device=first.values.weight.device)
    stats = {
        layer: MemoryStats(mem.config.n_slots, device=mem.values.weight.device, table=table)
        for layer, mem in model.memories.items()
    }
    for layer, mem in model.memories.items():
        mem.stats = stats[layer]
    try:
        yield stats if table is None else {**stats, "table": table}
    finally:
        for layer, mem in model.memories.items():
            mem.stats = saved[layer]


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_train_line(rec: dict, max_steps: int, eta_s: float, usage: str = "") -> str:
    return (
        f"step {rec['step']:>7d}/{max_steps} | loss {rec['loss']:.4f} | ppl {rec['ppl']:9.2f} | "
        f"lr {rec['lr']:.2e} | tok/s {rec['tokens_per_s']:9.0f} | gnorm {rec['grad_norm']:.3f} | "
        f"skipped {rec['skipped_steps']} | eta {format_duration(eta_s)}"
        + (f" | gpu peak {rec['gpu_peak_gib']:.1f} GiB" if "gpu_peak_gib" in rec else "")
        + usage
    )


def format_eval_line(rec: dict) -> str:
    mem = "".join(
        f" | mem{k} usage {v['usage']:.1f}% kl_w {v['kl_weights']:.3f} kl_c {v['kl_counts']:.3f}"
        for k, v in rec.get("memory", {}).items()
    )
    return (
        f"eval {rec['split']} @ step {rec['step']} | loss {rec['loss']:.4f} | "
        f"ppl {rec['ppl']:.2f} | tok/s {rec['tokens_per_s']:.0f}" + mem
    )


class MetricLogger:
    """Appends records to metrics.jsonl and prints them; forwards them to wandb if asked."""

    def __init__(
        self,
        run_dir: str | Path,
        kind: str = "console",
        config: dict | None = None,
        project: str = "pkm-lm",
        mode: str = "offline",
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb_run = None
        if kind == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise NotInstalledError(
                    "logger=wandb needs the wandb package: pip install 'pkm-lm[wandb]'"
                ) from e
            # One wandb run per run directory: a resumed training continues it (its id is kept
            # in the run directory; offline runs sync into the same run).
            id_file = Path(run_dir) / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
            atomic_write_text(id_file, run_id + "\n")
            self.wandb_run = wandb.init(
                project=project,
                mode=mode,
                config=config,
                dir=str(run_dir),
                name=Path(run_dir).name,
                id=run_id,
                resume="allow",
            )

    def log(self, record: dict[str, Any], line: str | None = None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if line is not None:
            print(line, flush=True)
        if self.wandb_run is not None:
            prefix = record["kind"] if record["kind"] == "train" else record["split"]
            flat = flatten({k: v for k, v in record.items() if k not in ("kind", "split")}, "/")
            self.wandb_run.log({f"{prefix}/{k}": v for k, v in flat.items()}, step=record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def safe_ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def plot_loss(run_dir: str | Path) -> Path | None:
    """Train and eval loss against tokens, saved as ``run_dir/loss.png``; None without records."""
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    for split in sorted({r["split"] for r in records if r["kind"] == "eval"}):
        ev = [r for r in records if r["kind"] == "eval" and r["split"] == split]
        ax.plot([r["tokens"] for r in ev], [r["loss"] for r in ev], "o-", label=split)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(run_dir) / "loss.png"
    save_figure(fig, path, dpi=120)
    return path
