"""Turn a sweep group's finished runs into the paper's tables and figures, ours beside theirs.

    python -m pkm_lm.reproduce.table table1 --runs runs/tiny --out results/tiny --scale tiny
    python -m pkm_lm.reproduce.table params --out results      # results/params.md

Writes ``<out>/<group>.md`` plus PNG plots beside it (``pkm_lm.reproduce.report``):
  - table1: the Table 1 grid (our test perplexity, the paper's in brackets), and perplexity vs
    inference speed (the paper's Figure 4);
  - memsize, keys: memory size vs perplexity and vs inference speed, product and flat keys
    (the paper's Figure 7);
  - headline (and table1, which holds its cells): the claims against the seed noise;
  - every group with memories: usage and KL per setting.
``params`` writes the grid's parameter counts instead. Runs that have not finished (no test
evaluation) are listed as missing, never silently dropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pkm_lm import cli
from pkm_lm.atomic import atomic_write_text
from pkm_lm.experiments import GROUPS, SCALES, experiments
from pkm_lm.reproduce.params import param_counts, param_table
from pkm_lm.reproduce.report import make_report
from pkm_lm.reproduce.runs import collect


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pkm_lm.reproduce.table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "group", choices=(*GROUPS, "params"), help="a group, or params: the grid's sizes"
    )
    parser.add_argument("--runs", type=Path, help="directory holding one folder per run")
    parser.add_argument("--out", type=Path, required=True, help="where <group>.md and the plots go")
    parser.add_argument("--scale", default="tiny", choices=SCALES)
    return parser


@cli.main
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.group == "params":
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "params.md", param_table(param_counts()))
        print(f"wrote {args.out / 'params.md'}")
        return
    if args.runs is None:
        parser.error(f"{args.group} needs --runs DIR")
    experiments(args.group, args.scale)  # a ConfigError names the scales the group runs at
    path = make_report(args.group, collect(args.group, args.runs, args.scale), args.out, args.scale)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
