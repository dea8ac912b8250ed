"""The training loop: global batches split over ranks and micro-steps, mixed precision,
two optimisers, periodic evaluation and atomic checkpoints, exact resumption.

``Trainer(cfg, env).fit()`` is all ``python -m pkm_lm.train`` does after parsing.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from pkm_lm.atomic import atomic_write_text
from pkm_lm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pkm_lm.config import TrainConfig
from pkm_lm.data import TokenStream, load_manifest, open_split
from pkm_lm.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_sparse_grads_,
    all_reduce_sum,
    sync_query_batchnorms,
)
from pkm_lm.evaluate import attach_memory_stats, autocast, detach_memory_stats, evaluate_split
from pkm_lm.metrics import (
    MetricLogger,
    format_eval_line,
    format_train_line,
    plot_loss,
    safe_ppl,
    truncate_metrics,
)
from pkm_lm.model import build_model
from pkm_lm.optim import build_optimizers, clip_gradients


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run_dir)
        t = cfg.train
        # Every check that needs the world size or the data happens before any work.
        self.micro_batch, self.accum_steps = t.micro_steps(env.world_size)
        manifest = load_manifest(cfg.data.dir)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = int(manifest["vocab_size"])
        elif cfg.model.vocab_size != manifest["vocab_size"]:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} but data.dir={cfg.data.dir} has a "
                f"vocabulary of {manifest['vocab_size']}: unset model.vocab_size"
            )
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model, env.device)
        if env.distributed and cfg.distributed.sync_bn:
            sync_query_batchnorms(self.model.memories)
        self.optim = build_optimizers(self.model, self.model.value_parameters(), cfg.optim)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=t.precision == "fp16")
        self.stream = TokenStream(
            open_split(cfg.data.dir, "train"),
            cfg.data.seq_len,
            t.batch_size,
            env.rank,
            env.world_size,
            seed=t.seed,
            shuffle=cfg.data.shuffle,
        )
        self.valid_tokens = open_split(cfg.data.dir, "valid")
        self.step = 0
        self.skipped_steps = 0
        self.elapsed_s = 0.0
        torch.manual_seed(t.seed + env.rank)  # dropout masks differ across ranks
        self._resume()
        self.sparse_params: list[torch.nn.Parameter] = []
        self.ddp = self._wrap_ddp() if env.distributed else self.model
        self.logger = None

    def _wrap_ddp(self) -> DDP:
        """DDP for the dense parameters. Sparse value gradients are left out of it and averaged
        by ``all_reduce_sparse_grads_`` after the last micro-step: NCCL cannot all-reduce
        sparse tensors, and one path for every backend is one path tested."""
        self.sparse_params = [p for p in self.model.value_parameters() if self._sparse(p)]
        sparse_ids = {id(p) for p in self.sparse_params}
        ignored = [n for n, p in self.model.named_parameters() if id(p) in sparse_ids]
        DDP._set_params_and_buffers_to_ignore_for_model(self.model, ignored)
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DDP(self.model, device_ids=device_ids)

    def _sparse(self, param: torch.nn.Parameter) -> bool:
        return any(
            mem.values.weight is param and mem.config.sparse_grad
            for mem in self.model.memories.values()
        )

    # -- state ------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return
        state = load_checkpoint(path, map_location=self.env.device)
        self._check_same_run(state["config"], path)
        self.model.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["data"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.elapsed_s = state["elapsed_s"]
        if len(state["rng"]) == self.env.world_size:
            _set_rng_state(state["rng"][self.env.rank], self.env.device)
        else:  # resumed on another world size: same data, fresh dropout streams
            torch.manual_seed(self.cfg.train.seed + self.env.rank + 1_000_003 * self.step)
        if self.env.is_main:
            print(f"resumed from {path} (step {self.step})", flush=True)

    def _check_same_run(self, saved: dict, path: Path) -> None:
        """Refuse to resume a run under settings that change what it trains (the intervals,
        max_steps, logger and data.dir may change)."""
        now = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        fields = [("model", k) for k in now["model"]] + [
            ("data", "seq_len"),
            ("data", "shuffle"),
            ("train", "batch_size"),
            ("train", "seed"),
        ]
        changed = [
            f"{group}.{key}: {saved[group][key]!r} -> {now[group][key]!r}"
            for group, key in fields
            if saved[group][key] != now[group][key]
        ]
        if changed:
            raise ValueError(
                f"cannot resume {path}: it was trained with other settings ({'; '.join(changed)}); "
                "use another run_dir or the original settings"
            )

    def _save(self) -> None:
        rng = all_gather_objects(_rng_state(self.env.device))
        if not self.env.is_main:
            return
        state = {
            "model": self.model.state_dict(),
            "optim": self.optim.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.stream.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "elapsed_s": self.elapsed_s,
            "rng": rng,
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
        }
        meta = {"tokens": self.tokens, "elapsed_s": self.elapsed_s}
        save_checkpoint(self.run_dir, self.step, state, meta, self.cfg.train.keep_checkpoints)

    @property
    def tokens(self) -> int:
        return self.step * self.cfg.train.batch_size * self.cfg.data.seq_len

    # -- loop -------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg, env, t = self.cfg, self.env, self.cfg.train
        if self.step >= t.max_steps:
            if env.is_main:
                print(f"{self.run_dir} already finished (step {self.step})", flush=True)
            return
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg))
            truncate_metrics(self.run_dir, self.step)
            self.logger = MetricLogger(
                self.run_dir,
                cfg.logger.kind,
                OmegaConf.to_container(OmegaConf.structured(cfg)),
                cfg.logger.project,
                cfg.logger.mode,
            )
            n = self.model.num_params()
            print(
                f"model: {n:,} parameters ({sum(p.numel() for p in self.model.value_parameters()):,} "
                f"in memory values), memories at layers {cfg.model.memory_layers}; "
                f"world size {env.world_size}, {self.accum_steps} micro-step(s) of "
                f"{self.micro_batch} per rank",
                flush=True,
            )
        params = list(self.model.parameters())
        loss_acc = torch.zeros(2, dtype=torch.float64, device=env.device)  # [sum loss, steps]
        mem_stats = attach_memory_stats(self.model)
        # Speed counts training steps only: evaluation and checkpoint time is excluded.
        interval_s, interval_steps = 0.0, 0
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            desc="train",
            disable=None if env.is_main else True,
        )
        while self.step < t.max_steps:
            step_start = time.perf_counter()
            loss_acc[0] += self._train_step(params)
            loss_acc[1] += 1
            self.step += 1
            step_s = time.perf_counter() - step_start
            interval_s += step_s
            interval_steps += 1
            self.elapsed_s += step_s
            bar.update(1)
            last = self.step == t.max_steps
            if self.step % t.log_interval == 0 or last:
                self._log_train(loss_acc, mem_stats, interval_s, interval_steps)
                loss_acc.zero_()
                interval_s, interval_steps = 0.0, 0
            if self.step % t.eval_interval == 0 or last:
                detach_memory_stats(self.model)
                self._evaluate()
                mem_stats = attach_memory_stats(self.model)
            if self.step % t.checkpoint_interval == 0 or last:
                self._save()
        bar.close()
        detach_memory_stats(self.model)
        if env.is_main:
            self.logger.close()
            plot = plot_loss(self.run_dir)
            print(f"done: {self.run_dir} (loss plot: {plot})", flush=True)
        if env.distributed:
            # Ranks leave together: a rank tearing down gloo while rank 0 still writes its plot
            # can abort the process ("terminate called without an active exception").
            torch.distributed.barrier()

    def _train_step(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """One optimizer step on the next global batch; returns this rank's mean loss."""
        env, t = self.env, self.cfg.train
        self.ddp.train()
        batch = self.stream.next_batch()  # (B / world, T + 1): this rank's rows
        loss_sum = torch.zeros((), device=env.device)
        for i, micro in enumerate(batch.split(self.micro_batch)):
            micro = micro.to(env.device, non_blocking=True)
            x, y = micro[:, :-1], micro[:, 1:]
            # Gradients are all-reduced only on the last micro-step.
            sync = i == self.accum_steps - 1 or not env.distributed
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with autocast(env.device, t.precision):
                    logits = self.ddp(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                self.scaler.scale(loss / self.accum_steps).backward()
            loss_sum += loss.detach()
        all_reduce_sparse_grads_(self.sparse_params)
        for opt in self.optim.all:
            self.scaler.unscale_(opt)
        # Gradients are identical on all ranks after the all-reduce, so every rank takes the
        # same decision here and all skip the same fp16 overflow steps.
        grad_norm = clip_gradients(params, self.cfg.optim.clip_norm)
        self.grad_norm = grad_norm.item()
        if torch.isfinite(grad_norm):
            for opt in self.optim.all:
                self.scaler.step(opt)
        else:
            self.skipped_steps += 1
        self.scaler.update()
        self.lr = self.optim.base.param_groups[0]["lr"]  # the lr this step used
        self.optim.schedule.step()
        self.optim.zero_grad()
        return (loss_sum / self.accum_steps).double()

    def _log_train(self, loss_acc, mem_stats, seconds: float, steps: int) -> None:
        t = self.cfg.train
        all_reduce_sum(loss_acc)
        usage = {}
        for layer, s in mem_stats.items():
            s.all_reduce()
            usage[str(layer)] = s.compute()["usage"]
            s.reset()
        if not self.env.is_main:
            return
        loss = (loss_acc[0] / loss_acc[1]).item()
        tokens_per_s = steps * t.batch_size * self.cfg.data.seq_len / max(seconds, 1e-9)
        record = {
            "kind": "train",
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss,
            "ppl": safe_ppl(loss),
            "lr": self.lr,
            "tokens_per_s": tokens_per_s,
            "grad_norm": self.grad_norm,
            "skipped_steps": self.skipped_steps,
            "elapsed_s": self.elapsed_s,
            "memory_usage": usage,
        }
        eta = (t.max_steps - self.step) * seconds / max(steps, 1)
        mem = "".join(f" | mem{k} usage {u:.1f}%" for k, u in usage.items())
        self.logger.log(record, format_train_line(record, t.max_steps, eta, mem))

    def _evaluate(self) -> None:
        t = self.cfg.train
        result = evaluate_split(
            self.model,
            self.valid_tokens,
            self.cfg.data.seq_len,
            t.eval_batch_size or self.micro_batch,
            self.env,
            t.precision,
            "valid",
        )
        if self.env.is_main:
            record = {
                "kind": "eval",
                "step": self.step,
                "tokens": self.tokens,
                "split": "valid",
                **result,
            }
            self.logger.log(record, format_eval_line(record))
