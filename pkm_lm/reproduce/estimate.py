"""Estimated wall time of a sweep group on one GPU, from a cost model (not a measurement).

    python -m pkm_lm.reproduce.estimate headline --scale gpu --parallel 3
    python -m pkm_lm.reproduce.estimate table1 --scale gpu --parallel 4 --tflops 100

Each experiment is composed from configs/ exactly as scripts/sweep.sh runs it and built on the
meta device. One run costs
    startup + steps * max(FLOPs per step / throughput, launch overhead per layer * layers)
          + evaluations (the valid split every eval_interval and the test split, forward only),
with training FLOPs per token = 6 x (dense parameters incl. the tied output layer) +
12 x layers x context x dim (attention) + 3 x the memory's forward (query, key scores, the
heads x knn value rows read). With --parallel N the runs share the GPU: the group takes the
longer of (a) all runs' GPU work back to back and (b) the runs scheduled on N slots (longest
first) with their own startup and launch-bound time. The defaults are assumptions about an
H100 running small eager-PyTorch models in bf16; replace them with measured values.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pkm_lm import cli
from pkm_lm.config import TrainConfig
from pkm_lm.data.manifest import load_manifest
from pkm_lm.experiments import experiments
from pkm_lm.model import build_model
from pkm_lm.reproduce.compose import ROOT, compose_experiments
from pkm_lm.reproduce.dataset import data_dir


@dataclass
class Estimate:
    name: str
    tokens: int  # training tokens
    gflop_per_token: float
    compute_s: float  # GPU work at the assumed throughput (training and evaluation)
    run_s: float  # wall time of the run alone, startup and launch overhead included


def memory_flops(cfg: TrainConfig) -> float:
    """Forward FLOPs per token of one memory layer: query, key scores, value reads."""
    mem, dim = cfg.model.memory, cfg.model.dim
    v_dim = mem.v_dim or dim
    query = 2 * dim * mem.heads * mem.k_dim
    if mem.keys == "product":
        scores = 2 * mem.heads * 2 * mem.n_keys * (mem.k_dim // 2)
    else:
        scores = 2 * mem.heads * mem.n_slots * mem.k_dim
    return query + scores + 2 * mem.heads * mem.knn * v_dim


def estimate(name: str, cfg: TrainConfig, args: argparse.Namespace, vocab: int) -> Estimate:
    cfg.model.vocab_size = vocab
    model = build_model(cfg.model, "meta")
    dense = model.num_params() - sum(p.numel() for p in model.value_parameters())
    m, t = cfg.model, cfg.train
    attention = 12 * m.n_layers * cfg.data.seq_len * m.dim
    flops_token = 6 * dense + attention + 3 * memory_flops(cfg) * len(m.memory_layers)
    step_tokens = t.batch_size * cfg.data.seq_len
    throughput = args.tflops * 1e12
    step_s = max(flops_token * step_tokens / throughput, args.layer_ms * 1e-3 * m.n_layers)
    n_evals = t.max_steps // t.eval_interval + (t.max_steps % t.eval_interval != 0)
    eval_tokens = n_evals * args.valid_tokens + args.test_tokens
    eval_s = eval_tokens * flops_token / 3 / throughput
    compute = t.max_steps * step_tokens * flops_token / throughput + eval_s
    return Estimate(
        name,
        t.max_steps * step_tokens,
        flops_token / 1e9,
        compute,
        args.startup_s + t.max_steps * step_s + eval_s,
    )


def makespan(times: list[float], slots: int) -> float:
    """Wall time of jobs on ``slots`` parallel workers, longest first (LPT scheduling)."""
    workers = [0.0] * slots
    for t in sorted(times, reverse=True):
        heapq.heapreplace(workers, workers[0] + t)
    return max(workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pkm_lm.reproduce.estimate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("group")
    parser.add_argument("--scale", default="gpu")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once on the GPU")
    parser.add_argument("--tflops", type=float, default=100.0, help="sustained TFLOP/s (bf16)")
    parser.add_argument(
        "--layer-ms", type=float, default=0.3, help="launch-bound ms per layer and step"
    )
    parser.add_argument("--startup-s", type=float, default=20.0, help="per run: imports, CUDA")
    parser.add_argument("--data", type=Path, help="dataset (default: the scale's data.dir)")
    return parser


@cli.main
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = experiments(args.group, args.scale)  # a ConfigError names the allowed values
    if args.parallel < 1:
        parser.error(f"--parallel={args.parallel} must be >= 1")
    cfgs = compose_experiments((n, args.scale) for n in names)
    manifest = load_manifest(args.data or ROOT / data_dir(cfgs))
    vocab = manifest["vocab_size"]
    args.valid_tokens = manifest["splits"]["valid"]["tokens"]
    args.test_tokens = manifest["splits"]["test"]["tokens"]
    rows = [estimate(n, c, args, vocab) for n, c in zip(names, cfgs, strict=True)]
    print(
        f"{'experiment':<16} {'tokens':>12} {'GFLOP/token':>12} {'GPU work s':>11} {'alone s':>8}"
    )
    for r in rows:
        print(
            f"{r.name:<16} {r.tokens:>12,} {r.gflop_per_token:>12.3f} {r.compute_s:>11.1f} {r.run_s:>8.1f}"
        )
    work = sum(r.compute_s for r in rows)
    wall = max(work, makespan([r.run_s for r in rows], args.parallel))
    print(
        json.dumps(
            {
                "group": args.group,
                "scale": args.scale,
                "parallel": args.parallel,
                "gpu_work_s": round(work, 1),
                "estimated_wall_s": round(wall, 1),
                "assumed": {
                    "tflops": args.tflops,
                    "layer_ms": args.layer_ms,
                    "startup_s": args.startup_s,
                },
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
