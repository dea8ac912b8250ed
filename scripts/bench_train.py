"""Training and inference speed of L layers, L layers + 1 memory, and 2L layers.

    python scripts/bench_train.py [--dim 512 --heads 8 --layers 6 --seq-len 128 --batch 8]
                                  [--n-keys 512] [--steps 6] [--threads 2] [--nproc 1 2]
    python scripts/bench_train.py --device cuda --precision bf16 --batch 32 --nproc 1

Random tokens (speed does not depend on the text). Training runs the trainer's own step,
``Trainer.train_step`` (micro-steps, autocast, GradScaler, gradient sync, clipping, both
optimisers; memory values: sparse gradient + LazyAdam at |K| = n_keys^2), with the memory usage
statistics attached as in ``Trainer.fit``. The three models take turns step by step and each
reports its median step, so a change in the machine's load hits them alike; the spread is the
(max - min) / median of each model's steps. ``--nproc 2`` also trains with 2 DDP processes (gloo,
CPU only) on the same global batch, threads split between them. On CUDA the device is
synchronised before every clock read. Prints the machine, then a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pkm_lm import cli
from pkm_lm.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, TrainLoopConfig
from pkm_lm.distributed import DistEnv, resolve_device, synchronize
from pkm_lm.metrics import memory_stats
from pkm_lm.model import build_model
from pkm_lm.perf.machine import describe
from pkm_lm.precision import autocast
from pkm_lm.trainer import Trainer


def model_config(args, n_layers: int, memory: bool) -> ModelConfig:
    cfg = ModelConfig(
        n_layers=n_layers,
        dim=args.dim,
        n_heads=args.heads,
        dropout=0.0,
        attn_dropout=0.0,
        vocab_size=args.vocab,
        max_seq_len=args.seq_len,
    )
    if memory:
        cfg.memory.n_keys = args.n_keys
        cfg.memory.layers = [max(1, (n_layers * 2 + 2) // 3)]  # about 2/3 of the depth
    return cfg


def train_config(args, model: ModelConfig) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(seq_len=args.seq_len),
        model=model,
        optim=OptimConfig(warmup_steps=1),
        train=TrainLoopConfig(
            batch_size=args.batch,
            micro_batch_size=args.micro_batch,
            precision=args.precision,
            device=args.device,
        ),
    )


def timed(device: torch.device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def train_stepper(args, cfg: ModelConfig, env: DistEnv):
    """A function that times one ``Trainer.train_step`` on a fresh random batch (seconds)."""
    torch.manual_seed(0)
    trainer = Trainer(train_config(args, cfg), env, data=False)
    gen = torch.Generator().manual_seed(env.rank)
    per_rank = args.batch // env.world_size

    def step() -> float:
        batch = torch.randint(0, args.vocab, (per_rank, args.seq_len + 1), generator=gen)
        with memory_stats(trainer.model):  # as in Trainer.fit
            return timed(env.device, lambda: trainer.train_step(batch))

    return step


def infer_stepper(args, cfg: ModelConfig, device: torch.device):
    torch.manual_seed(0)
    model = build_model(cfg, device).eval()
    gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def forward(batch):
        with autocast(device, args.precision):
            model(batch)

    def step() -> float:
        batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)
        batch = batch.to(device)
        return timed(device, lambda: forward(batch))

    return step


def interleaved(args, steppers) -> list[tuple[float, float]]:
    """(tokens/s from the median step, spread of the steps) of each stepper, the models taking
    turns step by step so that a change in the machine's load hits all of them alike."""
    times = [[] for _ in steppers]
    for i in range(args.warmup + args.steps):
        for stepper, t in zip(steppers, times, strict=True):
            seconds = stepper()
            if i >= args.warmup:
                t.append(seconds)
    out = []
    for t in times:
        median = statistics.median(t)
        out.append((args.batch * args.seq_len / median, (max(t) - min(t)) / median))
    return out


def _ddp_worker(rank: int, world: int, port: int, args, cfgs: list[ModelConfig], out) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        env = DistEnv(rank, rank, world, torch.device("cpu"))
        speeds = interleaved(args, [train_stepper(args, c, env) for c in cfgs])
        if rank == 0:
            out.put(speeds)
    finally:
        dist.destroy_process_group()


def ddp_train_speeds(args, cfgs: list[ModelConfig], world: int) -> list[tuple[float, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _ddp_worker, args=(world, port, args, cfgs, out), nprocs=world, start_method="spawn"
    )
    return out.get()


@cli.main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=6, help="L (the deep model has 2L)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--micro-batch", type=int, default=None, help="per rank and forward")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--n-keys", type=int, default=512, help="|K| = n_keys^2 memory slots")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument(
        "--nproc", type=int, nargs="+", default=[1, 2], help="process counts to train with"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    extra = [n for n in args.nproc if n > 1]
    if extra and device.type == "cuda":
        p.error("--nproc > 1 runs gloo processes on the CPU; use --nproc 1 with --device cuda")

    L = args.layers
    rows = [
        (f"{L} layers", model_config(args, L, False)),
        (f"{L} layers + 1 memory (|K|={args.n_keys}^2)", model_config(args, L, True)),
        (f"{2 * L} layers", model_config(args, 2 * L, False)),
    ]
    print(describe(device))
    print(
        f"dim {args.dim}, {args.heads} heads, seq {args.seq_len}, batch {args.batch}, vocab "
        f"{args.vocab}, {args.precision}, {device}; {args.steps} timed steps after "
        f"{args.warmup} warmup, median (spread = (max - min) / median)\n"
    )
    header = "| model | params | train tok/s | infer tok/s | " + "".join(
        f"train tok/s ({n} proc) | " for n in extra
    )
    print(header)
    print("|" + "---|" * (4 + len(extra)))
    cfgs = [cfg for _, cfg in rows]
    env = DistEnv(0, 0, 1, device)
    train = interleaved(args, [train_stepper(args, c, env) for c in cfgs])
    infer = interleaved(args, [infer_stepper(args, c, device) for c in cfgs])
    ddp = [ddp_train_speeds(args, cfgs, n) for n in extra]

    def cell(speed: tuple[float, float]) -> str:
        return f"{speed[0]:,.0f} ({speed[1]:.0%})"

    for i, (name, cfg) in enumerate(rows):
        n_params = build_model(cfg, "meta").num_params()
        cells = "".join(f"{cell(d[i])} | " for d in ddp)
        print(f"| {name} | {n_params / 1e6:.1f}M | {cell(train[i])} | {cell(infer[i])} | {cells}")
    print(f"\nmemory / same depth, training: {train[1][0] / train[0][0]:.2f}x (target >= 0.8x)")
    print(f"memory / {2 * L} layers, inference: {infer[1][0] / infer[2][0]:.2f}x (target >= 1.6x)")
    print(describe(device))


if __name__ == "__main__":
    main()
