"""CPU speed study of the paper's speed claims, measured on whole models (no training needed).

    python scripts/bench_speed.py                       # both parts, results/cpu/speed.md + plots
    python scripts/bench_speed.py --part memsize --rounds 2

Two parts, each timing inference (forward, no grad, eval mode) and training (the trainer's own
``Trainer.train_step``: forward, backward, clipping, Adam + LazyAdam on row-sparse values, with
the memory statistics attached as in ``Trainer.fit``):
  - memsize (the paper's Figure 7): the ablation model (6 layers, memory replacing the FFN of
    layer 5) with product keys at |K| = 4k..1M and flat keys at 4k..65k;
  - table1 (the speed axis of Figure 4): the 14 Table 1 shapes (depth, memories spread evenly)
    at a CPU-feasible width: dim 1024 -> 128 and 1600 -> 200.
This machine is shared and noisy: wall-clock timings of the same model spread by up to 120%
between rounds here. So the clock is the process's CPU time (``time.process_time``) with one
intra-op thread: tokens per CPU-second, which other processes on the machine barely disturb.
Variants still alternate round by round (each round times every variant once, in a new order)
and the report gives medians over rounds and ratios measured side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from pkm_lm import cli  # noqa: E402
from pkm_lm.atomic import atomic_write_text, save_figure  # noqa: E402
from pkm_lm.config import (  # noqa: E402
    DataConfig,
    MemoryPlacementConfig,
    ModelConfig,
    TrainConfig,
    TrainLoopConfig,
)
from pkm_lm.distributed import DistEnv  # noqa: E402
from pkm_lm.experiments import TABLE1, table1_shape  # noqa: E402
from pkm_lm.metrics import memory_stats  # noqa: E402
from pkm_lm.perf.machine import cpu_model, describe, load_average  # noqa: E402
from pkm_lm.trainer import Trainer  # noqa: E402

BATCH, SEQ, VOCAB, N_HEADS = 8, 64, 8000, 4  # 512 tokens per step; the books corpus' vocabulary
BASE_DIM, WIDE_DIM = 128, 200  # the paper's 1024 and 1600, shrunk 8x
MEMORY = dict(heads=4, knn=32, k_dim=128)  # the paper's H and k; d_q = dim as 512 vs 1024 / 2
PRODUCT_SIZES = (64, 128, 256, 512, 1024)  # n_keys: |K| = 4k, 16k, 65k, 262k, 1M
# Flat keys score every slot: 262k took ~15 s per training step here, so they stop at 65k.
FLAT_SIZES = (64, 128, 256)


@dataclass(frozen=True)
class Variant:
    name: str
    n_layers: int
    dim: int
    memory_layers: tuple[int, ...] = ()
    memory_count: int = 0
    n_keys: int = 256
    keys: str = "product"

    def config(self) -> ModelConfig:
        memory = MemoryPlacementConfig(
            n_keys=self.n_keys,
            keys=self.keys,
            sparse_grad=True,
            layers=list(self.memory_layers),
            count=self.memory_count,
            **MEMORY,
        )
        return ModelConfig(
            n_layers=self.n_layers,
            dim=self.dim,
            n_heads=N_HEADS,
            dropout=0.0,
            attn_dropout=0.0,
            vocab_size=VOCAB,
            max_seq_len=SEQ,
            memory=memory,
        )


def memsize_variants() -> list[Variant]:
    out = [Variant(f"product_{n * n}", 6, BASE_DIM, (5,), n_keys=n) for n in PRODUCT_SIZES]
    return out + [
        Variant(f"flat_{n * n}", 6, BASE_DIM, (5,), n_keys=n, keys="flat") for n in FLAT_SIZES
    ]


def table1_variants() -> list[Variant]:
    """The Table 1 cells of the experiment registry, at this study's widths."""
    variants = []
    for name in TABLE1:
        layers, mems, wide = table1_shape(name)
        variants.append(Variant(name, layers, WIDE_DIM if wide else BASE_DIM, memory_count=mems))
    return variants


