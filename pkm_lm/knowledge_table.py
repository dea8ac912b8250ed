"""The facts experiments' tables and plot, from their runs' metrics.jsonl: the capacity group's
``results/SCALE/capacity.md`` and ``capacity.png``, the finetuning experiment's ``finetune.md``.
Every cell is a mean +- standard deviation over the seeds that finished."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from pkm_lm.atomic import atomic_write_text, save_figure
from pkm_lm.data.corpus import FACTS_JSON
from pkm_lm.experiments import FACTS_GROUPS
from pkm_lm.metrics import read_metrics
from pkm_lm.reproduce.cells import fmt_gap, fmt_values
from pkm_lm.reproduce.noise import compare

LABELS = {"capacity_2L": "L", "capacity_2L_1mem": "L + 1 memory", "capacity_4L": "2L"}
CLAIMS = (
    ("L + 1 memory > L", "capacity_2L_1mem", "capacity_2L"),
    ("L + 1 memory > 2L", "capacity_2L_1mem", "capacity_4L"),
    ("2L > L", "capacity_4L", "capacity_2L"),
)


def facts_record(run_dir: Path, phrasing: str, facts: Path | None = None) -> dict | None:
    """The run's newest recall record in ``phrasing`` (of ``facts`` when given)."""
    found = [
        r
        for r in read_metrics(run_dir)
        if r["kind"] == "facts"
        and r["phrasing"] == phrasing
        and (facts is None or Path(r["facts"]) == Path(facts))
    ]
    return found[-1] if found else None


def seed_values(records: list[dict | None], get: Callable[[dict], float]) -> list[float]:
    return [get(r) for r in records if r is not None]


def fmt_small(values: list[float]) -> str:
    """'1.23e-03' or '1.23e-03 +- 2.0e-04' (bits per parameter); '-' for none (no memory)."""
    if not values or None in values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2e}"
    return f"{statistics.fmean(values):.2e} +- {statistics.stdev(values):.1e}"


def percent(values: list[float]) -> str:
    return fmt_values([100 * v for v in values]) + ("%" if values else "")


def capacity_rows(names, sizes, seeds: int, paths) -> tuple:
    """(markdown rows, claim rows, {name: [(people, accuracies, bits)]}) of the capacity group;
    ``paths``: a ``pkm_lm.capacity.Paths``."""
    rows, claims, curves = [], [], {n: [] for n in names}
    for people in sizes:
        bits_by_name = {}
        own = paths.raw(people) / FACTS_JSON
        for name in names:
            dirs = [paths.run(name, people, s) for s in range(seeds)]
            held = [facts_record(d, "heldout", own) for d in dirs]
            train = [facts_record(d, "train", own) for d in dirs]
            done = [r for r in held if r is not None]
            if not done:
                continue
            params = done[0]["params"]
            bits = seed_values(held, lambda r: r["bits"])
            bits_by_name[name] = bits
            acc = seed_values(held, lambda r: r["accuracy_overall"])
            curves[name].append((people, acc, bits))
            per = {k: seed_values(held, lambda r, k=k: r["bits_per_param"][k]) for k in params}
            rows.append(
                f"| {people} | {done[0]['bits_max']:,.0f} | {LABELS[name]} | "
                f"{params['all']:,} / {params['non_embedding']:,} / {params['values']:,} | "
                f"{percent(acc)} | {percent(seed_values(train, lambda r: r['accuracy_overall']))} | "
                f"{fmt_values(bits)} | {fmt_small(per['all'])} | "
                f"{fmt_small(per['non_embedding'])} | {fmt_small(per['values'])} | {len(done)} |"
            )
        for claim, a, b in CLAIMS:
            if a in bits_by_name and b in bits_by_name:
                gap, beyond = compare(bits_by_name[a], bits_by_name[b])
                verdict = {True: "yes", False: "no", None: "one seed: unknown"}[beyond]
                holds = statistics.fmean(bits_by_name[a]) > statistics.fmean(bits_by_name[b])
                claims.append(
                    f"| {people} | {claim} | {fmt_gap(gap, beyond)} | "
                    f"{'holds' if holds else 'does not hold'} | {verdict} |"
                )
    return rows, claims, curves


