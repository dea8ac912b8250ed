"""The GPU acceptance check: every stage that CPU tests cannot prove, in one offline command.

    scripts/gpu_check.sh [--out DIR] [--data DIR] [--stages env,data,...] [--budget S]
    scripts/gpu_check.sh --dry-run     # every stage at toy sizes on this CPU (no GPU needed)
    scripts/gpu_check.sh --list        # print every stage and command, run nothing

Stages, in this order, each with its own timeout, all inside --budget seconds, each PASS /
WARN / FAIL / SKIP (speed goals PASS only when met beyond the measured spread, WARN with the
figure otherwise):
  env           GPU, memory, capability, versions, bf16; installs what this Python lacks from
                the wheelhouse (pip --no-index, into a throwaway folder)
  data          a synthetic Zipf corpus through the real preprocessing (Moses + sentencepiece,
                no fastBPE) and Zipf token ids at the paper's vocabulary; or --data DIR
  profile       scripts/profile_memory.py: the layer's step and forward by profiler region
  roofline      scripts/roofline.py: the layer timed beside its floor from bytes and FLOPs
  bench-train   scripts/bench_train.py --preset paper (12L_0mem, 12L_1mem, 24L_0mem at dim
                1024, bf16 and fp16), then dim 512 as the first GPU run
  bench-memory  scripts/bench_memory.py at 8,192 tokens against lucidrains' layer
  pytest        pytest -m gpu (CUDA vs CPU, top-k, bf16 selection, LazyAdam, autocast,
                GradScaler, host syncs, kill + resume, 2 ranks)
  repro         (optional, if the budget has room) the reproduction's GPU-scale headline
  compile       (optional, if the budget has room) bench-train's paper width, bf16, with
                train.compile=true
  train         fp16 and bf16 trainings of a 6-layer model with one memory, evaluate, generate
  paper         12L_1mem at paper width on one GPU: ms/step and peak GPU memory

Exit status: 0 when no stage failed, 1 when one did, 2 when there is no CUDA device (one line,
at once) or the arguments are wrong. The report (summary.md, the logs, the benchmarks' tables
and JSON-lines records, no checkpoints) goes to --out, by default results/gpu/<date>_<gpu>/
(the dry run: runs/gpu_check_dry_run/). Only the standard library is imported before the env
stage; every stage runs in a subprocess under the Python that runs this.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report import slug, write_summary
from .stage import PY, ROOT, STATUSES, TIMEOUT, Context, Result, Stage
from .stages import STAGES

TAIL = 400_000  # bytes of each command's output kept in the report


def run_group(ctx: Context, cmds: list[list[str]], log: Path, deadline: float) -> list[int]:
    """Run the commands of one group in parallel, appending their output to ``log``. Each runs
    in its own process group, killed whole at the deadline (or on Ctrl-C), so no trainer a
    command started outlives it on the GPU."""
    procs = []
    for cmd in cmds:
        out = tempfile.TemporaryFile(dir=ctx.work)
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=ctx.env, stdout=out, stderr=out, start_new_session=True
        )
        procs.append((cmd, out, proc))
    codes = []
    try:
        for _, _, proc in procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                codes.append(TIMEOUT)
    finally:
        for _, _, proc in procs:
            _kill_group(proc)  # the stragglers of a command that returned, or all on Ctrl-C
    for (cmd, out, _), code in zip(procs, codes, strict=False):
        out.seek(0)
        data = out.read()
        out.close()
        if len(data) > TAIL:
            data = b"[... %d bytes cut ...]\n" % (len(data) - TAIL) + data[-TAIL:]
        with open(log, "ab") as f:
            f.write(f"$ {shlex.join(cmd)}\n".encode() + data + f"[exit {code}]\n\n".encode())
    return codes


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone
        pass
    proc.wait()


def run_stage(ctx: Context, stage: Stage) -> Result:
    left = ctx.deadline - time.monotonic()
    timeout = stage.timeout * ctx.sizes.slowdown
    if stage.optional and left < timeout:
        return Result("SKIP", [f"optional; {left:.0f} s of the budget left, needs {timeout:.0f}"])
    if left < 10:
        return Result("SKIP", [f"out of budget (--budget {ctx.args.budget})"])
    if reason := stage.missing(ctx):
        return Result("SKIP", [reason])
    start = time.monotonic()
    deadline = start + min(timeout, left)
    codes: list[int] = []
    for group in stage.groups(ctx):
        codes += run_group(ctx, group, ctx.out / stage.log, deadline)
        if not all(c == 0 for c in codes):
            break
    ctx.group_seconds = time.monotonic() - start
    if stage.name == "env":
        ok = all(c == 0 for c in codes)
        ctx.info = json.loads((ctx.work / "env.json").read_text()) if ok else {}
    try:
        return stage.verdict(ctx, codes)
    except Exception as e:  # a verdict that cannot read its files is a failure of the stage
        return Result("FAIL", [f"could not check the results: {type(e).__name__}: {e}"])


def preflight() -> tuple[bool, str]:
    """(has CUDA, one line): torch importable and a CUDA device visible, before any work."""
    code = (
        "import torch; ok = torch.cuda.is_available(); "
        "print(ok, torch.__version__, torch.version.cuda, "
        "torch.cuda.get_device_name(0) if ok else '-')"
    )
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"error: {PY} cannot import torch ({last}); use PYTHON=<a python with torch>"
    ok, version, cuda, name = proc.stdout.split(maxsplit=3)
    if ok != "True":
        build = f"CUDA {cuda} build" if cuda != "None" else "a build without CUDA"
        return False, (
            f"error: no CUDA device (torch {version}, {build}, with {PY}): run it on a machine "
            "with an NVIDIA GPU, or --dry-run for every stage at toy sizes on the CPU; "
            "nothing was done"
        )
    return True, name.strip()


def list_stages(ctx: Context, stages: list[Stage]) -> None:
    print(f"gpu-check: budget {ctx.args.budget} s, python {PY}, work dir {ctx.work}")
    print(f"report: {ctx.out or 'results/gpu/<date>_<gpu>'} (summary.md first)")
    for stage in stages:
        opt = ", optional: runs only if the budget has room" if stage.optional else ""
        print(f"\n[{stage.name}] {stage.title} (timeout {stage.timeout:.0f} s{opt})")
        print(f"  checks: {stage.checks}")
        if reason := stage.missing(ctx):
            print(f"  skipped: {reason}")
        for group in stage.groups(ctx):
            joined = " &\n  ".join(f"$ {shlex.join(c)}" for c in group)
            print(f"  {joined}{'  (in parallel)' if len(group) > 1 else ''}")


class Parser(argparse.ArgumentParser):
    """User errors as one line, ``error: ...``, exit status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = [s.name for s in STAGES]
    p = Parser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0],
               epilog="make gpu-check [PYTHON=python3] [GPU_CHECK_OUT=DIR] [GPU_CHECK_ARGS='...'] "
               "runs this. Offline: `make wheelhouse` first where there is a network, then carry "
               "wheelhouse/ to the GPU node.\n\n" + __doc__.split("\n\n", 2)[2],
               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", help="report folder (default results/gpu/<date>_<gpu>)")
    p.add_argument("--data", help="a preprocessed corpus (a pkm_lm.preprocess out_dir) for the "
                   "trainings and the paper step instead of the synthetic data")  # fmt: skip
    p.add_argument("--wheelhouse", default="wheelhouse", help="wheels for missing imports")
    p.add_argument("--work", help="scratch folder for data and runs, kept (default: a temporary "
                   "one, deleted at the end)")  # fmt: skip
    p.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    p.add_argument("--budget", type=float, default=540, help="seconds for all stages (540)")
    p.add_argument("--train-steps", type=int, default=300, help="steps of each training (300)")
    p.add_argument("--stages", default=",".join(names), help="comma-separated subset of "
                   f"{','.join(names)} (env always runs; train and paper bring data)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="every stage at toy sizes on the CPU")
    p.add_argument("--list", action="store_true", help="print every stage and command")
    args = p.parse_args(argv)
    chosen = [n.strip() for n in args.stages.split(",") if n.strip()]
    bad = [n for n in chosen if n not in names]
    if bad or not chosen:
        p.error(f"--stages={args.stages!r}: unknown {bad}; choose from {names}")
    if args.budget <= 0 or args.train_steps < 3:
        p.error(f"--budget={args.budget} must be > 0 and --train-steps={args.train_steps} >= 3")
    if args.data and not (Path(args.data) / "dataset.json").is_file():
        p.error(f"--data={args.data}: no dataset.json there (a `pkm_lm.preprocess` out_dir)")
    if args.dry_run and args.train_steps == 300:
        args.train_steps = 30  # the toy trainings
    # env installs the imports; train and paper need data, and so does the dry run's repro.
    data_users = {"train", "paper"} | ({"repro"} if args.dry_run else set())
    needed = {"env"} | ({"data"} if data_users & set(chosen) else set())
    args.stages = [n for n in names if n in set(chosen) | needed]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    stages = [s for s in STAGES if s.name in args.stages]
    if args.list:
        list_stages(Context(args, listing=True), stages)
        return 0
    ok, line = (True, "CPU (dry run)") if args.dry_run else preflight()
    if not ok:
        print(line, file=sys.stderr)
        return 2
    ctx = Context(args)
    ctx.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ctx.site))  # verdicts import what the env stage installed
    if ctx.out is None:
        name = "gpu_check_dry_run" if args.dry_run else f"{dt.date.today():%Y-%m-%d}_{slug(line)}"
        ctx.out = ROOT / ("runs" if args.dry_run else "results/gpu") / name
    ctx.out.mkdir(parents=True, exist_ok=True)
    for old in ctx.out.iterdir():  # a rerun replaces the report
        if old.is_file():
            old.unlink()
    print(f"gpu-check on {line}: report in {ctx.out}, budget {args.budget:.0f} s", flush=True)
    results: dict[str, Result] = {}
    try:
        for stage in stages:
            start = time.monotonic()
            results[stage.name] = r = run_stage(ctx, stage)
            r.seconds = time.monotonic() - start
            print(f"[{r.status}] {stage.title} ({r.seconds:.0f} s)", flush=True)
            for note in r.notes:
                print(f"       {note}", flush=True)
            if stage.name == "env" and r.status == "FAIL":
                break  # nothing else can run without the imports
            if stage.name == "env" and ctx.info:
                shutil.copy(ctx.work / "env.json", ctx.out / "env.json")
    finally:
        summary = write_summary(ctx, stages, results, argv)
        if not (args.keep_work or args.work):  # a --work folder is the user's: kept
            shutil.rmtree(ctx.work, ignore_errors=True)
    counts = {s: sum(r.status == s for r in results.values()) for s in STATUSES}
    print(f"gpu-check: {', '.join(f'{n} {s}' for s, n in counts.items() if n)}; {summary}")
    return 1 if counts["FAIL"] else 0
