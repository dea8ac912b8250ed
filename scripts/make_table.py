"""Turn a sweep group's finished runs into the paper's tables and figures, ours beside theirs.

    python scripts/make_table.py table1 --runs runs/tiny --out results/tiny --scale tiny

Reads ``<runs>/<experiment>/config.yaml`` and ``metrics.jsonl`` (the trainer's formats) for every
run of the group, and writes ``<out>/<group>.md`` plus PNG plots beside it:
  - table1: the Table 1 grid (our test perplexity, the paper's in brackets), and perplexity vs
    inference speed (the paper's Figure 4);
  - memsize, keys: memory size vs perplexity and vs inference speed, product and flat keys
    (the paper's Figure 7);
  - every group with memories: usage and KL per setting.
``make_table.py params --out results`` writes the grid's parameter counts (results/params.md).
Runs that have not finished (no test evaluation) are listed as missing, never silently dropped.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
from omegaconf import OmegaConf

from pkm_lm import cli
from pkm_lm.atomic import atomic_write_text, save_figure
from pkm_lm.config import ModelConfig, TrainConfig
from pkm_lm.errors import NotFoundError
from pkm_lm.experiments import (
    GROUPS,
    PAPER_TABLE1,
    SCALES,
    experiments,
    headline_claims,
    paper_reference,
    table1_shape,
)
from pkm_lm.metrics import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

# Two means differ beyond the seed noise when the gap exceeds this many standard errors of the
# difference, sqrt(s_a^2 / n_a + s_b^2 / n_b) (about a 95% band for normal noise).
NOISE_SE = 2.0


@dataclass
class SeedRun:
    """What the tables need from one run directory (one seed of an experiment)."""

    test: dict | None  # the last eval record on the test split
    valid_ppl: float | None
    train: dict | None  # the last train record
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, valid ppl) per eval

    def mem_mean(self, key: str) -> float | None:
        """Mean of one memory metric over the run's memory layers (None without memory)."""
        mem = (self.test or {}).get("memory") or {}
        values = [m[key] for m in mem.values()]
        return sum(values) / len(values) if values else None


@dataclass
class Run:
    """One experiment of a group: its model (read through the config schema) and its seeds."""

    name: str
    model: ModelConfig
    seeds: list[SeedRun]

    @property
    def memory_layers(self) -> list[int]:
        return self.model.memory_layers

    @property
    def slots(self) -> int:
        return self.model.memory.n_slots if self.memory_layers else 0

    @property
    def done(self) -> list[SeedRun]:
        """The seeds evaluated on the test split."""
        return [s for s in self.seeds if s.test is not None]

    @property
    def test(self) -> dict | None:
        """The first finished seed's test record (None until one is finished)."""
        return self.done[0].test if self.done else None

    @property
    def curve(self) -> list[tuple[int, float]]:
        """The validation curve, averaged over the seeds at the token counts they all reached."""
        curves = [dict(s.curve) for s in self.seeds if s.curve]
        common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        return [(t, statistics.fmean(c[t] for c in curves)) for t in common]

    def mean(self, value) -> float | None:
        """Mean over the finished seeds of ``value(seed)`` (None when no seed has one)."""
        values = [v for s in self.done if (v := value(s)) is not None]
        return statistics.fmean(values) if values else None

    def mem_mean(self, key: str) -> float | None:
        return self.mean(lambda s: s.mem_mean(key))

    @property
    def valid_ppl(self) -> float | None:
        """The latest validation perplexity, averaged over the seeds (finished or not)."""
        values = [s.valid_ppl for s in self.seeds if s.valid_ppl is not None]
        return statistics.fmean(values) if values else None


def read_seed(run_dir: Path) -> SeedRun:
    test = train = valid_ppl = None
    curve = []
    for rec in read_metrics(run_dir):
        if rec["kind"] == "train":
            train = rec
        elif rec["kind"] == "eval" and rec["split"] == "test":
            test = rec
        elif rec["kind"] == "eval" and rec["split"] == "valid":
            valid_ppl = rec["ppl"]
            curve.append((rec["tokens"], rec["ppl"]))
    return SeedRun(test, valid_ppl, train, curve)


