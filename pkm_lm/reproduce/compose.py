"""The experiments' configs exactly as a sweep trains them: composed by Hydra from ``configs/``
with ``+experiment=NAME`` (paper scale) or ``+experiment=SCALE/NAME``, then validated. The
cost model, the parameter table and the sweep's dataset read their models from here, so none of
them can drift from what ``python -m pkm_lm.train`` builds."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hydra import compose, initialize_config_dir

from pkm_lm.config import TrainConfig, register_configs, to_train_config
from pkm_lm.experiments import config_name

# The repository root: configs/ lives beside the package (``pkm_lm.cli.hydra_main`` reads it so).
ROOT = Path(__file__).resolve().parents[2]


def compose_experiments(
    names: Iterable[tuple[str, str]], *overrides: str, configs: Path = ROOT / "configs"
) -> list[TrainConfig]:
    """The validated config of each (experiment, scale) in ``names``, with ``overrides``."""
    register_configs()
    with initialize_config_dir(str(configs.resolve()), version_base=None):
        return [
            to_train_config(
                compose("train", [f"+experiment={config_name(name, scale)}", *overrides])
            )
            for name, scale in names
        ]
