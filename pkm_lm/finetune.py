"""Finetune a trained run on new data, training all of it, its memory values, or only the value
rows of the slots the new data uses most (sparse memory finetuning, ``pkm_lm.slots``).

    python -m pkm_lm.finetune run_dir=runs/facts data.dir=data/bin/facts_b out_dir=runs/facts_ft \
        finetune.trainable=top_slots finetune.top_slots=500 [train.max_steps=N] [optim.lr=X]

``finetune.trainable``: ``all`` (full finetuning), ``memory`` (every value table, all else
frozen) or ``top_slots`` (the ``finetune.top_slots`` best slots of each table by TF-IDF of their
accesses on ``data.dir``'s training split against ``finetune.background``'s, by default the
pretrained run's data). The new data must use the run's vocabulary (preprocess it with
``vocab_from=`` the run's data.dir). ``data.*``, ``train.*`` and ``optim.*`` override the run's
settings; the model's are kept. ``out_dir`` is a run directory like any other (evaluate,
recall, generate, export it); ``out_dir/finetune.json`` records the settings and the trained
slots, and rerunning the command resumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pkm_lm import cli
from pkm_lm.atomic import atomic_write_text
from pkm_lm.checkpoint import latest_checkpoint, load_checkpoint, read_run_config
from pkm_lm.config import DataConfig, OptimConfig, TrainConfig, TrainLoopConfig
from pkm_lm.data import open_split
from pkm_lm.distributed import cleanup_distributed, init_distributed
from pkm_lm.errors import ConfigError, NotFoundError, check_choice, check_positive, require
from pkm_lm.slots import TRAINABLE, Freezer, rank_slots
from pkm_lm.trainer import Trainer

FINETUNE_JSON = "finetune.json"


@dataclass
class FinetuneSettings:
    trainable: str = "top_slots"
    top_slots: int = 500  # trained slots per value table (trainable=top_slots)
    background: str | None = None  # data dir; None: the pretrained run's data.dir
    count_tokens: int = 200_000  # tokens of each training split whose slot accesses are counted

    def __post_init__(self) -> None:
        check_choice("finetune.trainable", self.trainable, TRAINABLE)
        check_positive("finetune.top_slots", self.top_slots)
        check_positive("finetune.count_tokens", self.count_tokens)


def _overrides(schema: type) -> type:
    """A dataclass with ``schema``'s fields, each None (keep the run's setting) by default."""
    return make_dataclass(
        f"{schema.__name__}Overrides", [(f.name, Any, None) for f in fields(schema)]
    )


@dataclass
class FinetuneConfig:
    run_dir: str = "???"  # the pretrained run
    out_dir: str = "???"  # the finetuned run
    checkpoint: str | None = None  # None: the pretrained run's newest complete checkpoint
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    data: Any = field(default_factory=_overrides(DataConfig))
    train: Any = field(default_factory=_overrides(TrainLoopConfig))
    optim: Any = field(default_factory=_overrides(OptimConfig))


ConfigStore.instance().store(name="base_finetune", node=FinetuneConfig)


def finetune_config(fcfg: FinetuneConfig) -> TrainConfig:
    """The pretrained run's config with ``out_dir`` as its run_dir and the overrides applied."""
    if fcfg.data.dir is None:
        raise ConfigError("data.dir is missing: the new data, preprocessed with vocab_from=")
    changes = {"run_dir": fcfg.out_dir}
    for part in ("data", "train", "optim"):
        changes[part] = {k: v for k, v in asdict(getattr(fcfg, part)).items() if v is not None}
    base = OmegaConf.structured(read_run_config(fcfg.run_dir))
    cfg = OmegaConf.to_object(OmegaConf.merge(base, changes))
    require(
        Path(cfg.run_dir).resolve() != Path(fcfg.run_dir).resolve(),
        "out_dir",
        fcfg.out_dir,
        "must not be the pretrained run_dir",
    )
    return cfg


