"""The training loop: global batches split over ranks and micro-steps, mixed precision,
two optimisers, periodic evaluation and atomic checkpoints, exact resumption.

``Trainer(cfg, env).fit()`` is all ``python -m pkm_lm.train`` does after parsing;
``Trainer.train_step`` is the one optimizer step that training and the benchmarks run.
Outside logging, evaluation and checkpoint steps the loop reads one number back from the
device per optimizer step: whether the gradients are finite.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from pkm_lm.atomic import atomic_write_text
from pkm_lm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pkm_lm.compile import compile_blocks
from pkm_lm.config import TrainConfig
from pkm_lm.data import TokenStream, load_manifest, open_split
from pkm_lm.distributed import (
    DistEnv,
    SparseGrads,
    all_gather_objects,
    all_reduce_sum,
    sync_query_batchnorms,
    synchronize,
    wrap_ddp,
)
from pkm_lm.errors import invalid
from pkm_lm.evaluate import evaluate_split
from pkm_lm.memory.values import dense_gradient_advised
from pkm_lm.memory_parallel import MemoryParallel, check_memory_parallel
from pkm_lm.metrics import (
    MetricLogger,
    format_eval_line,
    format_train_line,
    memory_stats,
    plot_loss,
    safe_ppl,
    truncate_metrics,
)
from pkm_lm.model import build_model, materialize
from pkm_lm.optim import build_optimizers, clip_gradients
from pkm_lm.precision import autocast, grad_scaler


@dataclass
class StepResult:
    """What one optimizer step gives back; tensors stay on the device until a log reads them."""

    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches (float64)
    grad_norm: torch.Tensor  # global gradient norm before clipping
    skipped: bool  # the update was skipped (non-finite gradients)
    lr: float  # the network's learning rate this step used


class Progress:
    """Step, skipped steps and training seconds, saved with the run as top-level checkpoint
    keys."""

    def __init__(self) -> None:
        self.step = self.skipped_steps = 0
        self.elapsed_s = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.skipped_steps = sd["step"], sd["skipped_steps"]
        self.elapsed_s = sd["elapsed_s"]


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)  # a CPU ByteTensor
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """``data=False`` builds everything but the dataset (``cfg.model.vocab_size`` must be set):
    benchmarks feed ``train_step`` their own batches; ``fit`` needs the data."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        data: bool = True,
        on_model: Callable[[Trainer], None] | None = None,
    ) -> None:
        """``on_model(trainer)`` runs once ``trainer.model`` is built, before the optimisers,
        the resumption and DDP (finetuning loads pretrained weights and freezes parameters
        there)."""
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run_dir)
        t = cfg.train
        # Every check that needs the world size or the data happens before any work.
        self.micro_batch, self.accum_steps = t.micro_steps(env.world_size)
        check_memory_parallel(cfg, env.world_size)
        if data:
            self._check_vocabulary(load_manifest(cfg.data.dir))
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model, "meta")
        self.parallel = None  # value tables split over ranks (distributed.memory_parallel > 1)
        if cfg.distributed.memory_parallel > 1:
            self.parallel = MemoryParallel(cfg.distributed.memory_parallel, env.device)
            self.parallel.split_(self.model)
        materialize(self.model, env.device)
        if on_model is not None:
            on_model(self)
        if env.distributed and cfg.distributed.sync_bn:
            sync_query_batchnorms(self.model.memories)
        self.optim = build_optimizers(self.model, self.model.value_parameters(), cfg.optim)
        self.scaler = grad_scaler(env.device, t.precision)
        self.progress = Progress()
        self.stream = self.valid_tokens = None
        if data:
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
        torch.manual_seed(t.seed + env.rank)  # dropout masks differ across ranks
        if data:
            self._resume()
        sparse = self.model.value_parameters() if cfg.model.memory.sparse_grad else []
        self.sparse_grads = SparseGrads(sparse)
        self.split = ()  # (split tables, their group): the gradient norm sums over the group
        if self.parallel is not None:  # split tables: left out of DDP, averaged by their rule
            self.sparse_grads = self.parallel.grad_sync(cfg.model.memory.sparse_grad)
            sparse, self.split = self.parallel.tables, (self.parallel.tables, self.parallel.group)
        if t.compile:  # in place: parameter names and checkpoints stay the eager model's
            compile_blocks(self.model)
        self.ddp = self.model
        if env.distributed:
            # Synced query BatchNorms already agree across ranks: no buffer broadcast needed.
            self.ddp = wrap_ddp(
                self.model, sparse, env.device, broadcast_buffers=not cfg.distributed.sync_bn
            )
        self.params = list(self.model.parameters())
        self.logger = None

    def _check_vocabulary(self, manifest: dict) -> None:
        model = self.cfg.model
        if model.vocab_size is None:
            model.vocab_size = int(manifest["vocab_size"])
        elif model.vocab_size != manifest["vocab_size"]:
            raise invalid(
                "model.vocab_size",
                model.vocab_size,
                f"data.dir={self.cfg.data.dir} has a vocabulary of {manifest['vocab_size']}; "
                "unset model.vocab_size",
            )

    # -- state ------------------------------------------------------------------------------
    def _stateful(self) -> dict:
        """Everything a checkpoint restores, by its key: the one map save and resume share."""
        return {
            "model": self.model,
            "optim": self.optim,
            "scaler": self.scaler,
            "data": self.stream,
        }

    def load_weights(self, state: dict) -> None:
        """Load a model state dict with whole value tables (a checkpoint's model), into the
        columns this rank holds when tables are split over ranks."""
        if self.parallel is not None:
            self.parallel.split_weights_(state)
        self.model.load_state_dict(state)

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return
        # On the CPU: RNG states must stay there; load_state_dict moves the rest to the device.
        state = load_checkpoint(path, mmap=self.env.device.type != "cpu")
        changes = self.cfg.check_resumable(state["config"], str(path))
        if self.parallel is not None:  # checkpoints hold whole tables
            self.parallel.split_state_(state, self.optim.values)
        for key, part in self._stateful().items():
            if key == "scaler" and not state[key]:
                continue  # trained without fp16 (a disabled scaler saves {}): a fresh scale
            part.load_state_dict(state[key])
        self.optim.apply_settings(self.cfg.optim)  # changed optim.* overrides apply from here
        self.progress.load_state_dict(state)
        if len(state["rng"]) == self.env.world_size:
            _set_rng_state(state["rng"][self.env.rank], self.env.device)
        else:  # resumed on another world size: same data, fresh dropout streams
            step = self.progress.step
            torch.manual_seed(self.cfg.train.seed + self.env.rank + 1_000_003 * step)
        if self.env.is_main:
            print(f"resumed from {path} (step {self.progress.step})", flush=True)
            for change in changes:
                print(f"  changed on resume: {change}", flush=True)

    def _save(self) -> None:
        rng = all_gather_objects(_rng_state(self.env.device))
        whole = self.parallel.whole_tables(self.optim.values) if self.parallel else None
        if not self.env.is_main:
            return
        state = {key: part.state_dict() for key, part in self._stateful().items()}
        if whole is not None:
            self.parallel.put_whole_(state, whole)
        # Progress at the top level: readers of the file (evaluate, export) use "step".
        state.update(self.progress.state_dict())
        state["rng"] = rng
        state["config"] = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        meta = {"tokens": self.tokens, "elapsed_s": self.progress.elapsed_s}
        save_checkpoint(
            self.run_dir, self.progress.step, state, meta, self.cfg.train.keep_checkpoints
        )

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def tokens(self) -> int:
        return self.step * self.cfg.train.batch_size * self.cfg.data.seq_len

    # -- loop -------------------------------------------------------------------------------
    def fit(self) -> None:
        env, t = self.env, self.cfg.train
        if self.step >= t.max_steps:
            if env.is_main:
                print(f"{self.run_dir} already finished (step {self.step})", flush=True)
            return
        if env.is_main:
            self._start_logging()
        loss_acc = torch.zeros(2, dtype=torch.float64, device=env.device)  # [sum loss, steps]
        show = None if env.is_main else True  # None: shown on a terminal only
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", disable=show)
        # Speed counts training steps only: the clock stops for evaluation and checkpoints, and
        # is read only where the loop syncs with the device anyway.
        interval_s, interval_steps = 0.0, 0
        synchronize(env.device)
        mark = time.perf_counter()
        with memory_stats(self.model) as train_stats:
            while self.step < t.max_steps:
                result = self.train_step(self.stream.next_batch())
                loss_acc[0] += result.loss
                loss_acc[1] += 1
                self.progress.skipped_steps += result.skipped
                self.progress.step += 1
                interval_steps += 1
                bar.update(1)
                last = self.step == t.max_steps
                log = self.step % t.log_interval == 0 or last
                evaluate = self.step % t.eval_interval == 0 or last
                save = self.step % t.checkpoint_interval == 0 or last
                if not (log or evaluate or save):
                    continue
                synchronize(env.device)
                seconds = time.perf_counter() - mark
                interval_s += seconds
                self.progress.elapsed_s += seconds
                if log:
                    self._log_train(loss_acc, result, train_stats, interval_s, interval_steps)
                    loss_acc.zero_()
                    interval_s, interval_steps = 0.0, 0
                if evaluate:
                    self._evaluate()
                if save:
                    self._save()
                mark = time.perf_counter()
        bar.close()
        if env.is_main:
            self.logger.close()
            plot = plot_loss(self.run_dir)
            print(f"done: {self.run_dir} (loss plot: {plot})", flush=True)
        if env.distributed:
            # Ranks leave together: a rank tearing down gloo while rank 0 still writes its plot
            # can abort the process ("terminate called without an active exception").
            torch.distributed.barrier()

    def _start_logging(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        truncate_metrics(self.run_dir, self.step)
        self.logger = MetricLogger(
            self.run_dir,
            cfg.logger.kind,
            OmegaConf.to_container(OmegaConf.structured(cfg)),
            cfg.logger.project,
            cfg.logger.mode,
        )
        print(
            f"model: {self.model.param_summary()}, memories at layers "
            f"{cfg.model.memory_layers}; world size {self.env.world_size}, "
            f"{self.accum_steps} micro-step(s) of {self.micro_batch} per rank on "
            f"{self.env.device}"
            + (
                f"; value tables split by columns over {self.parallel.size} ranks (the counts "
                "are this rank's)"
                if self.parallel
                else ""
            ),
            flush=True,
        )
        memory = cfg.model.memory
        reads = self.micro_batch * cfg.data.seq_len * memory.heads * memory.knn
        if (
            cfg.model.memory_layers
            and memory.sparse_grad
            and dense_gradient_advised(reads, memory.n_slots, self.env.device)
        ):
            print(
                f"note: a micro-step reads {reads:,} slots of {memory.n_slots:,}, so the "
                "row-sparse value gradient holds every row: model.memory.sparse_grad=false "
                "optim.value_optimizer=adam is as lean here, with fused Adam (docs/memory.md)",
                flush=True,
            )

    def train_step(self, batch: torch.Tensor) -> StepResult:
        """One optimizer step on this rank's rows of a global batch, (B / world, T + 1) tokens."""
        env, t = self.env, self.cfg.train
        self.ddp.train()
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
            if i > 0:
                self.sparse_grads.compact_()
            loss_sum += loss.detach()
        self.sparse_grads.all_reduce_()
        for opt in self.optim.all:
            self.scaler.unscale_(opt)
        grad_norm = clip_gradients(self.params, self.cfg.optim.clip_norm, *self.split)
        # The step's one host read: every optimizer takes or skips the step together (an fp16
        # overflow in one table's gradients skips all; in fp32/bf16 a non-finite norm means
        # divergence). The gradients are unscaled already, so the optimizers step directly;
        # GradScaler.update backs off the scale from the infs its unscale_ found.
        skipped = not bool(torch.isfinite(grad_norm))
        if not skipped:
            for opt in self.optim.all:
                opt.step()
        self.scaler.update()
        lr = self.optim.base.param_groups[0]["lr"]  # the lr this step used
        self.optim.schedule.step()
        self.optim.zero_grad()
        return StepResult((loss_sum / self.accum_steps).double(), grad_norm, skipped, lr)

    def _log_train(self, loss_acc, last: StepResult, mem_stats, seconds: float, steps: int):
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
            "lr": last.lr,
            "tokens_per_s": tokens_per_s,
            "grad_norm": last.grad_norm.item(),
            "skipped_steps": self.progress.skipped_steps,
            "elapsed_s": self.progress.elapsed_s,
            "memory_usage": usage,
        }
        if self.env.device.type == "cuda":  # the peak since start: what a batch size is sized by
            record["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
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
            lockstep=self.cfg.distributed.memory_parallel,
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
