"""Command-line options shared by the layer's profile and roofline scripts: the shapes (a
preset, each field overridable), the device, the precision and MemoryConfig overrides.

User errors end as one line, ``error: ...``, with exit status 2 (``Parser.error``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from .roofline import LayerShapes

PRESETS = {
    # the first H200 run's layer: dim 512, 32 x 256 tokens, |K| = 512^2
    "dim512": LayerShapes(dim=512, tokens=8192),
    # the paper's width: dim 1024, one GPU's 32 x 256 tokens, |K| = 512^2
    "paper": LayerShapes(dim=1024, tokens=8192),
    # a few milliseconds on a CPU: tests and --dry-run
    "toy": LayerShapes(dim=32, tokens=64, heads=2, knn=4, k_dim=16, n_keys=8),
}
SHAPE_FIELDS = ("dim", "tokens", "heads", "knn", "k_dim", "n_keys")


class Parser(argparse.ArgumentParser):
    """argparse with the project's user-error convention: one line, exit status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def add_layer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="dim512", help="shapes")
    for name in SHAPE_FIELDS:
        p.add_argument(
            f"--{name.replace('_', '-')}", type=int, help=f"override the preset's {name}"
        )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument(
        "--memory",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="MemoryConfig fields, e.g. sparse_grad=true kernel=torch",
    )


def layer_shapes(args: argparse.Namespace, p: argparse.ArgumentParser) -> LayerShapes:
    """The preset with the given fields replaced; the activations follow --precision."""
    changes = {f: getattr(args, f) for f in SHAPE_FIELDS if getattr(args, f) is not None}
    bad = [f"--{f.replace('_', '-')}={v}" for f, v in changes.items() if v < 1]
    if bad:
        p.error(f"{', '.join(bad)}: must be >= 1")
    act = "fp32" if args.precision == "fp32" else args.precision
    return dataclasses.replace(PRESETS[args.preset], activations=act, **changes)


def check_device(args: argparse.Namespace, p: argparse.ArgumentParser) -> torch.device:
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device={args.device!r}: not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device={args.device}: CUDA is not available here")
    return device
