"""The check's report: ``summary.md`` (the machine, the commit, one row per stage with its
figures), beside the stages' logs and the benchmarks' tables and records."""

from __future__ import annotations

import datetime as dt
import re
import shlex
import subprocess
from pathlib import Path

from .stage import ROOT, Context, Result, Stage


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "gpu"


def git_commit() -> str:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True)
        if proc.returncode == 0:
            return proc.stdout.strip() + (" (with local changes)" if dirty.stdout else "")
    except OSError:
        pass
    return "unknown (not a git checkout)"


def _machine_lines(info: dict, dry_run: bool) -> list[str]:
    if not info:
        return []
    versions = (f"- torch {info['torch']}, CUDA {info['cuda']}, NCCL {info['nccl']}, "
                f"triton {info.get('triton')}, Python {info['python']}, {info['cpus']} CPUs")  # fmt: skip
    if dry_run or not info.get("gpu"):
        return ["- dry run on the CPU: toy sizes, no GPU figure anywhere", versions]
    return [
        f"- GPU: {info['gpu']} ({info['memory_gib']:.1f} GiB, capability {info['capability']},"
        f" {info['count']} device(s)), driver {info.get('driver') or '?'}",
        versions,
    ]


def write_summary(
    ctx: Context, stages: list[Stage], results: dict[str, Result], argv: list[str]
) -> Path:
    lines = [
        f"# gpu-check {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `scripts/gpu_check.sh {shlex.join(argv)}`",
        f"- commit: {git_commit()}",
        *_machine_lines(ctx.info, ctx.args.dry_run),
        "",
        "| stage | status | time | notes |",
        "|---|---|---|---|",
    ]
    ran = [s for s in stages if s.name in results]
    for stage in ran:
        r = results[stage.name]
        notes = "<br>".join(n.replace("|", "\\|") for n in r.notes)
        lines.append(f"| {stage.title} | **{r.status}** | {r.seconds:.0f} s | {notes} |")
    for stage in ran:
        if results[stage.name].details:
            lines += ["", f"## {stage.title}", "", results[stage.name].details.strip()]
    lines += ["", "What each stage checks:", ""]
    lines += [f"- {s.title}: {s.checks}" for s in ran]
    files = sorted(p.name for p in ctx.out.iterdir() if p.is_file() and p.name != "summary.md")
    lines += ["", "Files: " + ", ".join(files)]
    path = ctx.out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
