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
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import yaml

from pkm_lm.atomic import atomic_write_text, save_figure
from pkm_lm.config import spread_evenly
from pkm_lm.metrics import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

GROUPS = ("table1", "memsize", "bn", "position", "heads", "keys", "headline")
TABLE1_RE = re.compile(r"^(\d+)L_(\d+)mem(_1600d)?$")

# Test perplexity on CC-News, Table 1 of Lample et al. (2019): (layers, memories, dim) -> ppl.
PAPER_TABLE1 = {
    (12, 0, 1024): 17.66, (12, 1, 1024): 15.62, (12, 2, 1024): 14.79, (12, 3, 1024): 14.47,
    (16, 0, 1024): 16.65, (16, 1, 1024): 14.88, (16, 2, 1024): 14.10,
    (24, 0, 1024): 16.02, (24, 1, 1024): 14.62,
    (12, 0, 1600): 15.00, (12, 1, 1600): 13.65,
    (16, 0, 1600): 14.36, (16, 1, 1600): 13.17,
    (24, 0, 1600): 13.95,
}  # fmt: skip
# What the paper found, per group (section 4), printed above our table to read it against.
FINDINGS = {
    "table1": "more layers, width and memories all help; 12 layers + 1 memory beat 24 layers "
    "without memory, at about twice the inference speed; at dim 1600 a memory barely slows inference.",
    "memsize": "a larger memory helps (16k -> 1M: 22.80 -> 17.98) at nearly constant inference time.",
    "bn": "query BN matters for large memories (1M: usage 25.8% -> 80.3%, perplexity 19.79 -> "
    "17.98) and little at 16k/65k, whose usage is already near 100%.",
    "position": "the middle layers (4 or 5 of 6) are best, the first is worst, the last is poor.",
    "heads": "equal heads x knn budgets ((1,64), (2,32), (4,16), (8,8)) perform alike; more heads "
    "or more keys help; 4 x 32 is the chosen trade-off.",
    "keys": "product keys beat flat keys in speed, usage and perplexity; flat-key time grows with "
    "|K| while product-key time stays nearly flat (Figure 7).",
    "headline": "(Table 1) 12 layers + 1 memory beat 24 layers without memory (15.62 vs 16.02) "
    "and 12 layers (17.66); here L = 2: 2 layers + 1 memory vs 4 layers vs 2 layers.",
}
# The ablation numbers the paper states in its text (section 4.5): experiment -> (ppl, usage %).
PAPER_ABLATION = {
    "memsize_16k": (22.80, None),
    "memsize_1M": (17.98, None),
    "bn_on_1M": (17.98, 80.3),
    "bn_off_1M": (19.79, 25.8),
}


@dataclass
class Run:
    """What the tables need from one run directory."""

    name: str
    model: dict
    test: dict | None  # the last eval record on the test split
    valid_ppl: float | None
    train: dict | None  # the last train record
    memory_layers: list[int] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, valid ppl) per eval

    @property
    def slots(self) -> int:
        return self.model["memory"]["n_keys"] ** 2 if self.memory_layers else 0

    def mem_mean(self, key: str) -> float | None:
        """Mean of one memory metric over the run's memory layers (None without memory)."""
        mem = (self.test or {}).get("memory") or {}
        values = [m[key] for m in mem.values()]
        return sum(values) / len(values) if values else None


def read_run(run_dir: Path) -> Run:
    with open(run_dir / "config.yaml") as f:
        model = yaml.safe_load(f)["model"]
    test = train = None
    valid_ppl = None
    curve = []
    for rec in read_metrics(run_dir):
        if rec["kind"] == "train":
            train = rec
        elif rec["kind"] == "eval" and rec["split"] == "test":
            test = rec
        elif rec["kind"] == "eval" and rec["split"] == "valid":
            valid_ppl = rec["ppl"]
            curve.append((rec["tokens"], rec["ppl"]))
    mem = model["memory"]
    layers = sorted(mem["layers"]) or spread_evenly(model["n_layers"], mem["count"])
    return Run(run_dir.name, model, test, valid_ppl, train, layers, curve)


def in_group(group: str, name: str) -> bool:
    return bool(TABLE1_RE.match(name)) if group == "table1" else name.startswith(group + "_")


def collect(group: str, runs_dir: Path) -> list[Run]:
    """Every run of ``group`` under ``runs_dir`` that has a config and metrics, sorted by name."""
    if not runs_dir.is_dir():
        raise FileNotFoundError(
            f"--runs {runs_dir}: no such directory (run scripts/sweep.sh first)"
        )
    dirs = [d for d in sorted(runs_dir.iterdir()) if d.is_dir() and in_group(group, d.name)]
    runs = [
        read_run(d) for d in dirs if (d / "metrics.jsonl").exists() and (d / "config.yaml").exists()
    ]
    if not runs:
        raise FileNotFoundError(f"no run of group {group!r} under {runs_dir}")
    return sorted(runs, key=sort_key)


