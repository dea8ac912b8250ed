"""The parameter counts of the experiment grid (``results/params.md``): every scaled experiment
built on the meta device at the paper, small and tiny scales, so the sizes the docs quote are
those of the models the sweep trains."""

from __future__ import annotations

from pathlib import Path

from pkm_lm.experiments import GROUPS, table1_shape
from pkm_lm.model import build_model
from pkm_lm.reproduce.compose import ROOT, compose_experiments

SIZE_SCALES = ("paper", "small", "tiny")


def param_counts(
    configs_dir: Path = ROOT / "configs",
) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(experiment, {scale: (parameters without token embedding, of which memory values)}) for
    every experiment with a tiny twin (a paper-scale file with small/ and tiny/ twins)."""
    names = sorted(p.stem for p in (configs_dir / "experiment" / "tiny").glob("*.yaml"))
    cfgs = iter(
        compose_experiments(
            [(name, scale) for name in names for scale in SIZE_SCALES], configs=configs_dir
        )
    )
    rows = []
    for name in names:
        counts = {}
        for scale in SIZE_SCALES:
            cfg = next(cfgs)
            cfg.model.vocab_size = 1  # the token embedding is excluded below
            model = build_model(cfg.model, "meta")
            values = sum(p.numel() for p in model.value_parameters())
            counts[scale] = (model.num_params(exclude_token_embedding=True), values)
        rows.append((name, counts))
    return sorted(rows, key=lambda row: (group_order(row[0]), row[1]["paper"][0], row[0]))


def group_order(name: str) -> int:
    """Table 1 first, then the ablation base and the ablation groups in sweep order."""
    if table1_shape(name):
        return 0
    return next((i for i, g in enumerate(GROUPS, 1) if name.startswith(g + "_")), 1)


def param_table(rows: list[tuple[str, dict[str, tuple[int, int]]]]) -> str:
    lines = [
        "# Parameter counts of the experiment grid",
        "",
        "Millions of parameters without the (vocabulary-dependent, tied) token embedding, built on",
        "the meta device from `configs/experiment/`; in brackets, the memory values among them.",
        "Regenerate with `python -m pkm_lm.reproduce.table params --out results`.",
        "",
        "| experiment | paper | small | tiny |",
        "|---|---|---|---|",
    ]
    for name, counts in rows:
        cells = " | ".join(f"{n / 1e6:,.2f} ({v / 1e6:,.2f})" for n, v in counts.values())
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"
