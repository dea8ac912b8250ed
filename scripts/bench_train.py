"""Training and inference speed of L layers, L layers + 1 memory, and 2L layers on this machine.

    python scripts/bench_train.py [--dim 512 --heads 8 --layers 4 --seq-len 128 --batch 8]
                                  [--n-keys 512] [--steps 6] [--threads 2] [--nproc 1 2]

Random tokens (speed does not depend on the text), fp32, median step time, the trainer's own model, optimisers
and clipping (memory values: sparse gradient + LazyAdam at |K| = n_keys^2). ``--nproc 2`` also
trains with 2 DDP processes (gloo) on the same global batch, threads split between them.
Prints a Markdown table.
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
import torch.nn.functional as F

from pkm_lm.config import ModelConfig, OptimConfig
from pkm_lm.model import build_model
from pkm_lm.optim import build_optimizers, clip_gradients


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


def train_speed(args, cfg: ModelConfig, rank: int = 0, world: int = 1) -> float:
    torch.manual_seed(0)
    model = build_model(cfg)
    values = model.value_parameters()
    optim = build_optimizers(model, values, OptimConfig(warmup_steps=1))
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(rank)
    per_rank = args.batch // world
    times = []
    for step in range(args.warmup + args.steps):
        batch = torch.randint(0, args.vocab, (per_rank, args.seq_len + 1), generator=gen)
        start = time.perf_counter()
        logits = net(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        clip_gradients(params, 1.0)
        for opt in optim.all:
            opt.step()
        optim.zero_grad()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return args.batch * args.seq_len / statistics.median(times)


@torch.no_grad()
def infer_speed(args, cfg: ModelConfig) -> float:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        model(batch)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return args.batch * args.seq_len / statistics.median(times)


def _ddp_worker(rank: int, world: int, port: int, args, cfg: ModelConfig, out) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        speed = train_speed(args, cfg, rank, world)
        if rank == 0:
            out.put(speed)
    finally:
        dist.destroy_process_group()


def ddp_train_speed(args, cfg: ModelConfig, world: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _ddp_worker, args=(world, port, args, cfg, out), nprocs=world, start_method="spawn"
    )
    return out.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=4, help="L (the deep model has 2L)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--n-keys", type=int, default=512, help="|K| = n_keys^2 memory slots")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--nproc", type=int, nargs="+", default=[1, 2], help="process counts to train with"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    L = args.layers
    rows = [
        (f"{L} layers", model_config(args, L, False)),
        (f"{L} layers + 1 memory (|K|={args.n_keys}^2)", model_config(args, L, True)),
        (f"{2 * L} layers", model_config(args, 2 * L, False)),
    ]
    print(
        f"dim {args.dim}, {args.heads} heads, seq {args.seq_len}, batch {args.batch}, vocab "
        f"{args.vocab}, {args.threads} threads, torch {torch.__version__}, fp32, CPU\n"
    )
    extra = [n for n in args.nproc if n > 1]
    header = "| model | params | train tok/s | infer tok/s | " + "".join(
        f"train tok/s ({n} proc) | " for n in extra
    )
    print(header)
    print("|" + "---|" * (4 + len(extra)))
    results = {}
    for name, cfg in rows:
        n_params = build_model(cfg, "meta").num_params()
        train, infer = train_speed(args, cfg), infer_speed(args, cfg)
        results[name] = (train, infer)
        ddp = "".join(f"{ddp_train_speed(args, cfg, n):,.0f} | " for n in extra)
        print(f"| {name} | {n_params / 1e6:.1f}M | {train:,.0f} | {infer:,.0f} | {ddp}", flush=True)
    (t0, i0), (tm, im), (_, i2) = results.values()
    print(f"\nmemory / same depth, training: {tm / t0:.2f}x (target >= 0.8x)")
    print(f"memory / {2 * L} layers, inference: {im / i2:.2f}x (target >= 1.6x)")


if __name__ == "__main__":
    main()