def sort_key(run: Run) -> tuple:
    """Order rows as the paper does: by depth, width, memories, then the ablated setting."""
    mem = run.model["memory"]
    return (
        run.model["n_layers"],
        run.model["dim"],
        len(run.memory_layers),
        mem["keys"] != "product",
        run.slots,
        not mem["query_batchnorm"],
        mem["heads"] * mem["knn"],
        mem["heads"],
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
    return run.test["ppl"] if run.test else None


def infer_speed(run: Run) -> float | None:
    return run.test["tokens_per_s"] if run.test else None


def paper_ppl(run: Run) -> float | None:
    m = TABLE1_RE.match(run.name)
    if m:
        key = (int(m.group(1)), int(m.group(2)), 1600 if m.group(3) else 1024)
        return PAPER_TABLE1.get(key)
    return PAPER_ABLATION.get(run.name, (None, None))[0]


def describe(run: Run) -> str:
    """The setting a run varies, in the paper's words."""
    mem = run.model["memory"]
    if not run.memory_layers:
        return f"{run.model['n_layers']} layers, dim {run.model['dim']}, no memory"
    where = ",".join(map(str, run.memory_layers))
    return (
        f"{run.model['n_layers']}L d{run.model['dim']}, mem@{where}, \\|K\\|={size_label(run.slots)} "
        f"{mem['keys']}, {mem['heads']}x{mem['knn']}, BN {'on' if mem['query_batchnorm'] else 'off'}"
    )


def details_table(runs: list[Run]) -> list[str]:
    """One row per run: our numbers and the paper's."""
    lines = [
        "| run | setting | test ppl | paper ppl | valid ppl | usage % | paper usage % "
        "| KL weights | KL counts | infer tok/s | train tok/s | train tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        paper_usage = PAPER_ABLATION.get(r.name, (None, None))[1]
        train_speed = r.train["tokens_per_s"] if r.train else None
        tokens = r.train["tokens"] if r.train else None
        lines.append(
            f"| {r.name} | {describe(r)} | {fmt(ppl(r))} | {fmt(paper_ppl(r))} | {fmt(r.valid_ppl)} "
            f"| {fmt(r.mem_mean('usage'), 1)} | {fmt(paper_usage, 1)} | {fmt(r.mem_mean('kl_weights'), 3)} "
            f"| {fmt(r.mem_mean('kl_counts'), 3)} | {fmt(infer_speed(r), 0)} | {fmt(train_speed, 0)} "
            f"| {fmt(tokens, 0)} |"
        )
    return lines


def table1_grid(runs: list[Run]) -> list[str]:
    """The paper's Table 1 layout: rows = layers, columns = (dim, memories); 'ours (paper)'."""
    by_key = {}
    for r in runs:
        m = TABLE1_RE.match(r.name)
        by_key[(int(m.group(1)), int(m.group(2)), 1600 if m.group(3) else 1024)] = r
    cols = [(1024, n) for n in range(4)] + [(1600, n) for n in range(2)]
    dims = {
        d: sorted({r.model["dim"] for k, r in by_key.items() if k[2] == d}) for d in (1024, 1600)
    }
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
                ours = fmt(ppl(run)) if run.test else "not finished"
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
            if r.test and r.model["memory"]["keys"] == keys
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
    """Validation perplexity against training tokens, one curve per run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        if r.curve:
            tokens, ppls = zip(*r.curve, strict=True)
            ax.plot(tokens, ppls, marker="." if len(tokens) > 1 else "o", label=r.name)
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
    done = [r for r in runs if r.test is not None]
    missing = [r.name for r in runs if r.test is None]
    tokens = sorted({r.train["tokens"] for r in runs if r.train})
    lines = [
        f"# {group} at the {scale} scale",
        "",
        f"Runs: {len(done)} evaluated on the test split"
        + (f"; not finished: {', '.join(missing)}" if missing else "")
        + f". Training tokens per run: {', '.join(f'{t:,}' for t in tokens) or '-'}.",
        "Perplexities are ours on our corpus; the paper's (CC-News, 28B words) are beside them",
        "for reference only: at a shrunk scale only the *direction* of a finding can compare.",
        "",
        f"The paper: {FINDINGS[group]}",
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
    if TABLE1_RE.match(name):
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
    parser.add_argument("--scale", default="tiny", choices=("paper", "small", "tiny", "cpu"))
    return parser


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
    path = make_report(args.group, collect(args.group, args.runs), args.out, args.scale)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
