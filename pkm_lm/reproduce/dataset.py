"""The dataset a group trains on at a scale: the ``data.dir`` of its composed configs (the
scale's default), so that ``scripts/sweep.sh`` prepares and checks the directory the trainer
will open, read through the config system rather than a second parser of the YAML.

    python -m pkm_lm.reproduce.dataset headline --scale cpu     # prints data/bin/books
"""

from __future__ import annotations

import argparse
import sys

from pkm_lm import cli
from pkm_lm.config import TrainConfig
from pkm_lm.errors import ConfigError
from pkm_lm.experiments import SCALES, experiments
from pkm_lm.reproduce.compose import compose_experiments


def data_dir(cfgs: list[TrainConfig]) -> str:
    """The one ``data.dir`` the configs share (a group compares runs on the same data)."""
    dirs = sorted({c.data.dir for c in cfgs})
    if len(dirs) != 1:
        raise ConfigError(f"the group's experiments train on different data.dir: {' '.join(dirs)}")
    return dirs[0]


@cli.main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pkm_lm.reproduce.dataset", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("group")
    parser.add_argument("--scale", default="paper", help=f"one of {' '.join(SCALES)}")
    args = parser.parse_args(argv)
    names = experiments(args.group, args.scale)
    print(data_dir(compose_experiments((n, args.scale) for n in names)))


if __name__ == "__main__":
    main(sys.argv[1:])
