"""How one number prints in a table cell: perplexities with their seed spread, gaps with their
noise verdict, the setting a run varies. One formatter per kind of cell, so the same number
reads the same in every table."""

from __future__ import annotations

import statistics

from pkm_lm.experiments import paper_reference
from pkm_lm.reproduce.noise import ppl, ppl_std
from pkm_lm.reproduce.runs import QUERY_NORM_LABELS, Run


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def size_label(slots: int) -> str:
    """262144 -> '262k' (the paper's labels: 16k, 65k, 262k, 1M)."""
    if slots >= 1_000_000:
        return f"{slots / 2**20:.0f}M"
    return f"{slots // 1000}k" if slots >= 1000 else str(slots)


def fmt_ppl(run: Run) -> str:
    """'343.67' for one seed, '343.67 +- 2.10 (n=3)' for several."""
    std = ppl_std(run)
    if std is None:
        return fmt(ppl(run))
    return f"{ppl(run):,.2f} +- {std:,.2f} (n={len(run.done)})"


def fmt_gap(gap: float, beyond: bool | None) -> str:
    """'+3.2%' for a ``compare`` result, with '(noise)' when the gap is within the seed noise."""
    return f"{gap:+.1%}" + (" (noise)" if beyond is False else "")


def fmt_values(values: list[float]) -> str:
    """'431.7' for one value, '431.7 +- 8.2' for several (mean +- standard deviation)."""
    if len(values) < 2:
        return fmt(values[0], 1) if values else "-"
    return f"{statistics.fmean(values):,.1f} +- {statistics.stdev(values):,.1f}"


def infer_speed(run: Run) -> float | None:
    return run.mean(lambda s: s.test["tokens_per_s"])


def paper_ppl(run: Run) -> float | None:
    return paper_reference(run.name)[0]


def describe(run: Run) -> str:
    """The setting a run varies, in the paper's words."""
    model, mem = run.model, run.model.memory
    if not run.memory_layers:
        return f"{model.n_layers} layers, dim {model.dim}, no memory"
    where = ",".join(map(str, run.memory_layers))
    return (
        f"{model.n_layers}L d{model.dim}, mem@{where}, \\|K\\|={size_label(run.slots)} "
        f"{mem.keys}, {mem.heads}x{mem.knn}, {QUERY_NORM_LABELS[mem.query_norm]}"
        + (", shared values" if mem.share_values and len(run.memory_layers) > 1 else "")
        + (", gated" if mem.gated else "")
    )
