"""The command lines of ``scripts/profile_memory.py`` and ``scripts/roofline.py``: wiring of
the layer step, the profiler regions, the roofline and the records; importable, so tests run
them in-process."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pkm_lm import cli

from . import layer_args, profile
from .devices import device_peaks, measure_peaks
from .layer_step import build_step, parse_overrides, time_calls
from .machine import describe
from .records import record, save
from .roofline import describe as describe_shapes
from .roofline import roofline, table
from .speed_steps import model_step
from .targets import Target

PROFILE_MAIN_DOC = """Profile one memory layer: a training step (forward, backward, clip,
optimizer) and an inference forward under torch.profiler, by region (query, select, value_read, their backward,
clip, optimizer, rest), with the top kernels on a GPU.

    python scripts/profile_memory.py --preset dim512 --precision bf16      # a GPU
    python scripts/profile_memory.py --preset paper --memory sparse_grad=true
    python scripts/profile_memory.py --preset toy --device cpu             # ops per region
    python scripts/profile_memory.py --preset paper --experiment 12L_1mem  # + a model's step

Prints the machine, then Markdown tables; ``--out DIR`` also writes them to DIR/profile.md
and appends a record (command, machine, figures) to DIR/profile.jsonl. No trace is written.
"""
ROOFLINE_MAIN_DOC = """The memory layer's roofline floor (bytes moved and FLOPs per phase, from the
real shapes), beside its measured forward and training step when given or timed.

    python scripts/roofline.py --preset dim512 --device cuda --time 20 --measure-peaks
    python scripts/roofline.py --preset paper --gather bf16 --matmul tf32     # floors only
    python scripts/roofline.py --gpu H200 --preset paper                      # on any machine
    python scripts/roofline.py --device cpu --bandwidth 20 --tflops 0.5 --step-ms 900

