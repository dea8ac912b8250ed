"""Speed and peak memory of the PKM layer against lucidrains' product-key-memory (PyPI).

Measured side by side in one process: for each memory size the variants alternate inside every
round, in the listed order on even rounds and reversed on odd ones (whoever runs second may
find caches warm or pages already mapped), and the table gives medians with the spread
(min-max) and the ratio to the reference for each order. Peak memory is measured in a fresh
subprocess per variant (RSS on CPU, allocated GPU memory on CUDA). Variants:

    ours       MemoryConfig(sparse_grad=True): row-sparse value gradient, LazyAdam on the values
    default    MemoryConfig(): dense value gradient, Adam on everything
    triton     as ours with kernel="triton" (CUDA only, when triton is installed)
    reference  lucidrains' PKM, Adam on everything

Usage:

    python scripts/bench_memory.py                      # 128^2 .. 1024^2, 5 rounds
    python scripts/bench_memory.py --sizes 512 1024 --rounds 7
    python scripts/bench_memory.py --device cuda        # synchronizes before reading the clock
    python scripts/bench_memory.py --device cuda --batch 32 --out results/gpu/NAME   # 8k tokens

``--out DIR`` writes the printed tables to DIR/bench_memory.md and appends a record (command,
machine, every round's seconds, the peaks, and each variant's ratio to the reference held to
"faster": met only beyond the spread) to DIR/bench_memory.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from pkm_lm import cli
from pkm_lm.memory import LazyAdam, MemoryConfig, ProductKeyMemory
from pkm_lm.perf.layer_args import Parser
from pkm_lm.perf.machine import describe
from pkm_lm.perf.records import record, save, tee_stdout
from pkm_lm.perf.targets import Target, faster_than

DIM, SEQ, HEADS, KNN, K_DIM = 512, 256, 4, 32, 512
FLAT_MAX_KEYS = 256  # flat keys score every slot: 512^2 would take ~15 s per forward on a CPU


def build(variant: str, n_keys: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant == "reference":
        from product_key_memory import PKM  # lazily: only the benchmark needs it

        model = PKM(DIM, heads=HEADS, num_keys=n_keys, topk=KNN, dim_head=K_DIM // 2)
    else:
        cfg = MemoryConfig(
            n_keys=n_keys,
            heads=HEADS,
            knn=KNN,
            k_dim=K_DIM,
            keys="flat" if variant == "flat" else "product",
            sparse_grad=variant in ("ours", "ours_rowwise", "triton"),
            kernel="triton" if variant == "triton" else "torch",
        )
        model = ProductKeyMemory(DIM, DIM, cfg)
    return model.to(device).train()


def optimizer(variant: str, model: torch.nn.Module, fused: bool = False) -> list:
    """Row-sparse variants: LazyAdam on the values (ours_rowwise: one second moment per row),
    Adam on the rest; the others: Adam on everything."""
    if not (isinstance(model, ProductKeyMemory) and model.config.sparse_grad):
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


def time_rounds(fns: dict, rounds: int, device: str) -> dict[str, list[float]]:
    """Seconds of each fn per round; the order of the fns flips every round."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()  # warm-up (allocations, optimizer state, kernel compilation)
    sync()
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else reversed(list(fns)):
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def time_steps(models: dict, x: torch.Tensor, fused: bool, rounds: int) -> dict:
    """Full training steps of the given models side by side; optimizer state freed after."""
    opts = {v: optimizer(v, m, fused) for v, m in models.items()}
    fns = {v: (lambda v=v: full_step(models[v], x, opts[v])) for v in models}
    return time_rounds(fns, rounds, x.device.type)


