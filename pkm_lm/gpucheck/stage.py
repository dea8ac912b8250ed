"""What a stage of the GPU check is, what it returns, and what every stage can see.

Only the standard library is imported here: the check starts on a GPU node before the project's
imports are installed from the wheelhouse.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
STATUSES = ("PASS", "WARN", "FAIL", "SKIP")
TIMEOUT = -999  # return code recorded for a command killed at its stage's deadline
PAPER_VOCAB = 60_000  # the paper's BPE vocabulary, for the paper-width step
OFFLINE = "data/bin/offline"  # the gpu scale's corpus (scripts/sweep.sh --scale gpu)


@dataclass
class Result:
    status: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    details: str = ""  # markdown appended to the summary under the stage's title


@dataclass
class Stage:
    name: str
    title: str
    timeout: float  # seconds for all of the stage's commands together
    log: str  # file in the report that receives the commands' output
    checks: str  # what is verified, for --list and the summary
    groups: Callable[[Context], list[list[list[str]]]]  # sequential groups of parallel commands
    verdict: Callable[[Context, list[int]], Result]  # from the return codes and the files
    optional: bool = False
    missing: Callable[[Context], str | None] = lambda ctx: None  # why it cannot run, if so


@dataclass(frozen=True)
class Sizes:
    """How big each stage runs: the GPU's sizes, or toys that run every stage on a CPU."""

    device: str = "cuda"
    slowdown: float = 1.0  # stage timeouts are multiplied by this
    words: int = 1_000_000  # synthetic text for the tokenizer and the trainings
    spm_vocab: int = 2000
    ids_tokens: int = 2_000_000
    train: tuple[str, ...] = ()  # extra overrides of the fp16/bf16 trainings
    train_eval_every: int = 3  # validations per training
    paper: tuple[str, ...] = ()  # probe paper-step options
    profile: tuple[tuple[str, ...], ...] = (
        ("--preset", "dim512", "--precision", "fp32"),
        ("--preset", "dim512", "--precision", "bf16"),
        ("--preset", "dim512", "--precision", "bf16", "--memory", "sparse_grad=true"),
        ("--preset", "paper", "--precision", "bf16", "--experiment", "12L_1mem"),
    )
    roofline: tuple[tuple[str, ...], ...] = (
        ("--preset", "dim512", "--time", "20", "--measure-peaks"),
        ("--preset", "paper", "--precision", "bf16", "--time", "20"),
    )
    bench_train: tuple[tuple[str, ...], ...] = (
        ("--preset", "paper"),
        ("--device", "cuda", "--seq-len", "256", "--batch", "32", "--steps", "20", "--warmup",
         "5", "--nproc", "1", "--precision", "fp32", "bf16"),
    )  # fmt: skip
    compile: tuple[str, ...] = ("--preset", "paper", "--precision", "bf16")
    bench_memory: tuple[str, ...] = (
        "--device", "cuda", "--batch", "32", "--sizes", "128", "256", "512", "1024",
        "--rounds", "3", "--no-peak",
    )  # fmt: skip
    pytest: tuple[str, ...] = ("-v", "-rfEs", "--durations=8")
    repro: tuple[str, ...] = ("--scale", "gpu", "--parallel", "3")


TOY = Sizes(
    device="cpu",
    slowdown=3.0,  # a CPU, often shared
    words=20_000,
    spm_vocab=300,
    ids_tokens=30_000,
    train=("model.n_layers=2", "model.memory.layers=[2]", "model.dim=64", "model.n_heads=2", "model.memory.n_keys=16",
           "model.memory.knn=8", "model.memory.k_dim=32", "data.seq_len=32",
           "train.batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=5"),
    paper=("--experiment", "tiny/12L_1mem", "--micro-batch", "2", "--seq-len", "16",
           "--steps", "3", "--device", "cpu"),
    profile=(("--preset", "toy", "--device", "cpu", "--steps", "1", "--experiment",
              "tiny/12L_1mem"),),
    roofline=(("--preset", "toy", "--device", "cpu", "--bandwidth", "10", "--tflops", "0.1",
               "--time", "3"),),
    bench_train=(("--experiments", "tiny/12L_0mem", "tiny/12L_1mem", "tiny/24L_0mem",
                  "--device", "cpu", "--vocab", "100", "--seq-len", "16", "--batch", "2",
                  "--steps", "2", "--warmup", "1", "--nproc", "1", "--precision", "bf16"),),
    compile=("--experiments", "tiny/12L_0mem", "tiny/12L_1mem", "tiny/24L_0mem", "--device",
             "cpu", "--vocab", "100", "--seq-len", "16", "--batch", "2", "--steps", "2",
             "--warmup", "1", "--nproc", "1", "--precision", "bf16"),
    bench_memory=("--device", "cpu", "--batch", "1", "--sizes", "32", "--rounds", "2",
                  "--no-peak", "--no-steps", "--variants", "default"),
    pytest=("--collect-only", "-q"),
    repro=("--scale", "tiny", "--parallel", "3"),
)  # fmt: skip


class Context:
    def __init__(self, args: argparse.Namespace, listing: bool = False):
        self.args = args
        self.sizes = TOY if args.dry_run else Sizes()
        if args.work or listing:
            self.work = Path(args.work or "<work>")
        else:
            self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.out: Path | None = Path(args.out) if args.out else None
        self.site = self.work / "site"
        # PYTHON: scripts/sweep.sh runs its trainings with the same interpreter.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "PYTHON": PY}
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(self.site), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        if args.dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run proves the CPU path only
        self.info: dict = {}  # env stage's probe output
        self.group_seconds = 0.0  # wall time of the running stage's commands so far
        self.deadline = time.monotonic() + args.budget

    @property
    def text_data(self) -> Path:
        return Path(self.args.data) if self.args.data else self.work / "data" / "text"

    @property
    def ids_data(self) -> Path:
        return Path(self.args.data) if self.args.data else self.work / "data" / "ids60k"

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name
