"""The report's figures, drawn from a group's finished runs: the paper's Figure 4 (perplexity vs
inference speed) and Figure 7 (memory size vs perplexity and speed), validation curves with the
seed band, and memory usage per setting."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from pkm_lm.atomic import save_figure
from pkm_lm.reproduce.cells import infer_speed
from pkm_lm.reproduce.noise import ppl
from pkm_lm.reproduce.runs import Run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def plot_speed_vs_ppl(runs: list[Run], path: Path) -> None:
    """Figure 4 of the paper: test perplexity against inference speed, one point per model."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in runs:
        if r.test is None:
            continue
        marker = "o" if r.memory_layers else "s"
        ax.scatter(infer_speed(r), ppl(r), marker=marker, color="C1" if r.memory_layers else "C0")
        ax.annotate(
            r.name, (infer_speed(r), ppl(r)), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel("inference speed (tokens/s)")
    ax.set_ylabel("test perplexity")
    ax.set_title("perplexity vs inference speed (squares: no memory)")
    save_figure(fig, path)


def plot_size_curves(runs: list[Run], path: Path) -> None:
    """Figure 7 of the paper: memory size vs perplexity and vs inference speed, per key type."""
    fig, (ax_ppl, ax_speed) = plt.subplots(1, 2, figsize=(10, 4))
    for keys in ("product", "flat"):
        pts = sorted(
            (r.slots, ppl(r), infer_speed(r))
            for r in runs
            if r.test and r.model.memory.keys == keys
        )
        if not pts:
            continue
        sizes, ppls, speeds = zip(*pts, strict=True)
        ax_ppl.plot(sizes, ppls, marker="o", label=f"{keys} keys")
        ax_speed.plot(sizes, speeds, marker="o", label=f"{keys} keys")
    for ax, label in ((ax_ppl, "test perplexity"), (ax_speed, "inference speed (tokens/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory size |K| (slots)")
        ax.set_ylabel(label)
        ax.legend()
    save_figure(fig, path)


def plot_curves(runs: list[Run], path: Path) -> None:
    """Validation perplexity against training tokens, one curve per experiment: the mean over
    its seeds, with the band between the lowest and highest seed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(runs):
        if r.curve:
            tokens, ppls = zip(*r.curve, strict=True)
            ax.plot(
                tokens, ppls, marker="." if len(tokens) > 1 else "o", label=r.name, color=f"C{i}"
            )
            seeds = [dict(s.curve) for s in r.seeds if s.curve]
            if len(seeds) > 1:
                lo = [min(c[t] for c in seeds) for t in tokens]
                hi = [max(c[t] for c in seeds) for t in tokens]
                ax.fill_between(tokens, lo, hi, color=f"C{i}", alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_usage(runs: list[Run], path: Path) -> None:
    """Memory usage and KL (weights) per setting: how much of the memory the model reaches."""
    runs = [r for r in runs if r.test and r.memory_layers]
    fig, (ax_u, ax_kl) = plt.subplots(1, 2, figsize=(max(8, len(runs) * 0.9), 4))
    names = [r.name for r in runs]
    ax_u.bar(names, [r.mem_mean("usage") for r in runs], color="C2")
    ax_u.set_ylabel("usage (% of slots)")
    ax_kl.bar(names, [r.mem_mean("kl_weights") for r in runs], color="C3")
    ax_kl.set_ylabel("KL from uniform (weights)")
    for ax in (ax_u, ax_kl):
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    save_figure(fig, path)