def check_settings(fcfg: FinetuneConfig, cfg: TrainConfig) -> None:
    ft = fcfg.finetune
    if ft.trainable != "all" and not cfg.model.memory_layers:
        raise ConfigError(
            f"finetune.trainable={ft.trainable} needs a memory: run_dir={fcfg.run_dir} has none"
        )
    if ft.trainable == "top_slots":
        require(
            cfg.distributed.memory_parallel == 1,
            "finetune.trainable",
            ft.trainable,
            f"cannot train rows of a table split over ranks (distributed.memory_parallel="
            f"{cfg.distributed.memory_parallel}): use memory or all",
        )
        n_slots = cfg.model.memory.n_keys**2
        require(
            ft.top_slots <= n_slots,
            "finetune.top_slots",
            ft.top_slots,
            f"must be <= the {n_slots} slots of a table",
        )


def plan(fcfg: FinetuneConfig, checkpoint: Path) -> dict:
    """What finetune.json records; a resumed run must have the same."""
    return {
        "pretrained": str(fcfg.run_dir),
        "checkpoint": str(checkpoint),
        "data": fcfg.data.dir,
        **asdict(fcfg.finetune),
    }


def prepare(
    fcfg: FinetuneConfig, cfg: TrainConfig, checkpoint: Path, saved: dict | None, env
) -> tuple:
    """The Trainer's model hook: pretrained weights, the slots to train, freezing; returns the
    hook and a holder filled with (Freezer, slots) when it runs."""
    made: dict = {}

    def hook(trainer: Trainer) -> None:
        trainer.load_weights(load_checkpoint(checkpoint)["model"])
        model = trainer.model
        slots = None
        if fcfg.finetune.trainable == "top_slots":
            if saved is not None:
                slots = [torch.tensor(s) for s in saved["slots"]]
            else:
                ft = fcfg.finetune
                background = ft.background or read_run_config(fcfg.run_dir).data.dir
                slots = rank_slots(
                    model,
                    open_split(cfg.data.dir, "train"),
                    open_split(background, "train"),
                    cfg.data.seq_len,
                    cfg.train.eval_batch_size or cfg.train.micro_steps(env.world_size)[0],
                    ft.count_tokens,
                    ft.top_slots,
                )
        made["freezer"] = Freezer(model, fcfg.finetune.trainable, slots)
        made["slots"] = slots

    return hook, made


def run_finetune(fcfg: FinetuneConfig) -> None:
    """Finetune (or resume finetuning) as ``fcfg`` says: the command line's work."""
    cfg = finetune_config(fcfg)
    check_settings(fcfg, cfg)
    checkpoint = Path(fcfg.checkpoint) if fcfg.checkpoint else latest_checkpoint(fcfg.run_dir)
    if checkpoint is None or not checkpoint.is_file():
        raise NotFoundError(f"no checkpoint to finetune in run_dir={fcfg.run_dir}")
    record_path = Path(fcfg.out_dir) / FINETUNE_JSON
    settings = plan(fcfg, checkpoint)
    saved = json.loads(record_path.read_text()) if record_path.is_file() else None
    if saved is not None and {k: saved[k] for k in settings} != settings:
        raise ConfigError(
            f"out_dir={fcfg.out_dir} was finetuned with other settings ({record_path}); "
            "use another out_dir or the same settings"
        )
    env = init_distributed(cfg.distributed.backend, cfg.train.device)
    try:
        hook, made = prepare(fcfg, cfg, checkpoint, saved, env)
        trainer = Trainer(cfg, env, on_model=hook)
        freezer = made["freezer"]
        freezer.attach(trainer.optim.all)
        if env.is_main and saved is None:
            slots = made["slots"]
            settings["slots"] = [s.tolist() for s in slots] if slots is not None else None
            settings["trained_params"] = freezer.trained_params(trainer.model)
            Path(fcfg.out_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_text(record_path, json.dumps(settings) + "\n")
        if env.is_main:
            print(
                f"finetune: {fcfg.finetune.trainable}, "
                f"{freezer.trained_params(trainer.model):,} trained parameters",
                flush=True,
            )
        trainer.fit()
    finally:
        cleanup_distributed()


@cli.hydra_main("finetune")
def main(dcfg: DictConfig) -> None:
    run_finetune(OmegaConf.to_object(dcfg))


if __name__ == "__main__":
    main()