def timed(fn, min_seconds: float, max_iters: int) -> float:
    """Median CPU seconds per call of ``fn`` over as many calls as fit in ``min_seconds`` (>= 1)."""
    times = []
    while not times or (sum(times) < min_seconds and len(times) < max_iters):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure_once(variant: Variant, min_seconds: float) -> dict[str, float]:
    """Tokens/s of one freshly built model: inference, then training steps."""
    cfg = TrainConfig(
        data=DataConfig(seq_len=SEQ),
        model=variant.config(),
        train=TrainLoopConfig(batch_size=BATCH, device="cpu"),
    )
    # The trainer's own step (its optimisers, clipping, skip check), without data or run dir.
    trainer = Trainer(cfg, DistEnv(0, 0, 1, torch.device("cpu")), data=False)
    model = trainer.model
    batch = torch.randint(0, VOCAB, (BATCH, SEQ + 1))

    def infer():
        with torch.no_grad():
            model(batch[:, :-1])

    def train():
        with memory_stats(model):  # as in Trainer.fit
            trainer.train_step(batch)

    model.eval()
    infer()  # warm-up: first-call allocations
    t_infer = timed(infer, min_seconds, 20)
    train()
    t_train = timed(train, min_seconds, 10)
    tokens = BATCH * SEQ
    return {"infer": tokens / t_infer, "train": tokens / t_train}


def measure(variants: list[Variant], rounds: int, min_seconds: float) -> dict[str, dict]:
    """Median tokens/s per variant over ``rounds`` rounds, variants shuffled in every round."""
    samples = {v.name: {"infer": [], "train": []} for v in variants}
    rng = random.Random(0)
    for r in range(rounds):
        order = variants[:]
        rng.shuffle(order)
        for v in order:
            result = measure_once(v, min_seconds)
            gc.collect()
            for mode, tok_s in result.items():
                samples[v.name][mode].append(tok_s)
            print(
                f"round {r + 1}/{rounds} {v.name:>18}: infer {result['infer']:9,.0f} tok/s, train {result['train']:8,.0f} tok/s",
                file=sys.stderr,
            )
    return {
        v.name: {
            **asdict(v),
            "slots": v.n_keys**2 if (v.memory_layers or v.memory_count) else 0,
            **{mode: statistics.median(s) for mode, s in samples[v.name].items()},
            **{
                f"{mode}_spread": (max(s) - min(s)) / statistics.median(s)
                for mode, s in samples[v.name].items()
            },
        }
        for v in variants
    }


def ratio(results: dict, a: str, b: str, mode: str) -> float:
    return results[a][mode] / results[b][mode]