The peaks come from a table of known GPUs (the device's name, or --gpu), or --bandwidth (GB/s) and
--tflops (TFLOP/s); --measure-peaks adds a second table against what this device reaches
(a 1 GiB copy, an 8192^3 matmul). The verdict lines hold the measured times to --target x the
datasheet floor (met only beyond the measured spread). ``--out DIR`` writes roofline.md and
appends a record (command, machine, figures) to roofline.jsonl.
"""


@cli.main
def profile_main(argv: list[str] | None = None) -> None:
    """scripts/profile_memory.py: see PROFILE_MAIN_DOC."""
    p = layer_args.Parser(
        description=PROFILE_MAIN_DOC, formatter_class=argparse.RawTextHelpFormatter
    )
    layer_args.add_layer_args(p)
    p.add_argument("--steps", type=int, default=3, help="profiled calls of each (3)")
    p.add_argument("--kernels", type=int, default=15, help="top kernels listed (15)")
    p.add_argument("--out", help="folder for profile.md and profile.jsonl")
    p.add_argument("--experiment", help="also a whole training step of this experiment "
                   "(e.g. 12L_1mem) on as many tokens")  # fmt: skip
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides (--experiment)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps={args.steps}: must be >= 1")
    shapes = layer_args.layer_shapes(args, p)
    device = layer_args.check_device(args, p)
    step = build_step(shapes, device, args.precision, parse_overrides(args.memory))
    machine = describe(device)
    on_device = device.type == "cuda"
    cfg = step.layer.config
    lines = [
        machine,
        "",
        f"dim {shapes.dim}, {shapes.tokens:,} tokens, {cfg.heads} heads x knn {cfg.knn}, "
        f"k_dim {cfg.k_dim}, |K| = {cfg.n_keys}^2, {args.precision}, sparse_grad "
        f"{cfg.sparse_grad}, kernel {cfg.kernel}, extra {args.memory or 'none'}; per call, "
        f"mean of {args.steps} profiled calls after 2 unprofiled",
    ]
    figures = {"shapes": vars(shapes), "precision": args.precision, "memory": args.memory}
    calls = [("training step", step.train_step), ("forward", step.forward)]
    if args.experiment:  # its clip and optimizer count as rest: the trainer names no regions
        fn = model_step(args.experiment, args.override, args.precision, device, shapes.tokens)
        calls.append((f"{args.experiment} training step", fn))
    for name, fn in calls:
        events = profile.profile_events(fn, device, steps=args.steps)
        stats = profile.attribute(events)
        lines += ["", f"### {name}", "", profile.region_table(stats, args.steps, on_device)]
        kernels = profile.top_kernels(events, args.kernels) if on_device else []
        if kernels:
            lines += ["", f"Top kernels ({name})", ""]
            lines.append(profile.kernel_table(kernels, args.steps))
        figures[name] = {
            "regions": {r: vars(s) for r, s in stats.items()},
            "top_kernels": kernels,
            "steps": args.steps,
        }
    text = "\n".join(lines)
    print(text)
    if args.out:
        rec = record(machine, figures, ["scripts/profile_memory.py", *argv])
        save(args.out, "profile", text, rec)


@cli.main
def roofline_main(argv: list[str] | None = None) -> None:
    """scripts/roofline.py: see ROOFLINE_MAIN_DOC."""
    p = layer_args.Parser(
        description=ROOFLINE_MAIN_DOC, formatter_class=argparse.RawTextHelpFormatter
    )
    layer_args.add_layer_args(p)
    p.add_argument("--gather", choices=["fp32", "bf16"], help="table copy the forward reads")
    p.add_argument("--matmul", choices=["fp32", "tf32", "bf16"], default="fp32",
                   help="precision of the query and score matmuls (fp32: TF32 off)")  # fmt: skip
    p.add_argument("--gpu", help="the peaks of this known GPU (e.g. H200), without one here")
    p.add_argument("--bandwidth", type=float, help="GB/s (overrides the table)")
    p.add_argument("--tflops", type=float, help="TFLOP/s of every matmul precision")
    p.add_argument("--measure-peaks", action="store_true", help="also against measured peaks")
    p.add_argument("--time", type=int, default=0, metavar="N", help="time N calls of each")
    p.add_argument("--forward-ms", type=float, help="a measured forward to compare")
    p.add_argument("--step-ms", type=float, help="a measured training step to compare")
    p.add_argument("--target", type=float, default=1.5, help="measured / floor goal (1.5)")
    p.add_argument("--out", help="folder for roofline.md and roofline.jsonl")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    for flag in ("bandwidth", "tflops", "forward_ms", "step_ms"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            p.error(f"--{flag.replace('_', '-')}={value}: must be > 0")
    if args.time == 1 or args.time < 0 or (args.time and (args.forward_ms or args.step_ms)):
        p.error(
            f"--time={args.time}: 0 or a count >= 2 (the spread needs two), and not with "
            "--forward-ms/--step-ms"
        )
    device = layer_args.check_device(args, p)
    shapes = layer_args.layer_shapes(args, p)
    shapes = dataclasses.replace(shapes, gather=args.gather, matmul=args.matmul)
    peaks = device_peaks(device, args.bandwidth, args.tflops, args.gpu)
    overrides = parse_overrides(args.memory)

    measured, spreads, timings = {}, {}, {}
    if args.forward_ms:
        measured["forward"], spreads["forward"] = args.forward_ms / 1e3, 0.0
    if args.step_ms:
        measured["training step"], spreads["training step"] = args.step_ms / 1e3, 0.0
    if args.time:
        step = build_step(shapes, device, args.precision, overrides)
        for name, fn in (("forward", step.forward), ("training step", step.train_step)):
            t = time_calls(fn, device, args.time)
            measured[name], spreads[name], timings[name] = t.median, t.spread, t.as_dict()
    machine = describe(device)
    r = roofline(shapes, peaks)
    lines = [machine, "", describe_shapes(r), "", table(r, measured)]
    if args.measure_peaks:
        reached = roofline(shapes, measure_peaks(device))
        lines += ["", describe_shapes(reached), "", table(reached, measured)]
    targets = [
        Target(f"{name} / floor", t / r.seconds(phases), args.target, False, spreads[name])
        for name, phases in (("forward", r.forward), ("training step", r.training))
        if (t := measured.get(name))
    ]
    if targets:
        lines += [""] + [t.line() for t in targets]
    text = "\n".join(lines)
    print(text)
    if args.out:
        figures = {
            "shapes": dataclasses.asdict(shapes),
            "peaks": dataclasses.asdict(peaks),
            "floor_s": {"forward": r.seconds(r.forward), "training step": r.seconds(r.training)},
            "measured": timings or measured,
            "targets": [t.as_dict() for t in targets],
            "memory": args.memory,
            "precision": args.precision,
        }
        rec = record(machine, figures, ["scripts/roofline.py", *argv])
        save(args.out, "roofline", text, rec)
