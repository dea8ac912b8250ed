"""Training and inference speed of L layers, L layers + 1 memory, and 2L layers on this machine.

    python scripts/bench_train.py [--dim 512 --heads 8 --layers 6 --seq-len 128 --batch 8]
                                  [--n-keys 512] [--steps 6] [--threads 2] [--nproc 1 2]

Random tokens (speed does not depend on the text), fp32, the trainer's own model, optimisers,
clipping and gradient sync (memory values: sparse gradient + LazyAdam at |K| = n_keys^2). The
three models take turns step by step and each reports its median step, so a change in the
machine's load hits them alike. ``--nproc 2`` also trains with 2 DDP processes (gloo) on the
same global batch, threads split between them.
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
from torch.nn.parallel import DistributedDataParallel as DDP

from pkm_lm.config import ModelConfig, OptimConfig
from pkm_lm.distributed import all_reduce_sparse_grads_
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


def train_stepper(args, cfg: ModelConfig, rank: int = 0, world: int = 1):
    """A function that runs one timed optimizer step (fresh random batch) and returns seconds."""
    torch.manual_seed(0)
    model = build_model(cfg)
    optim = build_optimizers(model, model.value_parameters(), OptimConfig(warmup_steps=1))
    net = model
    if world > 1:  # the trainer's own split: dense parameters in DDP, sparse values by hand
        sparse = [p for p in model.value_parameters() if cfg.memory.sparse_grad]
        ignored = [n for n, p in model.named_parameters() if any(p is q for q in sparse)]
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
        net = DDP(model)
    else:
        sparse = []
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(rank)
    per_rank = args.batch // world

    def step() -> float:
        batch = torch.randint(0, args.vocab, (per_rank, args.seq_len + 1), generator=gen)
        start = time.perf_counter()
        logits = net(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        all_reduce_sparse_grads_(sparse)
        clip_gradients(params, 1.0)
        for opt in optim.all:
            opt.step()
        optim.zero_grad()
        return time.perf_counter() - start

    return step


def infer_stepper(args, cfg: ModelConfig):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def step() -> float:
        batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)
        start = time.perf_counter()
        model(batch)
        return time.perf_counter() - start

    return step


def interleaved_speeds(args, steppers) -> list[float]:
    """Tokens/s of each stepper from its median step, the models taking turns step by step so
    that a change in the machine's load hits all of them alike."""
    times = [[] for _ in steppers]
    for i in range(args.warmup + args.steps):
        for stepper, t in zip(steppers, times, strict=True):
            seconds = stepper()
            if i >= args.warmup:
                t.append(seconds)
    return [args.batch * args.seq_len / statistics.median(t) for t in times]


def _ddp_worker(rank: int, world: int, port: int, args, cfgs: list[ModelConfig], out) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        speeds = interleaved_speeds(args, [train_stepper(args, c, rank, world) for c in cfgs])
        if rank == 0:
            out.put(speeds)
    finally:
        dist.destroy_process_group()


def ddp_train_speeds(args, cfgs: list[ModelConfig], world: int) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _ddp_worker, args=(world, port, args, cfgs, out), nprocs=world, start_method="spawn"
    )
    return out.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=6, help="L (the deep model has 2L)")
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
    cfgs = [cfg for _, cfg in rows]
    train = interleaved_speeds(args, [train_stepper(args, c) for c in cfgs])
    infer = interleaved_speeds(args, [infer_stepper(args, c) for c in cfgs])
    ddp = [ddp_train_speeds(args, cfgs, n) for n in extra]
    for i, (name, cfg) in enumerate(rows):
        n_params = build_model(cfg, "meta").num_params()
        cells = "".join(f"{d[i]:,.0f} | " for d in ddp)
        print(f"| {name} | {n_params / 1e6:.1f}M | {train[i]:,.0f} | {infer[i]:,.0f} | {cells}")
    print(f"\nmemory / same depth, training: {train[1] / train[0]:.2f}x (target >= 0.8x)")
    print(f"memory / {2 * L} layers, inference: {infer[1] / infer[2]:.2f}x (target >= 1.6x)")


if __name__ == "__main__":
    main()