def read_model(run_dir: Path) -> ModelConfig:
    """The run's model as the trainer's schema reads it (defaults filled, placement resolved)."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / "config.yaml")
    )
    return OmegaConf.to_object(cfg).model


def is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").exists() and (path / "config.yaml").exists()


def read_experiment(exp_dir: Path) -> Run | None:
    """An experiment's run: ``exp_dir`` itself (one seed) or its ``seed*/`` folders (sweep.sh
    --seeds); None when nothing has been trained there yet."""
    dirs = [exp_dir] if is_run(exp_dir) else sorted(exp_dir.glob("seed*"), key=seed_index)
    dirs = [d for d in dirs if is_run(d)]
    if not dirs:
        return None
    return Run(exp_dir.name, read_model(dirs[0]), [read_seed(d) for d in dirs])


def seed_index(path: Path) -> int:
    return int(path.name.removeprefix("seed")) if path.name[4:].isdigit() else -1


def collect(group: str, runs_dir: Path, scale: str) -> list[Run]:
    """Every run of ``group`` at ``scale`` under ``runs_dir`` that has a config and metrics."""
    if not runs_dir.is_dir():
        raise NotFoundError(f"--runs {runs_dir}: no such directory (run scripts/sweep.sh first)")
    found = (read_experiment(runs_dir / name) for name in experiments(group, scale))
    runs = [r for r in found if r is not None]
    if not runs:
        raise NotFoundError(f"no run of group {group!r} under {runs_dir}")
    return sorted(runs, key=sort_key)


def sort_key(run: Run) -> tuple:
    """Order rows as the paper does: by depth, width, memories, then the ablated setting."""
    mem = run.model.memory
    return (
        run.model.n_layers,
        run.model.dim,
        len(run.memory_layers),
        mem.keys != "product",
        run.slots,
        not mem.query_batchnorm,
        mem.heads * mem.knn,
        mem.heads,
        run.memory_layers,
    )


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def size_label(slots: int) -> str:
    """262144 -> '262k' (the paper's labels: 16k, 65k, 262k, 1M)."""
    if slots >= 1_000_000:
        return f"{slots / 2**20:.0f}M"
    return f"{slots // 1000}k" if slots >= 1000 else str(slots)


def ppl(run: Run) -> float | None:
    """Mean test perplexity over the finished seeds."""
    return run.mean(lambda s: s.test["ppl"])


def ppl_std(run: Run) -> float | None:
    """Sample standard deviation of the test perplexity over seeds (None below two seeds)."""
    values = [s.test["ppl"] for s in run.done]
    return statistics.stdev(values) if len(values) > 1 else None


def fmt_ppl(run: Run) -> str:
    """'343.67' for one seed, '343.67 +- 2.10 (n=3)' for several."""
    std = ppl_std(run)
    if std is None:
        return fmt(ppl(run))
    return f"{ppl(run):,.2f} +- {std:,.2f} (n={len(run.done)})"


def compare(a: list[float], b: list[float]) -> tuple[float, bool | None]:
    """(relative gap of the mean of ``a`` to the mean of ``b``, whether it exceeds the seed noise).

    The noise verdict is None while either side has fewer than two seeds (no spread known)."""
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return mean_a / mean_b - 1, None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return mean_a / mean_b - 1, abs(mean_a - mean_b) > NOISE_SE * se


def difference(a: Run, b: Run) -> tuple[float, bool | None]:
    """``compare`` on two experiments' test perplexities, one per finished seed."""
    return compare([s.test["ppl"] for s in a.done], [s.test["ppl"] for s in b.done])


def fmt_gap(gap: float, beyond: bool | None) -> str:
    """'+3.2%' for a ``compare`` result, with '(noise)' when the gap is within the seed noise."""
    return f"{gap:+.1%}" + (" (noise)" if beyond is False else "")


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
        f"{mem.keys}, {mem.heads}x{mem.knn}, BN {'on' if mem.query_batchnorm else 'off'}"
    )


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


def claims_table(runs: list[Run], scale: str) -> list[str]:
    """The headline's claims, each: both means, the gap, and whether it is beyond the noise."""
    by_name = {r.name: r for r in runs if r.done}
    lines = [
        "| claim | lower | higher | gap | verdict |",
        "|---|---|---|---|---|",
    ]
    for claim, lower, higher in headline_claims(scale):
        a, b = by_name.get(lower), by_name.get(higher)
        if a is None or b is None:
            lines.append(f"| {claim}: {lower} < {higher} | - | - | - | not finished |")
            continue
        gap, beyond = difference(a, b)
        if beyond is None:
            verdict = "holds (one seed: noise unknown)" if gap < 0 else "reversed (one seed)"
        elif not beyond:
            verdict = "within the seed noise"
        else:
            verdict = "holds" if gap < 0 else "reversed"
        lines.append(
            f"| {claim}: {lower} < {higher} | {fmt_ppl(a)} | {fmt_ppl(b)} | {gap:+.1%} | {verdict} |"
        )
    return lines


def valid_at(run: Run, tokens: int) -> list[float]:
    """The validation perplexity of each seed that was evaluated after ``tokens`` training tokens."""
    return [c[tokens] for s in run.seeds if tokens in (c := dict(s.curve))]


def fmt_values(values: list[float]) -> str:
    """'431.7' for one value, '431.7 +- 8.2' for several (mean +- standard deviation)."""
    if len(values) < 2:
        return fmt(values[0], 1) if values else "-"
    return f"{statistics.fmean(values):,.1f} +- {statistics.stdev(values):,.1f}"


