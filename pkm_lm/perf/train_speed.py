"""Training and inference speed of three models side by side: L layers, L layers + a memory,
and 2L layers (``scripts/bench_train.py``).

    python scripts/bench_train.py [--dim 512 --heads 8 --layers 6 --seq-len 128 --batch 8]
                                  [--n-keys 512] [--steps 6] [--threads 2] [--nproc 1 2]
    python scripts/bench_train.py --preset paper [--override train.compile=true]   # a GPU
    python scripts/bench_train.py --experiments 12L_0mem 12L_1mem 24L_0mem --device cuda \\
        --vocab 60000 --seq-len 256 --batch 32 --precision bf16 fp16 --nproc 1

The models come from the flags (dim, heads, L; the memory replaces the FFN at about 2/3 of the
depth) or, with ``--experiments BASE MEMORY DEEP``, from the experiments' own configs as
``python -m pkm_lm.train +experiment=NAME`` composes them (``--override`` adds Hydra overrides
to all three; --vocab, --seq-len, --batch, --precision and --device are applied as overrides).
``--preset paper`` is the paper's width: 12L_0mem, 12L_1mem, 24L_0mem at dim 1024, a 60k
vocabulary, one GPU's 32 x 256 tokens, bf16 then fp16, inference with fp32 and with bf16 value
tables (``--infer-values``).

Random tokens (speed does not depend on the text). Training runs the trainer's own step,
``Trainer.train_step`` (micro-steps, autocast, GradScaler, gradient sync, clipping, both
optimisers), with the memory usage statistics attached as in ``Trainer.fit``. The three models
take turns step by step, so a change in the machine's load hits them alike; each reports the
tokens/s of its median step and the spread (max - min) / median of its steps. On CUDA the device
is synchronised before every clock read and each model's peak memory is its own: its weights,
gradients and optimizer state plus the largest extra its steps allocated. ``--nproc 2`` also
trains with 2 DDP processes (gloo, CPU only). The ratio lines hold the memory model to its
targets, met only beyond the spread; ``--out DIR`` writes bench_train.md and appends a record
(command, machine, figures) to bench_train.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from pkm_lm import cli
from pkm_lm.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, TrainLoopConfig
from pkm_lm.distributed import DistEnv, resolve_device
from pkm_lm.model import build_model

from .layer_args import Parser
from .machine import describe
from .records import record, save
from .speed_steps import ddp_train_speeds, infer_stepper, interleaved, train_stepper
from .targets import Target, ratio_spread

PAPER = dict(
    experiments=["12L_0mem", "12L_1mem", "24L_0mem"],
    vocab=60_000, seq_len=256, batch=32, precision=["bf16", "fp16"], device="cuda", nproc=[1],
    infer_values=["float32", "bfloat16"],
    steps=20, warmup=5, train_target=0.75, infer_target=1.4,
)  # fmt: skip


def flag_configs(args, precision: str) -> list[tuple[str, TrainConfig]]:
    """(name, config) of L, L + memory and 2L built from the flags."""

    def config(n_layers: int, memory: bool) -> TrainConfig:
        model = ModelConfig(
            n_layers=n_layers, dim=args.dim, n_heads=args.heads, dropout=0.0, attn_dropout=0.0,
            vocab_size=args.vocab, max_seq_len=args.seq_len,
        )  # fmt: skip
        if memory:
            model.memory.n_keys = args.n_keys
            model.memory.layers = [max(1, (n_layers * 2 + 2) // 3)]  # about 2/3 of the depth
        loop = TrainLoopConfig(batch_size=args.batch, micro_batch_size=args.micro_batch,
                               precision=precision, device=args.device)  # fmt: skip
        return TrainConfig(data=DataConfig(seq_len=args.seq_len), model=model,
                           optim=OptimConfig(warmup_steps=1), train=loop)  # fmt: skip

    L = args.layers
    return [
        (f"{L} layers", config(L, False)),
        (f"{L} layers + 1 memory (|K|={args.n_keys}^2)", config(L, True)),
        (f"{2 * L} layers", config(2 * L, False)),
    ]


def experiment_configs(args, precision: str) -> list[tuple[str, TrainConfig]]:
    """(name, config) of each experiment, composed as ``python -m pkm_lm.train`` would."""
    from hydra import compose, initialize_config_dir

    from pkm_lm.config import register_configs, to_train_config

    overrides = [
        f"model.vocab_size={args.vocab}", f"data.seq_len={args.seq_len}",
        f"train.batch_size={args.batch}", f"train.micro_batch_size={args.micro_batch or args.batch}",
        f"train.precision={precision}", f"train.device={args.device}", *args.override,
    ]  # fmt: skip
    register_configs()
    configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    with initialize_config_dir(os.path.abspath(configs), version_base=None):
        return [
            (name, to_train_config(compose("train", [f"+experiment={name}", *overrides])))
            for name in args.experiments
        ]


def _cell(speed: dict) -> str:
    return f"{speed['tok_s']:,.0f} ({speed['spread']:.0%})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _gib(speed: dict) -> str:
    return "-" if speed["peak_gib"] is None else f"{speed['peak_gib']:.2f}"


def bench_precision(args, precision: str, device: torch.device) -> tuple[list[str], dict]:
    """The table and ratio lines of one precision, and its figures."""
    rows = (experiment_configs if args.experiments else flag_configs)(args, precision)
    cfgs = [cfg for _, cfg in rows]
    env = DistEnv(0, 0, 1, device)
    tokens = args.batch * args.seq_len
    train = interleaved(args.steps, [train_stepper(args, c, env) for c in cfgs], tokens)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    infer = {}
    for values in args.infer_values:
        steppers = [infer_stepper(args, c, device, values) for c in cfgs]
        infer[values] = interleaved(args.steps, steppers, tokens)
        del steppers
    extra = [n for n in args.nproc if n > 1]
    ddp = [ddp_train_speeds(args, cfgs, n) for n in extra]
    header = ["model", "params", "train tok/s", *(f"infer tok/s ({v} values)" for v in infer)]
    header += ["peak GiB train", *(f"peak GiB infer ({v})" for v in infer)]
    header += [f"train tok/s ({n} proc)" for n in extra]
    lines = [f"### {precision}", "", _row(header), "|" + "---|" * len(header)]
    for i, (name, cfg) in enumerate(rows):
        n_params = build_model(cfg.model, "meta").num_params()
        cells = [name, f"{n_params / 1e6:.1f}M", _cell(train[i])]
        cells += [_cell(r[i]) for r in infer.values()]
        cells += [_gib(train[i]), *(_gib(r[i]) for r in infer.values())]
        lines.append(_row([*cells, *(_cell(d[i]) for d in ddp)]))
    base, memory, deep = (name for name, _ in rows)
    targets = [
        Target(f"{memory} / {base}, training ({precision})",
               train[1]["tok_s"] / train[0]["tok_s"], args.train_target, True,
               ratio_spread(train[0]["spread"], train[1]["spread"])),
        *(Target(f"{memory} / {deep}, inference ({precision}, {values} values)",
                 r[1]["tok_s"] / r[2]["tok_s"], args.infer_target, True,
                 ratio_spread(r[1]["spread"], r[2]["spread"])) for values, r in infer.items()),
    ]  # fmt: skip
    lines += ["", *(t.line() for t in targets), ""]
    names = [name for name, _ in rows]
    figures = {
        "train": dict(zip(names, train, strict=True)),
        "infer": {v: dict(zip(names, r, strict=True)) for v, r in infer.items()},
        "ddp": {n: dict(zip(names, d, strict=True)) for n, d in zip(extra, ddp, strict=True)},
        "targets": [t.as_dict() for t in targets],
    }
    return lines, figures


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=["paper"], help="the paper's width (see above)")
    p.add_argument("--experiments", nargs=3, metavar=("BASE", "MEMORY", "DEEP"))
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides (--experiments)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=6, help="L (the deep model has 2L)")
    p.add_argument("--n-keys", type=int, default=512, help="|K| = n_keys^2 memory slots")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--micro-batch", type=int, default=None, help="per rank and forward")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32"])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts")
    p.add_argument("--infer-values", nargs="+", choices=["float32", "bfloat16"],
                   default=["float32"], help="value-table dtypes to infer with (float32)")  # fmt: skip
    p.add_argument("--train-target", type=float, default=0.8, help="memory / base, training")
    p.add_argument("--infer-target", type=float, default=1.6, help="memory / deep, inference")
    p.add_argument("--out", help="folder for bench_train.md and bench_train.jsonl")
    args = p.parse_args(argv)
    if args.preset == "paper":
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for key, value in PAPER.items():
            if key not in given:
                setattr(args, key, value)
    for key in ("batch", "seq_len", "vocab", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)}: must be >= 1")
    if args.steps < 2:
        p.error(f"--steps={args.steps}: must be >= 2 (the spread needs two)")
    if args.warmup < 1:
        p.error(f"--warmup={args.warmup}: must be >= 1 (the optimizer state is made there)")
    if args.override and not args.experiments:
        p.error("--override applies to --experiments (or --preset paper) only")
    if any(n > 1 for n in args.nproc) and args.device == "cuda":
        p.error("--nproc > 1 runs gloo processes on the CPU; use --nproc 1 with --device cuda")
    return args


@cli.main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    machine = describe(device)
    lines = [
        machine,
        "",
        f"seq {args.seq_len}, batch {args.batch}, vocab {args.vocab:,}, {device}; {args.steps} "
        f"timed steps after {args.warmup} warm-up, median tok/s (spread = (max - min) / "
        f"median)" + (f"; overrides {' '.join(args.override)}" if args.override else ""),
        "",
    ]
    print("\n".join(lines), flush=True)
    figures = {}
    for precision in args.precision:
        table, figures[precision] = bench_precision(args, precision, device)
        print("\n".join(table), flush=True)
        lines += table
    lines.append(describe(device))
    print(lines[-1])
    if args.out:
        save(args.out, "bench_train", "\n".join(lines),
             record(machine, figures, ["scripts/bench_train.py", *argv]))  # fmt: skip
