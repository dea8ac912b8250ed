"""A group's report, ``<out>/<group>.md`` and its plots: the claims, the Table 1 grid, every
run's numbers beside the paper's, and the figures the group calls for."""

from __future__ import annotations

from pathlib import Path

from pkm_lm.atomic import atomic_write_text
from pkm_lm.experiments import GROUPS
from pkm_lm.reproduce.claims import claims_along_training, claims_table
from pkm_lm.reproduce.noise import NOISE_SE
from pkm_lm.reproduce.plots import plot_curves, plot_size_curves, plot_speed_vs_ppl, plot_usage
from pkm_lm.reproduce.runs import Run
from pkm_lm.reproduce.tables import details_table, table1_grid


def make_report(group: str, runs: list[Run], out: Path, scale: str) -> Path:
    """Write ``<out>/<group>.md`` and its plots; return the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    done = [r for r in runs if r.done]
    missing = [r.name for r in runs if not r.done]
    seeds = [s for r in runs for s in r.seeds]
    unfinished = sum(s.test is None for s in seeds)
    tokens = sorted({s.test["tokens"] for s in seeds if s.test})  # where each was evaluated
    lines = [
        f"# {group} at the {scale} scale",
        "",
        f"Runs: {len(done)} evaluated on the test split"
        + (f"; not finished: {', '.join(missing)}" if missing else "")
        + f". Training tokens per run: {', '.join(f'{t:,}' for t in tokens) or '-'}.",
    ]
    if len(tokens) > 1:
        lines += [
            "**The runs were evaluated after different numbers of training tokens: compare only "
            "runs of the same budget.**",
        ]
    if len(seeds) > len(runs):
        lines += [
            f"Seeds: {len(seeds) - unfinished} of the {len(seeds)} seed runs found are evaluated "
            "(runs not yet started are not counted); test perplexity is "
            "the mean +- the standard deviation over the finished seeds (n). A gap marked (noise) is "
            f"within {NOISE_SE:g} standard errors of the difference of two means.",
        ]
    lines += [
        "Perplexities are ours on our corpus; the paper's (CC-News, 28B words) are beside them",
        "for reference only: at a shrunk scale only the *direction* of a finding can compare.",
        "",
        f"The paper: {GROUPS[group].finding}",
        "",
    ]
    if group in ("headline", "table1"):  # table1 holds the headline's three cells
        lines += ["## The claims", "", *claims_table(runs, scale), ""]
    if group == "headline":
        along = claims_along_training(runs, scale)
        if along:
            lines += [
                "## The claims along training (validation split)",
                "",
                "Validation perplexity (mean +- std over the seeds evaluated there) and each claim's "
                "gap (lower / higher - 1: negative when the claim holds), at every evaluation all "
                "runs reached.",
                "",
                *along,
                "",
            ]
    plots = []
    if group == "table1":
        lines += ["## Table 1 (test perplexity: ours (paper))", "", *table1_grid(runs), ""]
        plots.append(
            (
                "Perplexity vs inference speed (Figure 4)",
                f"{group}_speed_ppl.png",
                plot_speed_vs_ppl,
            )
        )
    if group in ("memsize", "keys"):
        plots.append(
            (
                "Memory size vs perplexity and speed (Figure 7)",
                f"{group}_size.png",
                plot_size_curves,
            )
        )
    if any(len(r.curve) > 1 for r in runs):
        plots.append(("Validation perplexity during training", f"{group}_curves.png", plot_curves))
    if any(r.memory_layers for r in done):
        plots.append(("Memory usage and KL per setting", f"{group}_usage.png", plot_usage))
    lines += ["## All runs", "", *details_table(runs), ""]
    lines += [
        "Usage and KL are averaged over a run's memory layers, computed over the whole test split.",
        "Inference speed is the test evaluation's tokens/s (forward only, the run's eval batch).",
        "",
    ]
    for title, filename, plot in plots:
        if done:
            plot(done, out / filename)
            lines += [f"## {title}", "", f"![{title}]({filename})", ""]
    path = out / f"{group}.md"
    atomic_write_text(path, "\n".join(lines))
    return path