def claims_along_training(runs: list[Run], scale: str) -> list[str]:
    """The claims on the validation split at every evaluation all the group's runs reached: where
    a gap opens, closes or turns, measured rather than read off the plot."""
    by_name = {r.name: r for r in runs}
    claims = [
        (c, by_name[lo], by_name[hi])
        for c, lo, hi in headline_claims(scale)
        if lo in by_name and hi in by_name
    ]
    reached = [{t for s in r.seeds for t, _ in s.curve} for r in runs]
    tokens = sorted(set.intersection(*reached)) if reached else []
    if not claims or not tokens:
        return []
    lines = [
        "| tokens | "
        + " | ".join(r.name for r in runs)
        + " | "
        + " | ".join(c for c, _, _ in claims)
        + " |",
        "|---" * (1 + len(runs) + len(claims)) + "|",
    ]
    gaps: dict[str, list[tuple[int, float]]] = {c: [] for c, _, _ in claims}
    for t in tokens:
        cells = [fmt_values(valid_at(r, t)) for r in runs]
        for claim, a, b in claims:
            gap, beyond = compare(valid_at(a, t), valid_at(b, t))
            gaps[claim].append((t, gap))
            cells.append(fmt_gap(gap, beyond))
        lines.append(f"| {t:,} | " + " | ".join(cells) + " |")
    lines += ["", *trend_notes(gaps)]
    return lines


def gap_crossing(points: list[tuple[int, float]]) -> float | None:
    """Where a straight line through (log tokens, gap) over the later half of the evaluations
    (three at least) reaches zero gap; None when the gap is not moving toward zero there."""
    later = points[len(points) // 2 :] if len(points) >= 6 else points[-3:]
    if len(later) < 3:
        return None
    x = [math.log(t) for t, _ in later]
    slope, intercept = statistics.linear_regression(x, [g for _, g in later])
    if slope == 0 or (later[-1][1] > 0) == (slope > 0):
        return None
    return math.exp(-intercept / slope)


def trend_notes(gaps: dict[str, list[tuple[int, float]]]) -> list[str]:
    """For each claim that does not hold at the last evaluation: where its gap is heading."""
    notes = []
    for claim, points in gaps.items():
        (first_t, first), (last_t, last) = points[0], points[-1]
        if last < 0:
            continue
        crossing = gap_crossing(points)
        if len(points) < 3:
            trend = "Too few evaluations to tell where it is heading."
        elif crossing is None:
            trend = (
                "It is not closing over the later evaluations: the curves give no token count "
                "at which the claim would hold."
            )
        else:
            trend = (
                f"A straight line through its later points (gap against log tokens) reaches zero "
                f"at about {crossing:,.0f} tokens: an extrapolation, not a measurement."
            )
        notes.append(
            f"- {claim}: the gap went from {first:+.1%} at {first_t:,} tokens to {last:+.1%} at "
            f"{last_t:,}. {trend}"
        )
    return notes


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


def param_counts(
    configs_dir: Path = Path("configs"),
) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(experiment, {scale: (parameters without token embedding, of which memory values)}).

    Every scaled experiment (a paper-scale file with small/ and tiny/ twins) is composed by Hydra
    and built on the meta device, so the counts are those of the models the sweep trains.
    """
    from hydra import compose, initialize_config_dir

    from pkm_lm.config import register_configs, to_train_config
    from pkm_lm.model import build_model

    register_configs()
    exp_dir = configs_dir / "experiment"
    names = sorted(p.stem for p in (exp_dir / "tiny").glob("*.yaml"))
    rows = []
    with initialize_config_dir(str(configs_dir.resolve()), version_base=None):
        for name in names:
            counts = {}
            for scale in ("paper", "small", "tiny"):
                prefix = "" if scale == "paper" else f"{scale}/"
                cfg = to_train_config(compose("train", [f"+experiment={prefix}{name}"]))
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
        "Regenerate with `python scripts/make_table.py params --out results`.",
        "",
        "| experiment | paper | small | tiny |",
        "|---|---|---|---|",
    ]
    for name, counts in rows:
        cells = " | ".join(f"{n / 1e6:,.2f} ({v / 1e6:,.2f})" for n, v in counts.values())
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "group", choices=(*GROUPS, "params"), help="a group, or params: the grid's sizes"
    )
    parser.add_argument("--runs", type=Path, help="directory holding one folder per run")
    parser.add_argument("--out", type=Path, required=True, help="where <group>.md and the plots go")
    parser.add_argument("--scale", default="tiny", choices=SCALES)
    return parser


@cli.main
def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.group == "params":
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "params.md", param_table(param_counts()))
        print(f"wrote {args.out / 'params.md'}")
        return
    if args.runs is None:
        parser.error(f"{args.group} needs --runs DIR")
    try:
        experiments(args.group, args.scale)
    except ValueError as e:
        parser.error(str(e))
    path = make_report(args.group, collect(args.group, args.runs, args.scale), args.out, args.scale)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
