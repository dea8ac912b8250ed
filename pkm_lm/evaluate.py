"""Perplexity, memory usage/KL and inference speed over a whole split.

    python -m pkm_lm.evaluate run_dir=runs/demo_1mem split=test

prints the result and appends an ``{"kind": "eval", ...}`` record to ``run_dir/metrics.jsonl``.
``evaluate_split`` is the same pass the trainer runs on the validation split.
"""

from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pkm_lm import cli
from pkm_lm.checkpoint import load_run, read_run_config
from pkm_lm.config import EvaluateConfig, register_configs
from pkm_lm.data import eval_batches, open_split
from pkm_lm.distributed import (
    DistEnv,
    all_reduce_sum,
    cleanup_distributed,
    init_distributed,
    synchronize,
)
from pkm_lm.metrics import MetricLogger, format_eval_line, memory_stats, safe_ppl
from pkm_lm.model import TransformerLM
from pkm_lm.precision import autocast

register_configs()


@torch.no_grad()
def evaluate_split(
    model: TransformerLM,
    tokens,
    seq_len: int,
    batch_size: int,
    env: DistEnv,
    precision: str,
    desc: str = "eval",
    lockstep: int = 1,
) -> dict:
    """One pass over ``tokens`` split across ranks: loss, ppl, tokens/s and memory metrics.

    ``lockstep``: the ranks of each group of this many consecutive ranks run the same number of
    forwards (a value table split over them is read by all of them together): those with fewer
    batches run empty ones.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=env.device)  # [sum loss, n targets]
    # Speed is timed from the second batch on: the first pays one-off allocation costs.
    timed_tokens, start = 0, None
    n_batches = math.ceil(max(len(tokens) - 1, 0) / seq_len / batch_size)
    batches = eval_batches(tokens, seq_len, batch_size, env.rank, env.world_size)
    if lockstep > 1:
        first = env.rank - env.rank % lockstep  # the group's first rank gets the most batches
        n_targets = max(len(tokens) - 1, 0)  # eval_batches' batches: full chunks, then the rest
        total = -(-(n_targets // seq_len) // batch_size) + int(n_targets % seq_len > 0)
        empty = torch.empty(0, seq_len + 1, dtype=torch.long)
        batches = itertools.islice(
            itertools.chain(batches, itertools.repeat(empty)),
            len(range(first, total, env.world_size)),
        )
    show = None if env.is_main else True
    with memory_stats(model) as stats:
        for batch in tqdm(
            batches, desc=desc, total=n_batches // env.world_size, leave=False, disable=show
        ):
            batch = batch.to(env.device, non_blocking=True)
            x, y = batch[:, :-1], batch[:, 1:]
            with autocast(env.device, precision):
                logits = model(x)
            loss_sum[0] += F.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), reduction="sum"
            ).double()
            loss_sum[1] += y.numel()
            if start is None:
                synchronize(env.device)  # the clock starts when the first batch is done
                start = time.perf_counter()
            else:
                timed_tokens += y.numel()
        synchronize(env.device)
        elapsed = time.perf_counter() - start if start is not None else 0.0
    speed = torch.tensor([timed_tokens, elapsed], dtype=torch.float64, device=env.device)
    all_reduce_sum(loss_sum)
    all_reduce_sum(speed)
    memory = {}
    for layer, s in stats.items():
        s.all_reduce()
        memory[str(layer)] = s.compute()
    model.train(was_training)
    loss = (loss_sum[0] / loss_sum[1].clamp_min(1)).item()
    return {
        "loss": loss,
        "ppl": safe_ppl(loss),
        "n_tokens": int(loss_sum[1].item()),
        # tokens of all ranks over the mean time of a rank
        "tokens_per_s": speed[0].item() / max(speed[1].item() / env.world_size, 1e-9),
        "memory": memory,
    }


@cli.hydra_main("evaluate")
def main(dcfg: DictConfig) -> None:
    ecfg: EvaluateConfig = OmegaConf.to_object(dcfg)
    run_cfg = read_run_config(ecfg.run_dir)
    env = init_distributed(device=ecfg.device or run_cfg.train.device)
    try:
        model, cfg, state = load_run(
            ecfg.run_dir, env.device, ecfg.checkpoint, getattr(torch, ecfg.value_dtype)
        )
        tokens = open_split(cfg.data.dir, ecfg.split)
        micro, _ = cfg.train.micro_steps(1)
        batch_size = ecfg.batch_size or cfg.train.eval_batch_size or micro
        result = evaluate_split(
            model, tokens, cfg.data.seq_len, batch_size, env, cfg.train.precision, ecfg.split
        )
        if env.is_main:
            step = state["step"]
            record = {
                "kind": "eval",
                "step": step,
                "tokens": step * cfg.train.batch_size * cfg.data.seq_len,
                "split": ecfg.split,
                **result,
            }
            MetricLogger(ecfg.run_dir).log(record, format_eval_line(record))
        if env.distributed:
            torch.distributed.barrier()  # leave together (see Trainer.fit)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
