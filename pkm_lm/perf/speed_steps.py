"""The timed steps of ``pkm_lm.perf.train_speed``: the trainer's step and an inference forward
of one model on fresh random tokens, each model's own peak device memory, the models taking
turns step by step, and the same over DDP processes on the CPU."""

from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pkm_lm.config import TrainConfig
from pkm_lm.distributed import DistEnv, synchronize
from pkm_lm.metrics import memory_stats
from pkm_lm.model import build_model
from pkm_lm.precision import autocast
from pkm_lm.trainer import Trainer

from .targets import spread


def timed(device: torch.device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Stepper:
    """Times one call on a fresh random batch; tracks this model's own peak device memory."""

    run: object  # (batch) -> None
    make_batch: object  # () -> tokens
    device: torch.device
    resident: int = 0  # bytes allocated by building the model and its warm-up steps
    extra: int = 0  # the most any one step allocated beyond what was there before it
    seconds: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        batch = self.make_batch()
        cuda = self.device.type == "cuda"
        if cuda:
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        seconds = timed(self.device, lambda: self.run(batch))
        if cuda:
            self.extra = max(self.extra, torch.cuda.max_memory_allocated(self.device) - before)
        return seconds

    @property
    def peak_gib(self) -> float | None:
        return (self.resident + self.extra) / 2**30 if self.device.type == "cuda" else None


def warm_up(s: Stepper, steps: int, start: int) -> None:
    """Run the first steps (allocations, optimizer state, compilation): what they leave
    allocated is the model's own; the timed steps' extra is counted from here."""
    for _ in range(steps):
        s()
    s.resident, s.extra = _allocated(s.device) - start, 0


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def train_stepper(args, cfg: TrainConfig, env: DistEnv) -> Stepper:
    """The trainer's step on a fresh random batch each call, warmed up ``args.warmup`` times."""
    start = _allocated(env.device)
    torch.manual_seed(0)
    trainer = Trainer(cfg, env, data=False)
    gen = torch.Generator().manual_seed(env.rank)
    per_rank = cfg.train.batch_size // env.world_size
    vocab, seq = cfg.model.vocab_size, cfg.data.seq_len

    def run(batch) -> None:
        with memory_stats(trainer.model):  # as in Trainer.fit
            trainer.train_step(batch)

    s = Stepper(
        run, lambda: torch.randint(0, vocab, (per_rank, seq + 1), generator=gen), env.device
    )
    warm_up(s, args.warmup, start)
    return s


def infer_stepper(args, cfg: TrainConfig, device: torch.device, values: str) -> Stepper:
    """Inference in the run's precision, the memories' value tables in ``values`` (bfloat16:
    as ``evaluate value_dtype=bfloat16`` reads them)."""
    start = _allocated(device)
    torch.manual_seed(0)
    model = build_model(cfg.model, device).eval()
    for memory in model.memories.values():
        memory.values.to(getattr(torch, values))
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.batch_size, cfg.data.seq_len)

    @torch.no_grad()
    def run(batch) -> None:
        with autocast(device, cfg.train.precision):
            model(batch)

    vocab = cfg.model.vocab_size
    s = Stepper(run, lambda: torch.randint(0, vocab, shape, generator=gen).to(device), device)
    warm_up(s, args.warmup, start)
    return s


def interleaved(steps: int, steppers: list[Stepper], tokens: int) -> list[dict]:
    """Per stepper: tokens/s of the median step, the spread, the steps' seconds, peak GiB."""
    for _ in range(steps):
        for s in steppers:
            s.seconds.append(s())
    out = []
    for s in steppers:
        median = statistics.median(s.seconds)
        out.append({"tok_s": tokens / median, "spread": spread(s.seconds), "seconds": s.seconds,
                    "peak_gib": s.peak_gib})  # fmt: skip
    return out


def _ddp_worker(rank: int, world: int, port: int, args, cfgs: list[TrainConfig], out) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        env = DistEnv(rank, rank, world, torch.device("cpu"))
        tokens = args.batch * args.seq_len
        speeds = interleaved(args.steps, [train_stepper(args, c, env) for c in cfgs], tokens)
        if rank == 0:
            out.put(speeds)
    finally:
        dist.destroy_process_group()


def ddp_train_speeds(args, cfgs: list[TrainConfig], world: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _ddp_worker, args=(world, port, args, cfgs, out), nprocs=world, start_method="spawn"
    )
    return out.get()


def model_step(experiment: str, overrides: list[str], precision: str, device: torch.device,
               tokens: int, vocab: int = 60_000):  # fmt: skip
    """The trainer's step of ``experiment`` (composed as ``pkm_lm.train`` would) on ``tokens``
    random tokens a step, in sequences of up to 256."""
    import argparse

    from .train_speed import experiment_configs

    seq = min(256, tokens)
    batch = max(1, tokens // seq)
    ns = argparse.Namespace(experiments=[experiment], override=overrides, vocab=vocab,
                            seq_len=seq, batch=batch, micro_batch=None, device=device.type)  # fmt: skip
    ((_, cfg),) = experiment_configs(ns, precision)
    torch.manual_seed(0)
    trainer = Trainer(cfg, DistEnv(0, 0, 1, device), data=False)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        trainer.train_step(torch.randint(0, vocab, (batch, seq + 1), generator=gen))

    return step