def plot_capacity(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in curves.items():
        if not points:
            continue
        people = [p for p, _, _ in points]
        for ax, index, scale in ((axes[0], 1, 100), (axes[1], 2, 1)):
            means = [scale * statistics.fmean(pt[index]) for pt in points]
            errs = [
                scale * statistics.stdev(pt[index]) if len(pt[index]) > 1 else 0 for pt in points
            ]
            ax.errorbar(people, means, yerr=errs, marker="o", capsize=3, label=LABELS[name])
    axes[0].set_ylabel("recall, held-out phrasing (%)")
    axes[1].set_ylabel("knowledge stored (bits)")
    sizes = sorted({p for points in curves.values() for p, _, _ in points})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(p) for p in sizes])
        ax.minorticks_off()
        ax.set_xlabel("people in the corpus")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def write_capacity_report(scale, names, sizes, seeds, paths, out: Path) -> Path:
    rows, claims, curves = capacity_rows(names, sizes, seeds, paths)
    out.mkdir(parents=True, exist_ok=True)
    plot_capacity(curves, out / "capacity.png")
    text = "\n".join(
        [
            f"# Capacity: facts stored by L, L + 1 memory and 2L layers ({scale} scale)",
            "",
            f"Written by `python -m pkm_lm.capacity --scale {scale} --seeds {seeds}` "
            "(docs/knowledge.md). " + FACTS_GROUPS["capacity"].finding,
            "",
            "Recall: exact greedy completion of every fact's prompt, in the held-out phrasing "
            "(never in training text) and in a training phrasing. Bits: the sum over attributes "
            "of people x entropy x accuracy above chance, held-out phrasing. Parameters: all / "
            "without the token and position embeddings / in memory values. Mean +- std over "
            "the seeds (n).",
            "",
            "| people | bits in the corpus | model | parameters (all / non-embedding / values) | "
            "recall (held-out) | recall (training phrasing) | bits stored | bits per parameter "
            "| per non-embedding parameter | per value parameter | n |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "Claims on the bits stored (gap of the means; beyond the seed noise when it exceeds "
            "two standard errors of the difference):",
            "",
            "| people | claim | gap | direction | beyond the noise |",
            "|---:|---|---:|---|---|",
            *claims,
            "",
            "![accuracy and bits against population size](capacity.png)",
            "",
        ]
    )
    path = out / "capacity.md"
    atomic_write_text(path, text)
    return path


def write_finetune_report(scale, labels, seeds: int, paths, runs: Path, out: Path) -> Path:
    """The finetuning table: new and old facts, old validation perplexity, per finetuning."""
    from pkm_lm.forgetting import OLD_VALID, PRETRAINED, PRETRAINED_PEOPLE

    people = PRETRAINED_PEOPLE[scale]
    new, old = Path(f"{paths.raw(people)}_b") / FACTS_JSON, paths.raw(people) / FACTS_JSON
    pretrained = [paths.run(PRETRAINED, people, s) for s in range(seeds)]
    dirs = {"pretrained (before)": pretrained}
    dirs.update({label: [runs / label / f"seed{s}" for s in range(seeds)] for label in labels})
    rows = []
    for label, run_dirs in dirs.items():
        scored = [  # (run, its seed's pretrained run) of the seeds scored to the end
            (d, p)
            for d, p in zip(run_dirs, pretrained, strict=True)
            if any(r["kind"] == "eval" and r["split"] == OLD_VALID for r in read_metrics(d))
        ]
        if not scored:
            continue
        cells = [
            [facts_record(d, phrasing, facts)["accuracy_overall"] for d, _ in scored]
            for facts in (new, old)
            for phrasing in ("heldout", "train")
        ]
        ppl = [
            [r["ppl"] for r in read_metrics(d) if r["kind"] == "eval" and r["split"] == OLD_VALID][
                -1
            ]
            for d, _ in scored
        ]
        forgetting = "-"
        if label in labels:  # the drop from the same seed's pretrained model
            before = [facts_record(p, "heldout", old)["accuracy_overall"] for _, p in scored]
            forgetting = percent([1 - a / b for a, b in zip(cells[2], before, strict=True)])
        rows.append(
            f"| {label} | {_trained_params(run_dirs[0])} | "
            f"{' | '.join(percent(c) for c in cells)} | {forgetting} | {fmt_values(ppl)} | "
            f"{len(scored)} |"
        )
    text = "\n".join(
        [
            f"# Sparse memory finetuning: learning new facts, forgetting old ones ({scale} scale)",
            "",
            f"Written by `python -m pkm_lm.forgetting --scale {scale} --seeds {seeds}` "
            f"(docs/knowledge.md). The capacity group's L + 1 memory models trained on "
            f"{people} people (population a) learn {people} new people (population b, one "
            "pass: every new fact read as often as the old ones were) with the pretraining's "
            "optimiser settings. Recall in the held-out and a training phrasing; forgetting: the "
            "relative drop of old-fact recall (held-out) from before finetuning; perplexity on "
            "the old data's validation split. Mean +- std over the seeds (n).",
            "",
            "| finetuning | trained parameters | new facts (held-out) | new facts (training "
            "phrasing) | old facts (held-out) | old facts (training phrasing) | forgetting | "
            "old valid perplexity | n |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "finetune.md"
    atomic_write_text(path, text)
    return path


def _trained_params(run_dir: Path) -> str:
    import json

    from pkm_lm.finetune import FINETUNE_JSON

    record = run_dir / FINETUNE_JSON
    if not record.is_file():
        return "-"
    return f"{json.loads(record.read_text())['trained_params']:,}"
