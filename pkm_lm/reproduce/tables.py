"""The per-run tables of a group's report: every run's numbers beside the paper's, and the
paper's Table 1 grid (rows = layers, columns = width and memories)."""

from __future__ import annotations

import statistics

from pkm_lm.experiments import PAPER_TABLE1, paper_reference, table1_shape
from pkm_lm.reproduce.cells import describe, fmt, fmt_gap, fmt_ppl, infer_speed, paper_ppl
from pkm_lm.reproduce.noise import difference, ppl
from pkm_lm.reproduce.runs import Run


def details_table(runs: list[Run]) -> list[str]:
    """One row per experiment: our numbers (means over seeds) and the paper's."""
    done = [r for r in runs if r.done]
    best = min(done, key=ppl) if done else None
    lines = [
        "| run | setting | test ppl | vs best | paper ppl | valid ppl | usage % | paper usage % "
        "| KL weights | KL counts | infer tok/s | train tok/s | train tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        train = [s.train for s in r.seeds if s.train]
        train_speed = statistics.fmean(t["tokens_per_s"] for t in train) if train else None
        # Tokens at the test evaluation; an unfinished run shows how far it has trained.
        tested = [s.test["tokens"] for s in r.done]
        tokens = max(tested) if tested else max((t["tokens"] for t in train), default=None)
        vs_best = "-" if not r.done or r is best else fmt_gap(*difference(r, best))
        lines.append(
            f"| {r.name} | {describe(r)} | {fmt_ppl(r) if r.done else '-'} | {vs_best} "
            f"| {fmt(paper_ppl(r))} | {fmt(r.valid_ppl)} | {fmt(r.mem_mean('usage'), 1)} "
            f"| {fmt(paper_reference(r.name)[1], 1)} | {fmt(r.mem_mean('kl_weights'), 3)} "
            f"| {fmt(r.mem_mean('kl_counts'), 3)} | {fmt(infer_speed(r), 0)} | {fmt(train_speed, 0)} "
            f"| {fmt(tokens, 0)} |"
        )
    return lines


def table1_grid(runs: list[Run]) -> list[str]:
    """The paper's Table 1 layout: rows = layers, columns = (dim, memories); 'ours (paper)'."""
    by_key = {}
    for r in runs:
        layers, mems, wide = table1_shape(r.name)
        by_key[(layers, mems, 1600 if wide else 1024)] = r
    cols = [(1024, n) for n in range(4)] + [(1600, n) for n in range(2)]
    dims = {d: sorted({r.model.dim for k, r in by_key.items() if k[2] == d}) for d in (1024, 1600)}
    head = " | ".join(f"dim {d}, {n} mem" for d, n in cols)
    lines = [
        "Columns name the paper's widths; ours at this scale: "
        + ", ".join(f"{d} -> {'/'.join(map(str, ours)) or '-'}" for d, ours in dims.items())
        + ".",
        "",
        f"| layers | {head} |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for layers in (12, 16, 24):
        cells = []
        for d, n in cols:
            run, paper = by_key.get((layers, n, d)), PAPER_TABLE1.get((layers, n, d))
            if run is None:
                ours = "not run" if paper else "-"
            else:
                ours = fmt_ppl(run) if run.done else "not finished"
            cells.append(ours if paper is None else f"{ours} ({paper:.2f})")
        lines.append(f"| {layers} | " + " | ".join(cells) + " |")
    return lines
