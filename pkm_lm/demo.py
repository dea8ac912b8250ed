"""``make demo``: corpus -> preprocessing -> a short CPU training -> test evaluation.

    python -m pkm_lm.demo [--experiment demo_1mem] [train overrides ...]

Each stage is the project's own command line, run as a child process; each skips the work it
already did, so rerunning the demo resumes where it stopped. At the end it prints the test
perplexity, the memory's usage and KL, a generated sample, and where the loss plot is.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from pkm_lm import cli
from pkm_lm.metrics import read_metrics


def stage(title: str, args: list[str]) -> None:
    print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run([sys.executable, *args]).returncode
    if code:  # the stage printed its error (one line for a user error, else a traceback)
        raise SystemExit(code)
    print(f"=== {title}: {time.perf_counter() - start:.0f} s", flush=True)


@cli.main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experiment", default="demo_1mem", help="configs/experiment/NAME.yaml")
    p.add_argument("--raw-dir", default="data/raw/books")
    p.add_argument("--data-dir", default="data/bin/books")
    p.add_argument("--run-dir", default=None, help="default: runs/<experiment>")
    p.add_argument("overrides", nargs="*", help="extra trainer overrides, e.g. train.max_steps=100")
    args = p.parse_args(argv)
    run_dir = args.run_dir or f"runs/{args.experiment}"
    start = time.perf_counter()

    if not all((Path(args.raw_dir) / f"{s}.txt").is_file() for s in ("train", "valid", "test")):
        stage("corpus", ["-m", "pkm_lm.data.corpus", "books", "--out", args.raw_dir])
    stage("preprocess", ["-m", "pkm_lm.preprocess", f"raw_dir={args.raw_dir}",
                         f"out_dir={args.data_dir}"])  # fmt: skip
    stage("train", ["-m", "pkm_lm.train", f"+experiment={args.experiment}",
                    f"data.dir={args.data_dir}", f"run_dir={run_dir}", *args.overrides])  # fmt: skip
    stage("evaluate", ["-m", "pkm_lm.evaluate", f"run_dir={run_dir}", "split=test"])
    stage("generate", ["-m", "pkm_lm.generate", f"run_dir={run_dir}", "prompt=It was",
                       "max_new_tokens=40"])  # fmt: skip

    test = [r for r in read_metrics(run_dir) if r["kind"] == "eval" and r["split"] == "test"][-1]
    print(f"\n=== pkm-lm demo: {args.experiment}, {test['step']} steps, {test['tokens']:,} "
          f"training tokens, {time.perf_counter() - start:.0f} s in all")  # fmt: skip
    print(f"test perplexity {test['ppl']:.2f} (loss {test['loss']:.4f} nats/token), "
          f"inference {test['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    for layer, m in test["memory"].items():
        print(
            f"memory at layer {layer}: usage {m['usage']:.1f}% of slots, "
            f"KL from uniform {m['kl_weights']:.3f} (weights) / {m['kl_counts']:.3f} (counts)"
        )
    print(f"loss curve: {Path(run_dir) / 'loss.png'}; metrics: {Path(run_dir) / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
