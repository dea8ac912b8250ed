"""Train a (memory-augmented) Transformer LM.

    python -m pkm_lm.train +experiment=demo_1mem [run_dir=DIR] [train.max_steps=N] ...
    torchrun --nproc_per_node 2 -m pkm_lm.train +experiment=demo_1mem
    python -m pkm_lm.train -m +experiment=tiny/12L_1mem train.seed=0,1,2 run_dir=DIR

Rerunning the same command with the same run_dir resumes (or does nothing if it finished).
A multirun (``-m``) gives job N its own run directory, ``run_dir/N``.
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pkm_lm import cli
from pkm_lm.config import register_configs, to_train_config
from pkm_lm.distributed import cleanup_distributed, init_distributed
from pkm_lm.trainer import Trainer

register_configs()


@cli.hydra_main("train")
def main(dcfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # every job of a sweep in its own run_dir/N
        dcfg.run_dir = hydra_cfg.runtime.output_dir
    cfg = to_train_config(dcfg)  # validates every field before any work
    env = init_distributed(cfg.distributed.backend, cfg.train.device)
    try:
        Trainer(cfg, env).fit()
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