def speed_table(
    variants: list[str], sizes: list[int], rounds: int, device: str, steps: bool, batch: int
) -> list[dict]:
    x = torch.randn(batch, SEQ, DIM, device=device)
    rows = []
    for n in sizes:
        names = [v for v in variants if v != "flat" or n <= FLAT_MAX_KEYS]
        models = {v: build(v, n, device) for v in names}
        res = {}
        for phase, fn in (("forward", forward), ("fwd+bwd", forward_backward)):
            fns = {f"{v}/{phase}": (lambda m=m, fn=fn: fn(m, x)) for v, m in models.items()}
            res.update(time_rounds(fns, rounds, device))
        # Full steps, each variant beside the reference with torch's default Adam, then fused
        # Adam; one pair at a time (the optimizer states of several at 1024^2 would not fit).
        for phase, fused in (("step", False), ("step fused", True)) if steps else ():
            for v in (v for v in names if v not in ("reference", "flat")):
                timed = time_steps({w: models[w] for w in (v, "reference")}, x, fused, rounds)
                res[f"{v}/{phase}"] = timed[v]
                res[f"reference/{phase} beside {v}"] = timed["reference"]
                gc.collect()
        rows.append({"n_keys": n, **res})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del models
        gc.collect()
    return rows


def peak_gib(device: str) -> float:
    """Peak allocated GPU memory on CUDA; else this process's peak RSS (VmHWM, which unlike
    ru_maxrss is not inherited across exec)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_child(variant: str, n_keys: int, device: str, threads: int, batch: int) -> None:
    """Runs in a subprocess: peak memory (GiB) after construction, fwd+bwd, and 2 full steps."""
    torch.set_num_threads(threads)
    x = torch.randn(batch, SEQ, DIM, device=device)
    model = build(variant, n_keys, device)
    out = {"built": peak_gib(device)}
    forward_backward(model, x)
    out["fwd+bwd"] = peak_gib(device)
    opts = optimizer(variant, model)
    for _ in range(2):
        full_step(model, x, opts)
    out["step"] = peak_gib(device)
    print(json.dumps(out))


def peak_table(variants: list[str], n: int, device: str, threads: int, batch: int) -> dict:
    def run(v):
        cmd = [sys.executable, __file__, "--peak-child", v, str(n), device, str(threads)]
        cmd.append(str(batch))
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    names = [v for v in variants if v != "flat"]
    if "ours" in names:
        names.insert(names.index("ours") + 1, "ours_rowwise")
    peaks = {v: run(v) for v in names}
    what = "allocated GPU memory" if device == "cuda" else "RSS"
    print(f"\nPeak {what} at {n}^2 (GiB, a fresh process each; Adam is torch's default)")
    print("| variant | built | after fwd+bwd | after 2 steps | ratio fwd+bwd | ratio step |")
    print("|---|---|---|---|---|---|")
    ref = peaks["reference"]
    for v, r in peaks.items():
        print(
            f"| {v} | {r['built']:.2f} | {r['fwd+bwd']:.2f} | {r['step']:.2f} | "
            f"{r['fwd+bwd'] / ref['fwd+bwd']:.2f}x | {r['step'] / ref['step']:.2f}x |"
        )
    return peaks


def faster_than_reference(rows: list[dict], variants: list[str]) -> list[Target]:
    """Each variant's median time over the reference's, per size and phase: < 1 (faster) is
    the goal, met only when the ratio plus the two timings' spreads stays below 1."""

    out = []
    for v in (v for v in variants if v not in ("reference", "flat")):
        for phase in ("forward", "fwd+bwd", "step", "step fused"):
            for r in (r for r in rows if f"{v}/{phase}" in r):
                ref = r[f"reference/{phase}" + (f" beside {v}" if "step" in phase else "")]
                name = f"{v} {phase} at {r['n_keys']}^2 / reference"
                out.append(faster_than(name, r[f"{v}/{phase}"], ref))
    return out


