"""Speed and peak memory of the PKM layer against lucidrains' product-key-memory (PyPI).

Measured side by side in one run: for each memory size the variants alternate round by round
and the table reports medians and ratios to the reference (this machine is shared and noisy).
Peak RSS is measured in a fresh subprocess per variant. Usage:

    python scripts/bench_memory.py                 # the full table (about 10 minutes on 2 cores)
    python scripts/bench_memory.py --sizes 128 256 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from pkm_lm import cli
from pkm_lm.memory import LazyAdam, MemoryConfig, ProductKeyMemory

DIM, BATCH, SEQ, HEADS, KNN, K_DIM = 512, 8, 256, 4, 32, 512
FLAT_MAX_KEYS = 256  # flat keys score every slot: 512^2 would take ~15 s per forward here


def build(variant: str, n_keys: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant == "reference":
        from product_key_memory import PKM  # lazily: only the benchmark needs it

        return PKM(DIM, heads=HEADS, num_keys=n_keys, topk=KNN, dim_head=K_DIM // 2)
    keys = "flat" if variant == "flat" else "product"
    cfg = MemoryConfig(
        n_keys=n_keys,
        heads=HEADS,
        knn=KNN,
        k_dim=K_DIM,
        keys=keys,
        sparse_grad=variant.startswith("ours"),
    )
    return ProductKeyMemory(DIM, DIM, cfg)


def optimizer(variant: str, model: torch.nn.Module, fused: bool = False):
    """ours: LazyAdam on the values (ours_rowwise: one second moment per row), Adam on the
    rest; reference/flat: Adam on everything."""
    if not variant.startswith("ours"):
        return [torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused or None)]
    values = model.values.weight
    rest = [p for p in model.parameters() if p is not values]
    lazy = LazyAdam([values], lr=1e-3, row_wise=variant == "ours_rowwise")
    return [lazy, torch.optim.Adam(rest, lr=1e-3, fused=fused or None)]


def forward(model, x):
    with torch.no_grad():
        model(x)


def forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    model(x).float().pow(2).mean().backward()


def full_step(model, x, opts):
    forward_backward(model, x)
    for opt in opts:
        opt.step()


def time_rounds(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each fn, alternating the fns inside every round."""
    for fn in fns.values():
        fn()  # warm-up (allocations, optimizer state)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_steps(models: dict, x: torch.Tensor, label: str, fused: bool, rounds: int) -> dict:
    """Full training steps of ours and the reference, side by side; optimizer state freed after."""
    opts = {v: optimizer(v, models[v], fused) for v in ("ours", "reference")}
    fns = {f"{v}/{label}": (lambda v=v: full_step(models[v], x, opts[v])) for v in opts}
    return time_rounds(fns, rounds)


def speed_table(sizes: list[int], rounds: int) -> list[dict]:
    x = torch.randn(BATCH, SEQ, DIM)
    rows = []
    for n in sizes:
        variants = ["ours", "reference"] + (["flat"] if n <= FLAT_MAX_KEYS else [])
        models = {v: build(v, n).train() for v in variants}
        fns = {}
        for v, m in models.items():
            fns[f"{v}/forward"] = lambda m=m: forward(m, x)
            fns[f"{v}/fwd+bwd"] = lambda m=m: forward_backward(m, x)
        res = time_rounds(fns, rounds)
        # Full steps: ours vs reference with torch's default Adam, then vs fused Adam, each
        # pair side by side (two reference optimizer states at once would not fit at 1024^2).
        for label, fused in (("step", False), ("step fused", True)):
            res.update(time_steps(models, x, label, fused, rounds))
            gc.collect()
        rows.append({"n_keys": n, **res})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del models, fns
        gc.collect()
    return rows


def peak_rss_gib() -> float:
    """This process's peak RSS. VmHWM, unlike ru_maxrss, is not inherited across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_rss_child(variant: str, n_keys: int) -> None:
    """Runs in a subprocess: peak RSS (GiB) after construction, fwd+bwd, and a full step."""
    torch.set_num_threads(2)
    x = torch.randn(BATCH, SEQ, DIM)
    model = build(variant, n_keys).train()
    out = {}
    out["built"] = peak_rss_gib()
    forward_backward(model, x)
    out["fwd+bwd"] = peak_rss_gib()
    opts = optimizer(variant, model)
    for _ in range(2):
        full_step(model, x, opts)
    out["step"] = peak_rss_gib()
    print(json.dumps(out))


def peak_rss(variant: str, n_keys: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", variant, str(n_keys)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def rss_table(n: int) -> None:
    rss = {v: peak_rss(v, n) for v in ("ours", "ours_rowwise", "reference")}
    print(f"\n\nPeak RSS at {n}^2 (GiB, fresh process each; reference with torch's default Adam)")
    print("| variant | built | after fwd+bwd | after full step | ratio fwd+bwd | ratio step |")
    print("|---|---|---|---|---|---|")
    ref = rss["reference"]
    for v, r in rss.items():
        print(
            f"| {v} | {r['built']:.2f} | {r['fwd+bwd']:.2f} | {r['step']:.2f} | "
            f"{r['fwd+bwd'] / ref['fwd+bwd']:.2f}x | {r['step'] / ref['step']:.2f}x |"
        )


@cli.main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[128, 256, 512, 1024],
        help="n_keys values (|K| = n_keys^2)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-only", action="store_true", help="only the peak-RSS table")
    parser.add_argument(
        "--rss-child", nargs=2, metavar=("VARIANT", "N_KEYS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.rss_child:
        return peak_rss_child(args.rss_child[0], int(args.rss_child[1]))
    torch.set_num_threads(args.threads)
    if args.rss_only:
        return rss_table(args.sizes[-1])
    print(
        f"torch {torch.__version__}, {args.threads} threads, input/output dim {DIM}, "
        f"{BATCH}x{SEQ} tokens, heads {HEADS}, knn {KNN}, k_dim {K_DIM}, median of "
        f"{args.rounds} rounds; ratio = ours / reference (lower is better)\n"
    )
    rows = speed_table(args.sizes, args.rounds)
    print("| variant | " + " | ".join(f"{r['n_keys']}^2" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    names = [k for k in rows[0] if k != "n_keys"] + ["flat/forward", "flat/fwd+bwd"]
    for name in dict.fromkeys(names):
        cells = [f"{r[name] * 1000:.0f} ms" if name in r else "-" for r in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for phase in ("forward", "fwd+bwd", "step", "step fused"):
        cells = [f"{r[f'ours/{phase}'] / r[f'reference/{phase}']:.2f}x" for r in rows]
        print(f"| ratio {phase} | " + " | ".join(cells) + " |")
    for v in ("ours", "reference"):
        first, last = rows[0], rows[-1]
        if len(rows) > 1:
            print(
                f"\n{v} fwd+bwd growth {first['n_keys']}^2 -> {last['n_keys']}^2: "
                f"{last[f'{v}/fwd+bwd'] / first[f'{v}/fwd+bwd']:.2f}x",
                end="",
            )
            if len(rows) > 2:
                prev = rows[-2]
                print(
                    f", {prev['n_keys']}^2 -> {last['n_keys']}^2: "
                    f"{last[f'{v}/fwd+bwd'] / prev[f'{v}/fwd+bwd']:.2f}x",
                    end="",
                )
    rss_table(args.sizes[-1])


if __name__ == "__main__":
    main()