def memsize_report(res: dict, out: Path) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode in zip(axes, ("infer", "train"), strict=True):
        for keys in ("product", "flat"):
            rows = sorted((r["slots"], r[mode]) for r in res.values() if r["keys"] == keys)
            ax.plot(*zip(*rows, strict=True), marker="o", label=f"{keys} keys")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory size |K| (slots)")
        ax.set_ylabel(f"{'inference' if mode == 'infer' else 'training'} tokens/s")
        ax.legend()
    save_figure(fig, out / "memsize_speed.png")
    lines = [
        "## Memory size vs speed, product vs flat keys (the paper's Figure 7)",
        "",
        f"Ablation model: 6 layers, dim {BASE_DIM}, memory replacing the FFN of layer 5, "
        f"{MEMORY['heads']} heads x {MEMORY['knn']} keys, d_q = {MEMORY['k_dim']}; {BATCH} x {SEQ} tokens per step.",
        "",
        "| keys | \\|K\\| | inference tok/s | vs 4k | training tok/s | vs 4k | spread (infer/train) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(res.items(), key=lambda kv: (kv[1]["keys"] != "product", kv[1]["slots"])):
        base = f"{r['keys']}_{64 * 64}"
        lines.append(
            f"| {r['keys']} | {r['slots']:,} | {r['infer']:,.0f} | {ratio(res, name, base, 'infer'):.2f} "
            f"| {r['train']:,.0f} | {ratio(res, name, base, 'train'):.2f} | {r['infer_spread']:.0%} / {r['train_spread']:.0%} |"
        )
    big_p, big_f = f"product_{1024 * 1024}", f"flat_{256 * 256}"
    lines += [
        "",
        "![memory size vs speed](memsize_speed.png)",
        "",
        f"Product keys, 4k -> 1M slots (256x): inference speed x{ratio(res, big_p, 'product_4096', 'infer'):.2f}, "
        f"training x{ratio(res, big_p, 'product_4096', 'train'):.2f}. "
        f"Flat keys, 4k -> 65k (16x): inference x{ratio(res, big_f, 'flat_4096', 'infer'):.2f}, "
        f"training x{ratio(res, big_f, 'flat_4096', 'train'):.2f}. "
        f"At 65k, product keys infer x{ratio(res, 'product_65536', big_f, 'infer'):.1f} faster than flat keys.",
        "",
    ]
    return lines


def table1_report(res: dict, out: Path) -> list[str]:
    names = list(res)
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [res[n]["infer"] / 1000 for n in names], 0.4, label="inference")
    ax.bar([x + 0.2 for x in xs], [res[n]["train"] / 1000 for n in names], 0.4, label="training")
    ax.set_xticks(list(xs), names, rotation=60, fontsize=8)
    ax.set_ylabel("thousand tokens/s")
    ax.legend()
    save_figure(fig, out / "table1_speed.png")
    lines = [
        "## Speed of the Table 1 shapes (the speed axis of the paper's Figure 4)",
        "",
        f"Depth and memory placement of Table 1; dim 1024 -> {BASE_DIM}, 1600 -> {WIDE_DIM}; "
        f"|K| = 65k, {MEMORY['heads']} x {MEMORY['knn']}; {BATCH} x {SEQ} tokens per step.",
        "",
        "| model | inference tok/s | vs 12L_0mem | training tok/s | vs 12L_0mem | spread (infer/train) |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        r = res[n]
        lines.append(
            f"| {n} | {r['infer']:,.0f} | {ratio(res, n, '12L_0mem', 'infer'):.2f} | {r['train']:,.0f} "
            f"| {ratio(res, n, '12L_0mem', 'train'):.2f} | {r['infer_spread']:.0%} / {r['train_spread']:.0%} |"
        )
    lines += [
        "",
        "![Table 1 shapes](table1_speed.png)",
        "",
        f"12L + 1 memory vs 24L without: inference x{ratio(res, '12L_1mem', '24L_0mem', 'infer'):.2f} "
        f"(dim {BASE_DIM}), x{ratio(res, '12L_1mem_1600d', '24L_0mem_1600d', 'infer'):.2f} (dim {WIDE_DIM}); "
        f"training x{ratio(res, '12L_1mem', '24L_0mem', 'train'):.2f} / "
        f"x{ratio(res, '12L_1mem_1600d', '24L_0mem_1600d', 'train'):.2f}. "
        f"Cost of one memory in 12 layers (inference, 1mem / 0mem): x{ratio(res, '12L_1mem', '12L_0mem', 'infer'):.2f} "
        f"at dim {BASE_DIM}, x{ratio(res, '12L_1mem_1600d', '12L_0mem_1600d', 'infer'):.2f} at dim {WIDE_DIM}.",
        "",
    ]
    return lines


@cli.main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("memsize", "table1", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--min-seconds", type=float, default=0.5, help="timing per variant per round"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    load = load_average()
    print(describe())
    parts = ("memsize", "table1") if args.part == "all" else (args.part,)
    results_path = args.out / "speed.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for part in parts:
        variants = memsize_variants() if part == "memsize" else table1_variants()
        started = time.time()
        results[part] = measure(variants, args.rounds, args.min_seconds)
        results[f"{part}_setup"] = {
            "rounds": args.rounds,
            "threads": args.threads,
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "load_at_start": load,
            "seconds": round(time.time() - started),
        }
    text = json.dumps(results, indent=1) + "\n"
    atomic_write_text(results_path, text)
    lines = [
        "# CPU speed study",
        "",
        f"Measured by `python scripts/bench_speed.py` on a shared 2-core CPU, torch.set_num_threads"
        f"({args.threads}). Tokens per CPU-second of the process (robust to the other processes on "
        f"the machine); medians over {args.rounds} rounds, variants interleaved. "
        "Spread = (max - min) / median over rounds.",
        "",
        *(
            f"- {part}: {s['cpu']}, load average {s['load_at_start']} at the start, {s['seconds']} s"
            for part in ("memsize", "table1")
            if "cpu" in (s := results.get(f"{part}_setup", {}))
        ),
        "",
    ]
    if "memsize" in results:
        lines += memsize_report(results["memsize"], args.out)
    if "table1" in results:
        lines += table1_report(results["table1"], args.out)
    atomic_write_text(args.out / "speed.md", "\n".join(lines))
    print(f"wrote {args.out / 'speed.md'}")


if __name__ == "__main__":
    main()
