"""A sweep's run directories as the tables read them: one experiment, its seeds, their records.

Reads ``<runs>/<experiment>/config.yaml`` and ``metrics.jsonl`` (the trainer's formats), or
``<runs>/<experiment>/seed<S>/`` for each seed of ``sweep.sh --seeds``. Runs that have not
finished (no test evaluation) are kept and marked, never silently dropped.

    python -m pkm_lm.reproduce.runs tested RUN_DIR   # exit 0 when its last step was tested

(``scripts/sweep.sh`` asks this before evaluating a run, so a rerun does not evaluate it again.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from pkm_lm import cli
from pkm_lm.config import ModelConfig, TrainConfig
from pkm_lm.errors import NotFoundError
from pkm_lm.experiments import experiments
from pkm_lm.metrics import read_metrics


@dataclass
class SeedRun:
    """What the tables need from one run directory (one seed of an experiment)."""

    test: dict | None  # the last eval record on the test split
    valid_ppl: float | None
    train: dict | None  # the last train record
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, valid ppl) per eval

    def mem_mean(self, key: str) -> float | None:
        """Mean of one memory metric over the run's memory layers (None without memory); a
        value table the layers share has its own entry, "table", left out here."""
        mem = (self.test or {}).get("memory") or {}
        values = [m[key] for layer, m in mem.items() if layer.isdigit()]
        return sum(values) / len(values) if values else None


@dataclass
class Run:
    """One experiment of a group: its model (read through the config schema) and its seeds."""

    name: str
    model: ModelConfig
    seeds: list[SeedRun]

    @property
    def memory_layers(self) -> list[int]:
        return self.model.memory_layers

    @property
    def slots(self) -> int:
        return self.model.memory.n_slots if self.memory_layers else 0

    @property
    def done(self) -> list[SeedRun]:
        """The seeds evaluated on the test split."""
        return [s for s in self.seeds if s.test is not None]

    @property
    def test(self) -> dict | None:
        """The first finished seed's test record (None until one is finished)."""
        return self.done[0].test if self.done else None

    @property
    def curve(self) -> list[tuple[int, float]]:
        """The validation curve, averaged over the seeds at the token counts they all reached."""
        curves = [dict(s.curve) for s in self.seeds if s.curve]
        common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        return [(t, statistics.fmean(c[t] for c in curves)) for t in common]

    def mean(self, value) -> float | None:
        """Mean over the finished seeds of ``value(seed)`` (None when no seed has one)."""
        values = [v for s in self.done if (v := value(s)) is not None]
        return statistics.fmean(values) if values else None

    def mem_mean(self, key: str) -> float | None:
        return self.mean(lambda s: s.mem_mean(key))

    @property
    def valid_ppl(self) -> float | None:
        """The latest validation perplexity, averaged over the seeds (finished or not)."""
        values = [s.valid_ppl for s in self.seeds if s.valid_ppl is not None]
        return statistics.fmean(values) if values else None


def read_seed(run_dir: Path) -> SeedRun:
    test = train = valid_ppl = None
    curve = []
    for rec in read_metrics(run_dir):
        if rec["kind"] == "train":
            train = rec
        elif rec["kind"] == "eval" and rec["split"] == "test":
            test = rec
        elif rec["kind"] == "eval" and rec["split"] == "valid":
            valid_ppl = rec["ppl"]
            curve.append((rec["tokens"], rec["ppl"]))
    return SeedRun(test, valid_ppl, train, curve)


def has_test_eval(run_dir: Path) -> bool:
    """Whether the run has a test evaluation at its last training step (a resumed run that
    trained further keeps its older test record until it is tested again)."""
    records = read_metrics(run_dir)
    last_step = max((r["step"] for r in records if r["kind"] == "train"), default=None)
    steps = {r["step"] for r in records if r["kind"] == "eval" and r["split"] == "test"}
    return last_step is not None and last_step in steps


def read_model(run_dir: Path) -> ModelConfig:
    """The run's model as the trainer's schema reads it (defaults filled, placement resolved)."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / "config.yaml")
    )
    return OmegaConf.to_object(cfg).model


def is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").exists() and (path / "config.yaml").exists()


def read_experiment(exp_dir: Path) -> Run | None:
    """An experiment's run: ``exp_dir`` itself (one seed) or its ``seed*/`` folders (sweep.sh
    --seeds); None when nothing has been trained there yet."""
    dirs = [exp_dir] if is_run(exp_dir) else sorted(exp_dir.glob("seed*"), key=seed_index)
    dirs = [d for d in dirs if is_run(d)]
    if not dirs:
        return None
    return Run(exp_dir.name, read_model(dirs[0]), [read_seed(d) for d in dirs])


def seed_index(path: Path) -> int:
    return int(path.name.removeprefix("seed")) if path.name[4:].isdigit() else -1


def collect(group: str, runs_dir: Path, scale: str) -> list[Run]:
    """Every run of ``group`` at ``scale`` under ``runs_dir`` that has a config and metrics."""
    if not runs_dir.is_dir():
        raise NotFoundError(f"--runs {runs_dir}: no such directory (run scripts/sweep.sh first)")
    found = (read_experiment(runs_dir / name) for name in experiments(group, scale))
    runs = [r for r in found if r is not None]
    if not runs:
        raise NotFoundError(f"no run of group {group!r} under {runs_dir}")
    return sorted(runs, key=sort_key)


# The query norms as the paper's ablation words them (BN on / off), in the rows' order.
QUERY_NORM_LABELS = {"batchnorm": "BN on", "layernorm": "LayerNorm", "none": "BN off"}


def sort_key(run: Run) -> tuple:
    """Order rows as the paper does: by depth, width, memories, then the ablated setting."""
    mem = run.model.memory
    return (
        run.model.n_layers,
        run.model.dim,
        len(run.memory_layers),
        mem.keys != "product",
        run.slots,
        list(QUERY_NORM_LABELS).index(mem.query_norm),
        mem.heads * mem.knn,
        mem.heads,
        run.memory_layers,
    )


@cli.main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pkm_lm.reproduce.runs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("question", choices=("tested",), help="tested: exit 0 when it was")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    raise SystemExit(0 if has_test_eval(args.run_dir) else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
