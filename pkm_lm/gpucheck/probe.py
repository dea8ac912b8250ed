"""The torch side of `scripts/gpu_check.sh`: each subcommand runs in its own process.

    python -m pkm_lm.gpucheck.probe env --wheelhouse wheelhouse --target DIR --json FILE
    python -m pkm_lm.gpucheck.probe check-data DIR
    python -m pkm_lm.gpucheck.probe paper-step --data DIR --run-dir DIR --json FILE [--steps N]

``env`` installs the wheels of whatever the project needs and this Python lacks (pip
--no-index --no-deps into a throwaway --target that gpu_check puts on PYTHONPATH), then records
the GPU and the versions. ``paper-step`` runs the real trainer command line in this process
(12L_1mem at paper width, one GPU's micro-batch of 32 x 256 tokens) so that the peak GPU memory
can be read when it returns. ``--device cpu`` (the check's --dry-run) records the CPU instead of
a GPU and runs the step on it, at the sizes given.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Imports the project needs besides torch -> the distribution that provides each.
# product_key_memory is the reference layer of scripts/bench_memory.py.
NEEDED = {
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime",
    "yaml": "PyYAML",
    "sacremoses": "sacremoses",
    "sentencepiece": "sentencepiece",
    "numpy": "numpy",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "pytest": "pytest",
    "product_key_memory": "product-key-memory",
}


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def _importable(module: str) -> str | None:
    """The module's distribution version (or "?"), None when it cannot be imported."""
    try:
        importlib.import_module(module)
    except Exception:
        return None
    try:
        return metadata.version(NEEDED[module])
    except metadata.PackageNotFoundError:
        return "?"


def install_missing(wheelhouse: Path, target: Path) -> list[str]:
    """Install every wheel of the wheelhouse whose distribution this Python lacks."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing:
        return []
    wheels = sorted(wheelhouse.glob("*.whl")) if wheelhouse.is_dir() else []
    if not wheels:
        print(
            f"error: {', '.join(NEEDED[m] for m in missing)} not importable and no wheels in "
            f"{wheelhouse}: run `make wheelhouse` where there is a network and carry it here",
            file=sys.stderr,
        )
        raise SystemExit(2)
    todo = [w for w in wheels if not _installed(w.name.split("-")[0])]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--disable-pip-version-check", "--target", str(target)]
    print("$", " ".join(cmd), f"<{len(todo)} wheels>", flush=True)
    subprocess.run([*cmd, *map(str, todo)], check=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return [w.name.split("-")[0] for w in todo]


def _driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = subprocess.run(
        [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def _gpu_info(device: str) -> dict:
    import torch

    if device == "cpu":  # the dry run: no GPU fields to fill
        keys = ("gpu", "memory_gib", "capability", "driver", "nccl")
        return {**dict.fromkeys(keys), "count": 0, "bf16": True}
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "count": torch.cuda.device_count(),
        "memory_gib": props.total_memory / 2**30,
        "capability": f"{props.major}.{props.minor}",
        "driver": _driver(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "bf16": torch.cuda.is_bf16_supported(),
    }


def env(args: argparse.Namespace) -> None:
    installed = install_missing(Path(args.wheelhouse), Path(args.target))
    import torch

    info = {
        **_gpu_info(args.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "installed": installed,
        "imports": {m: _importable(m) for m in NEEDED},
    }
    try:
        info["triton"] = metadata.version("triton")
    except metadata.PackageNotFoundError:
        info["triton"] = None
    text = json.dumps(info, indent=2)
    print(text)
    Path(args.json).write_text(text + "\n")


def check_data(args: argparse.Namespace) -> None:
    from pkm_lm.data import load_manifest, open_split

    manifest = load_manifest(args.dir)
    for split in manifest["splits"]:
        print(f"{split}: {len(open_split(args.dir, split, verify=True)):,} tokens (checksums ok)")


def paper_step(args: argparse.Namespace) -> None:
    """Runs the real command line (a subprocess: Hydra finds its configs as under `python -m`);
    the trainer's own log records give the speed and the peak GPU memory."""
    import torch

    from pkm_lm.metrics import read_metrics

    micro, seq_len = args.micro_batch, args.seq_len
    cmd = [
        sys.executable, "-m", "pkm_lm.train", f"+experiment={args.experiment}",
        f"run_dir={args.run_dir}", f"data.dir={args.data}", f"train.device={args.device}",
        f"data.seq_len={seq_len}",
        f"train.batch_size={micro}", f"train.micro_batch_size={micro}",
        f"train.max_steps={args.steps}", "train.log_interval=1",
        f"train.eval_interval={args.steps}", f"train.checkpoint_interval={args.steps}",
        "train.keep_checkpoints=1",
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    records = [r for r in read_metrics(args.run_dir) if r["kind"] == "train"]
    timed = [r for r in records if r["step"] > 2] or records[-1:]  # warm-up steps left out
    ms = [1000 * micro * seq_len / r["tokens_per_s"] for r in timed]
    cfg = (Path(args.run_dir) / "config.yaml").read_text()
    cuda = args.device == "cuda"
    result = {
        "experiment": args.experiment,
        "micro_batch": micro,
        "seq_len": seq_len,
        "vocab": json.loads((Path(args.data) / "dataset.json").read_text())["vocab_size"],
        "precision": re.search(r"^  precision: (\w+)", cfg, re.M).group(1),
        "steps": len(ms),
        "ms_per_step": statistics.median(ms),
        "ms_min": min(ms),
        "ms_max": max(ms),
        "peak_gib": records[-1].get("gpu_peak_gib") if cuda else None,
        "total_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "skipped_steps": records[-1]["skipped_steps"],
    }
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="install missing wheels, then record GPU and versions")
    e.add_argument("--wheelhouse", default="wheelhouse")
    e.add_argument("--target", required=True)
    e.add_argument("--json", required=True)
    e.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    d = sub.add_parser("check-data", help="a preprocessed dataset opens and its checksums hold")
    d.add_argument("dir")
    s = sub.add_parser("paper-step", help="12L_1mem steps through the trainer: ms/step, memory")
    s.add_argument("--data", required=True)
    s.add_argument("--run-dir", required=True)
    s.add_argument("--json", required=True)
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--experiment", default="12L_1mem")
    s.add_argument("--micro-batch", type=int, default=32)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args()
    {"env": env, "check-data": check_data, "paper-step": paper_step}[args.cmd](args)


if __name__ == "__main__":
    main()
