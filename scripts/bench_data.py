"""Data pipeline speed and memory: `python scripts/bench_data.py` (or `make bench-data`).

Preprocesses the default books corpus (`make data`) with 1 and 2 workers, once as is and
once with its training text concatenated 4x, and prints a markdown table: MB/s of each
step (raw bytes in / step seconds) and end to end (raw bytes / wall time of the command,
start-up included), and the peak of the RSS summed over the process tree, sampled every
50 ms. Then it compares Moses with stock sacremoses and times the loader on the
preprocessed train split.

Machine-dependent: on a shared box run it alone. --max-mb cuts the corpus for a quick run.
``--out DIR`` appends the printed tables to DIR/bench_data.md and a record (command, machine
line, every figure) to DIR/bench_data.jsonl: the committed source of the figures docs quote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pkm_lm import cli
from pkm_lm.errors import NotFoundError
from pkm_lm.perf.machine import describe
from pkm_lm.perf.records import record, save, tee_stdout

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("moses", "learnbpe", "vocab", "binarize")


def tree_rss_kb(pid: int) -> int:
    """RSS summed over `pid` and its descendants (0 for processes that just exited).

    Pages that forked workers share with the main process count once per process, so
    this is an upper bound on the memory the pipeline uses. (PSS, which splits shared
    pages, creeps up with the amount of text processed as copy-on-write unshares pages,
    towards this bound.)
    """
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak summed RSS in MB) of a command and its children."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_kb(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return wall, peak / 1024


def make_raw(src: Path, dst: Path, repeat: int, max_bytes: int | None) -> int:
    """Copy the corpus (train text `repeat` times, each split cut at max_bytes); total bytes."""
    dst.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        data = (src / f"{split}.txt").read_bytes()
        if max_bytes is not None and len(data) > max_bytes:
            data = data[: data.rindex(b"\n", 0, max_bytes) + 1]
        with open(dst / f"{split}.txt", "wb") as f:
            for _ in range(repeat if split == "train" else 1):
                f.write(data)
    return sum((dst / f"{s}.txt").stat().st_size for s in ("train", "valid", "test"))


def step_rates(manifest: dict) -> dict[str, float]:
    """MB/s of each step kind, summed over splits."""
    rates = {}
    for kind in STEPS:
        runs = [v["stats"] for k, v in manifest["steps"].items() if k.split("/")[0] == kind]
        rates[kind] = sum(r["bytes"] for r in runs) / 1e6 / sum(r["seconds"] for r in runs)
    return rates


def bench_loader(
    data_dir: Path, seq_len: int, batch_size: int, seconds: float
) -> list[tuple[str, float]]:
    from pkm_lm.data import TokenStream, eval_batches, open_split

    tokens = open_split(data_dir, "train")
    rows = []
    for shuffle in (False, True):
        stream = TokenStream(tokens, seq_len, batch_size, shuffle=shuffle)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += stream.next_batch()[:, 1:].numel()
        rows.append((f"TokenStream shuffle={shuffle}", n / (time.perf_counter() - t0)))
    n, t0 = 0, time.perf_counter()
    for batch in eval_batches(tokens, seq_len, batch_size):
        n += batch[:, 1:].numel()
    rows.append(("eval_batches (one pass)", n / (time.perf_counter() - t0)))
    return rows


def bench_moses(raw: Path, n_bytes: int = 2_000_000) -> list[tuple[str, float]]:
    """One process, MB/s: sacremoses as shipped vs our subclasses (identical output)."""
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    from pkm_lm.data import moses

    with open(raw / "train.txt", encoding="utf-8") as f:
        lines = f.read(n_bytes).split("\n")[:-1]
    mb = sum(len(line.encode()) + 1 for line in lines) / 1e6
    norm = MosesPunctNormalizer(
        "en", pre_replace_unicode_punct=True, post_remove_control_chars=True
    )
    tok = MosesTokenizer("en")

    def upstream(line):
        return tok.tokenize(norm.normalize(line), escape=False, return_str=True)

    rows = []
    for name, fn in (
        ("sacremoses as shipped", upstream),
        ("pkm_lm.data.moses", moses.tokenize_line),
    ):
        t0 = time.perf_counter()
        for line in lines:
            fn(line)
        rows.append((name, mb / (time.perf_counter() - t0)))
    return rows


@cli.main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", default="data/raw/books", help="raw corpus (train/valid/test.txt)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--repeats", type=int, nargs="+", default=[1, 4], help="train text concatenated N times"
    )
    parser.add_argument(
        "--max-mb", type=float, default=None, help="cut each split to this many MB first"
    )
    parser.add_argument("--n-codes", type=int, default=8000)
    parser.add_argument("--loader-seconds", type=float, default=3.0)
    parser.add_argument("--out", help="folder for bench_data.md and bench_data.jsonl")
    args = parser.parse_args()

    raw = ROOT / args.raw
    if not (raw / "train.txt").is_file():
        raise NotFoundError(f"{raw}/train.txt not found: run `make data` first")
    torch.set_num_threads(1)  # the loader's timings, in this process
    machine = describe()
    with tee_stdout() as printed:
        figures = measure(raw, args, machine)
    if args.out:
        rec = record(machine, figures, ["scripts/bench_data.py", *sys.argv[1:]])
        save(args.out, "bench_data", printed.getvalue(), rec)


def measure(raw: Path, args: argparse.Namespace, machine: str) -> dict:
    """Run every measurement, print the tables, return their figures."""
    print(machine)
    max_bytes = int(args.max_mb * 1e6) if args.max_mb else None
    rows, loader_dir = [], None
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        for repeat in args.repeats:
            src = Path(tmp) / f"raw{repeat}"
            total = make_raw(raw, src, repeat, max_bytes)
            for workers in args.workers:
                out = Path(tmp) / f"bin{repeat}_{workers}"
                cmd = [sys.executable, "-m", "pkm_lm.preprocess", f"raw_dir={src}", f"out_dir={out}",
                       f"workers={workers}", f"bpe.n_codes={args.n_codes}"]  # fmt: skip
                wall, peak_mb = run_measured(cmd)
                rates = step_rates(json.loads((out / "dataset.json").read_text()))
                rows.append(
                    (
                        f"{total / 1e6:.1f} MB ({repeat}x train)",
                        workers,
                        rates,
                        total / 1e6 / wall,
                        peak_mb,
                    )
                )
                print(f"done: {rows[-1][0]}, {workers} worker(s), {wall:.0f} s", file=sys.stderr)
                if loader_dir is None:
                    loader_dir = out
                else:
                    shutil.rmtree(out)
        print(
            "\n| corpus | workers | "
            + " | ".join(f"{s} MB/s" for s in STEPS)
            + " | end to end MB/s | peak RSS MB (all processes) |"
        )
        print("|---|---|" + "---|" * (len(STEPS) + 2))
        for corpus, workers, rates, e2e, peak in rows:
            cells = " | ".join(f"{rates[s]:.2f}" for s in STEPS)
            print(f"| {corpus} | {workers} | {cells} | {e2e:.2f} | {peak:.0f} |")
        print("\n| Moses normalise + tokenise, 1 process | MB/s |\n|---|---|")
        moses_rows = bench_moses(raw)
        for name, rate in moses_rows:
            print(f"| {name} | {rate:.2f} |")
        print("\n| loader (seq_len 256, batch 32, train split) | tokens/s |\n|---|---|")
        loader_rows = bench_loader(loader_dir, 256, 32, args.loader_seconds)
        for name, rate in loader_rows:
            print(f"| {name} | {rate / 1e6:.1f}M |")
    preprocess = [
        {"corpus": c, "workers": w, "step_mb_s": r, "end_to_end_mb_s": e, "peak_rss_mb": p}
        for c, w, r, e, p in rows
    ]
    return {"preprocess": preprocess, "moses_mb_s": dict(moses_rows),
            "loader_tokens_s": dict(loader_rows)}  # fmt: skip


if __name__ == "__main__":
    main()
