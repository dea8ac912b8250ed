"""The command lines of each stage of the GPU check, as sequential groups of parallel commands.

Every stage runs the project's real entry points in subprocesses under the Python that runs the
check; their sizes come from ``ctx.sizes`` (the GPU's, or the dry run's toys on a CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

from .stage import OFFLINE, PAPER_VOCAB, PY, ROOT, Context

Groups = list[list[list[str]]]
COMPILE = "train.compile=true"


def probe(*args: str) -> list[str]:
    return [PY, "-m", "pkm_lm.gpucheck.probe", *args]


def script(name: str, *args: str) -> list[str]:
    return [PY, f"scripts/{name}", *args]


def train_cmd(ctx: Context, name: str, precision: str) -> list[str]:
    """6 layers, dim 512, one memory of 128^2 slots replacing the FFN of layer 4 (the memory
    defaults), 300 steps of 32 x 256 tokens. 128^2, not the paper's 512^2: the ~26k validation
    tokens (3.3M reads) could not reach half of 262k slots."""
    steps = ctx.args.train_steps
    return [
        PY, "-m", "pkm_lm.train", f"run_dir={ctx.run_dir(name)}", f"data.dir={ctx.text_data}",
        f"train.device={ctx.sizes.device}", f"train.precision={precision}", "model.n_layers=6",
        "model.memory.layers=[4]", "model.memory.n_keys=128", "data.seq_len=256",
        "train.batch_size=32", f"train.max_steps={steps}", "train.log_interval=25",
        f"train.eval_interval={steps // ctx.sizes.train_eval_every}",
        f"train.checkpoint_interval={steps}", "train.keep_checkpoints=1",
        "optim.lr=5e-4", "optim.warmup_steps=50", *ctx.sizes.train,
    ]  # fmt: skip


def env_groups(ctx: Context) -> Groups:
    return [[probe("env", "--wheelhouse", ctx.args.wheelhouse, "--target", str(ctx.site),
                   "--json", str(ctx.work / "env.json"), "--device", ctx.sizes.device)]]  # fmt: skip


def data_groups(ctx: Context) -> Groups:
    if ctx.args.data:
        return [[probe("check-data", str(ctx.args.data))]]
    s, raw = ctx.sizes, ctx.work / "data" / "raw"
    text = [PY, "-m", "pkm_lm.data.synthetic", "text", "--out", str(raw), "--words", str(s.words)]
    preprocess = [PY, "-m", "pkm_lm.preprocess", f"raw_dir={raw}", f"out_dir={ctx.text_data}"]
    preprocess += [
        "tokenizer=sentencepiece",
        f"sentencepiece.vocab_size={s.spm_vocab}",
        "workers=0",
    ]
    ids = [PY, "-m", "pkm_lm.data.synthetic", "ids", "--out", str(ctx.ids_data)]
    ids += ["--vocab", str(PAPER_VOCAB), "--tokens", str(s.ids_tokens)]
    return [[text], [preprocess, ids]]


def train_groups(ctx: Context) -> Groups:
    bf16 = ctx.run_dir("bf16")
    evaluate = [PY, "-m", "pkm_lm.evaluate", f"run_dir={bf16}", "split=test"]
    generate = [PY, "-m", "pkm_lm.generate", f"run_dir={bf16}", "prompt=Ba vedu"]
    generate += ["max_new_tokens=40", "num_samples=2"]
    return [[train_cmd(ctx, "fp16", "fp16"), train_cmd(ctx, "bf16", "bf16")], [evaluate, generate]]


def paper_groups(ctx: Context) -> Groups:
    """The measured step, then scripts/comm_cost.py's estimate for the same model on one rank
    (parameters, gradients and optimizer state: everything but activations)."""
    step = probe("paper-step", "--run-dir", str(ctx.run_dir("paper")), "--data")
    step += [str(ctx.ids_data), "--json", str(ctx.work / "paper.json"), *ctx.sizes.paper]
    vocab = PAPER_VOCAB
    if ctx.args.data:
        vocab = json.loads((Path(ctx.args.data) / "dataset.json").read_text())["vocab_size"]
    estimate = script("comm_cost.py", "--experiments", "12L_1mem", "--world", "1")
    return [[step], [[*estimate, "--vocab", str(vocab)]]]


def _each(ctx: Context, name: str, runs) -> Groups:
    """One group per run of ``scripts/name``, each writing its table and record to the report."""
    return [[script(name, *run, "--out", str(ctx.out or "<out>"))] for run in runs]


def profile_groups(ctx: Context) -> Groups:
    return _each(ctx, "profile_memory.py", ctx.sizes.profile)


def roofline_groups(ctx: Context) -> Groups:
    return _each(ctx, "roofline.py", ctx.sizes.roofline)


def bench_train_groups(ctx: Context) -> Groups:
    """The paper's width (bf16, fp16), then dim 512 (fp32, bf16: the first GPU run's shapes)."""
    return _each(ctx, "bench_train.py", ctx.sizes.bench_train)


def compile_groups(ctx: Context) -> Groups:
    """The paper's width in bf16 with ``train.compile=true``: what torch.compile buys."""
    return _each(ctx, "bench_train.py", [(*ctx.sizes.compile, "--override", COMPILE)])


def bench_memory_groups(ctx: Context) -> Groups:
    """Every |K| from 128^2 to 1024^2 at 8,192 tokens, 3 rounds, against lucidrains' layer."""
    return _each(ctx, "bench_memory.py", [ctx.sizes.bench_memory])


def pytest_groups(ctx: Context) -> Groups:
    return [[[PY, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", *ctx.sizes.pytest,
              "tests"]]]  # fmt: skip


def repro_groups(ctx: Context) -> Groups:
    """The gpu scale's headline (12L + 1 memory vs 12L vs 24L, one seed) on its own corpus
    (data/bin/offline, made where fastBPE is); the dry run: the tiny scale's, 2 steps each."""
    sweep = ["bash", "scripts/sweep.sh", "headline", *ctx.sizes.repro]
    sweep += ["--runs", str(ctx.work / "sweep"), "--out", str(ctx.work / "sweep_out")]
    if ctx.args.dry_run:
        sweep += ["--data", str(ctx.text_data), "--", "train.max_steps=2",
                  "train.eval_interval=2", "train.checkpoint_interval=2", "train.device=cpu"]  # fmt: skip
    return [[sweep]]


def repro_missing(ctx: Context) -> str | None:
    if ctx.args.dry_run or (ROOT / OFFLINE / "dataset.json").is_file():
        return None
    return f"{OFFLINE} not found: preprocess it where fastBPE is and carry it here"