def print_tables(rows: list[dict], variants: list[str]) -> None:
    def ms(values):
        return f"{statistics.median(values) * 1000:.0f} ms"

    print("Median [min-max] per phase:\n")
    print("| variant | " + " | ".join(f"{r['n_keys']}^2" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    names = dict.fromkeys(k for r in rows for k in r if k != "n_keys")
    for name in names:
        cells = []
        for r in rows:
            t = r.get(name)
            cells.append(f"{ms(t)} [{min(t) * 1e3:.0f}-{max(t) * 1e3:.0f}]" if t else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nRatio to the reference, median of all rounds (rounds where the variant ran first /")
    print("where the reference ran first):\n")
    print("| ratio | " + " | ".join(f"{r['n_keys']}^2" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for v in (v for v in variants if v not in ("reference", "flat")):
        for phase in ("forward", "fwd+bwd", "step", "step fused"):
            cells = []
            for r in rows:
                if f"{v}/{phase}" not in r:
                    cells.append("-")
                    continue
                ours = r[f"{v}/{phase}"]
                ref = r[f"reference/{phase}" + (f" beside {v}" if "step" in phase else "")]
                first = statistics.median(ours[0::2]) / statistics.median(ref[0::2])
                second = statistics.median(ours[1::2]) / statistics.median(ref[1::2])
                both = statistics.median(ours) / statistics.median(ref)
                cells.append(f"{both:.2f}x ({first:.2f} / {second:.2f})")
            print(f"| {v} {phase} | " + " | ".join(cells) + " |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        for v in variants:
            t0, t1 = first.get(f"{v}/fwd+bwd"), last.get(f"{v}/fwd+bwd")
            if t0 and t1:
                growth = statistics.median(t1) / statistics.median(t0)
                print(
                    f"\n{v} fwd+bwd growth {first['n_keys']}^2 -> {last['n_keys']}^2: "
                    f"{growth:.2f}x",
                    end="",
                )
        print()


@cli.main
def main() -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[128, 256, 512, 1024], help="n_keys values"
    )
    parser.add_argument("--rounds", type=int, default=5, help="at least 2 (both orders)")
    parser.add_argument("--batch", type=int, default=8, help="sequences of 256 tokens (8)")
    parser.add_argument("--out", help="folder for bench_memory.md and bench_memory.jsonl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="subset of ours default triton flat reference (reference is always added)",
    )
    parser.add_argument("--peak-only", action="store_true", help="only the peak-memory table")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory table")
    parser.add_argument(
        "--no-steps",
        action="store_true",
        help="skip the full steps (two optimizer states of a 1024^2 table need ~16 GB free)",
    )
    parser.add_argument("--peak-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        variant, n, device, threads, batch = args.peak_child
        return peak_child(variant, int(n), device, int(threads), int(batch))
    if args.rounds < 2:
        parser.error(f"--rounds={args.rounds}: at least 2, one in each order of run")
    if args.batch < 1:
        parser.error(f"--batch={args.batch}: must be >= 1")
    if min(args.sizes) < KNN:
        parser.error(f"--sizes={args.sizes}: each >= {KNN} (the layer reads {KNN} sub-keys)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda: no CUDA device is visible")
    variants = args.variants or ["ours", "default"]
    if args.variants is None and args.device == "cuda" and importlib.util.find_spec("triton"):
        variants.append("triton")
    variants = [v for v in variants if v != "reference"] + ["reference"]
    torch.set_num_threads(args.threads)
    machine = describe(args.device)
    rows, peaks, targets = [], {}, []
    with tee_stdout() as printed:
        print(machine)
        print(
            f"input/output dim {DIM}, {args.batch}x{SEQ} tokens, heads {HEADS}, knn {KNN}, "
            f"k_dim {K_DIM}, {args.rounds} rounds\n"
        )
        if not args.peak_only:
            steps = not args.no_steps
            rows = speed_table(variants, args.sizes, args.rounds, args.device, steps, args.batch)
            print_tables(rows, variants)
            targets = faster_than_reference(rows, variants)
            print("\nFaster than the reference (met only beyond the spread of both timings):\n")
            print("\n".join(t.line() for t in targets))
            print(f"\nafter the timings: {describe(args.device)}")
        if not args.no_peak:
            peaks = peak_table(variants, args.sizes[-1], args.device, args.threads, args.batch)
    if args.out:
        figures = {"tokens": args.batch * SEQ, "rounds": rows, "peak_gib": peaks,
                   "targets": [t.as_dict() for t in targets]}  # fmt: skip
        rec = record(machine, figures, ["scripts/bench_memory.py", *sys.argv[1:]])
        save(args.out, "bench_memory", printed.getvalue(), rec)


if __name__ == "__main__":
    main()
