"""The GPU acceptance check: every stage that CPU tests cannot prove, in one offline command.

    scripts/gpu_check.sh [--out DIR] [--data DIR] [--stages env,data,...] [--budget S] [--dry-run]

Stages, in this order (the command lines first, so that a slow or hanging test cannot starve
them), each with its own timeout, all inside --budget seconds, each printed as PASS / WARN /
FAIL / SKIP:
  env           GPU, memory, capability, torch / CUDA / NCCL versions, bf16; installs what this
                Python lacks from the wheelhouse (pip --no-index, into a throwaway folder)
  data          a synthetic Zipf corpus through the real preprocessing (Moses + sentencepiece,
                no fastBPE) and Zipf token ids at the paper's vocabulary; or --data DIR
  train         fp16 and bf16 trainings of a 6-layer model with one memory (finite loss, few
                skipped steps, falling validation perplexity, memory usage > 50%), then
                evaluate and generate
  paper         12L_1mem at paper width on one GPU: ms/step and peak GPU memory
  bench-train   scripts/bench_train.py --device cuda
  bench-memory  scripts/bench_memory.py --device cuda
  pytest        pytest -m gpu (CUDA vs CPU, top-k, LazyAdam, autocast, GradScaler, host syncs,
                kill + resume, 2 ranks)
  repro         (optional, only if the budget has room) the reproduction's GPU-scale headline

Exit status: 0 when no stage failed, 1 when one did, 2 when there is no CUDA device (one line,
at once) or the arguments are wrong. The report (summary.md first, at most 8 small files, no
checkpoints) goes to --out, by default results/gpu/<date>_<gpu>/. Only the standard library is
imported here; every stage runs in a subprocess under the Python that runs this script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
STATUSES = ("PASS", "WARN", "FAIL", "SKIP")
TAIL = 400_000  # bytes of each log kept in the report
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
    checks: str  # what is verified, for --dry-run and the summary
    groups: Callable[[Context], list[list[list[str]]]]  # sequential groups of parallel commands
    verdict: Callable[[Context, list[int]], Result]  # from the return codes and the files
    optional: bool = False
    missing: Callable[[Context], str | None] = lambda ctx: None  # why it cannot run, if so


class Context:
    def __init__(self, args: argparse.Namespace, dry: bool = False):
        self.args = args
        if args.work or dry:
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
        self.info: dict = {}  # env stage's probe output
        self.deadline = time.monotonic() + args.budget

    @property
    def text_data(self) -> Path:
        return Path(self.args.data) if self.args.data else self.work / "data" / "text"

    @property
    def ids_data(self) -> Path:
        return Path(self.args.data) if self.args.data else self.work / "data" / "ids60k"

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name


# -- commands --------------------------------------------------------------------------------


def probe(*args: str) -> list[str]:
    return [PY, "scripts/gpu_probe.py", *args]


def train_cmd(ctx: Context, name: str, precision: str) -> list[str]:
    """6 layers, dim 512, one memory of 128^2 slots replacing the FFN of layer 4 (sparse value
    gradients + LazyAdam, the defaults), 300 steps of 32 x 256 tokens. 128^2, not the paper's
    512^2: the ~26k validation tokens (3.3M reads) could not reach half of 262k slots."""
    return [
        PY, "-m", "pkm_lm.train", f"run_dir={ctx.run_dir(name)}", f"data.dir={ctx.text_data}",
        "train.device=cuda", f"train.precision={precision}", "model.n_layers=6",
        "model.memory.layers=[4]", "model.memory.n_keys=128", "data.seq_len=256",
        "train.batch_size=32", f"train.max_steps={ctx.args.train_steps}", "train.log_interval=25",
        f"train.eval_interval={ctx.args.train_steps // 3}",
        f"train.checkpoint_interval={ctx.args.train_steps}", "train.keep_checkpoints=1",
        "optim.lr=5e-4", "optim.warmup_steps=50",
    ]  # fmt: skip


def env_groups(ctx: Context) -> list[list[list[str]]]:
    return [[probe("env", "--wheelhouse", ctx.args.wheelhouse, "--target", str(ctx.site),
                   "--json", str(ctx.work / "env.json"))]]  # fmt: skip


def data_groups(ctx: Context) -> list[list[list[str]]]:
    if ctx.args.data:
        return [[probe("check-data", str(ctx.args.data))]]
    raw = ctx.work / "data" / "raw"
    text = [PY, "-m", "pkm_lm.data.synthetic", "text", "--out", str(raw), "--words", "1000000"]
    preprocess = [PY, "-m", "pkm_lm.preprocess", f"raw_dir={raw}", f"out_dir={ctx.text_data}"]
    preprocess += ["tokenizer=sentencepiece", "sentencepiece.vocab_size=2000", "workers=0"]
    ids = [PY, "-m", "pkm_lm.data.synthetic", "ids", "--out", str(ctx.ids_data)]
    ids += ["--vocab", str(PAPER_VOCAB), "--tokens", "2000000"]
    return [[text], [preprocess, ids]]


def pytest_groups(ctx: Context) -> list[list[list[str]]]:
    return [[[PY, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
              "--durations=8", "tests"]]]  # fmt: skip


def train_groups(ctx: Context) -> list[list[list[str]]]:
    bf16 = ctx.run_dir("bf16")
    evaluate = [PY, "-m", "pkm_lm.evaluate", f"run_dir={bf16}", "split=test"]
    generate = [PY, "-m", "pkm_lm.generate", f"run_dir={bf16}", "prompt=Ba vedu"]
    generate += ["max_new_tokens=40", "num_samples=2"]
    return [[train_cmd(ctx, "fp16", "fp16"), train_cmd(ctx, "bf16", "bf16")], [evaluate, generate]]


def paper_groups(ctx: Context) -> list[list[list[str]]]:
    """The measured step, then scripts/comm_cost.py's estimate for the same model on one rank
    (parameters, gradients and optimizer state: everything but activations)."""
    step = probe("paper-step", "--run-dir", str(ctx.run_dir("paper")), "--data")
    step += [str(ctx.ids_data), "--json", str(ctx.work / "paper.json")]
    vocab = PAPER_VOCAB
    if ctx.args.data:
        vocab = json.loads((Path(ctx.args.data) / "dataset.json").read_text())["vocab_size"]
    estimate = [PY, "scripts/comm_cost.py", "--experiments", "12L_1mem", "--world", "1"]
    return [[step], [[*estimate, "--vocab", str(vocab)]]]


def bench_train_groups(ctx: Context) -> list[list[list[str]]]:
    """fp32 (comparable with the CPU tables) and bf16 (how a GPU trains), one after the other."""
    args = "--device cuda --seq-len 256 --batch 32 --steps 20 --warmup 5 --nproc 1".split()
    bench = [PY, "scripts/bench_train.py", *args]
    return [[[*bench, "--precision", "fp32"]], [[*bench, "--precision", "bf16"]]]


def bench_memory_groups(ctx: Context) -> list[list[list[str]]]:
    """The paper's memory size and the largest, 3 rounds: the stage fits in a minute."""
    args = "--device cuda --sizes 512 1024 --rounds 3".split()
    return [[[PY, "scripts/bench_memory.py", *args]]]


def repro_groups(ctx: Context) -> list[list[list[str]]]:
    """The gpu scale's headline on its own corpus (data/bin/offline, made where fastBPE is)."""
    sweep = ["bash", "scripts/sweep.sh", "headline", "--scale", "gpu", "--parallel", "3"]
    return [[[*sweep, "--runs", str(ctx.work / "sweep"), "--out", str(ctx.work / "sweep_out")]]]


def repro_missing(ctx: Context) -> str | None:
    if (ROOT / OFFLINE / "dataset.json").is_file():
        return None
    return f"{OFFLINE} not found: preprocess it where fastBPE is and carry it here"


# -- verdicts --------------------------------------------------------------------------------


def all_ok(codes: list[int]) -> bool:
    return all(c == 0 for c in codes)


def failed(codes: list[int], what: str) -> Result:
    bad = [c for c in codes if c != 0]
    reason = "timed out" if any(c == TIMEOUT for c in bad) else f"exit status {bad}"
    return Result("FAIL", [f"{what}: {reason} (see the log)"])


def env_verdict(ctx: Context, codes: list[int]) -> Result:
    if not all_ok(codes):
        return failed(codes, "installing from the wheelhouse")
    info = ctx.info
    notes = [
        f"{info['gpu']}, {info['memory_gib']:.1f} GiB, capability {info['capability']}, "
        f"torch {info['torch']}, CUDA {info['cuda']}, NCCL {info['nccl']}, "
        f"bf16 {'yes' if info['bf16'] else 'no'}"
    ]
    if info.get("installed"):
        notes.append(f"installed from the wheelhouse: {', '.join(info['installed'])}")
    missing = [m for m, v in info["imports"].items() if v is None]
    if missing:
        return Result("FAIL", [*notes, f"not importable: {', '.join(missing)}"])
    return Result("PASS" if info["bf16"] else "WARN", notes)


def data_verdict(ctx: Context, codes: list[int]) -> Result:
    if not all_ok(codes):
        return failed(codes, "making the datasets")
    from pkm_lm.data.manifest import load_manifest

    notes = []
    for path in dict.fromkeys([ctx.text_data, ctx.ids_data]):
        m = load_manifest(path)
        tokens = {s: m["splits"][s]["tokens"] for s in m["splits"]}
        notes.append(f"{path.name}: vocabulary {m['vocab_size']:,}, tokens {tokens}")
    return Result("PASS", notes)


def pytest_verdict(ctx: Context, codes: list[int]) -> Result:
    """FAIL unless pytest passed and ran tests; WARN for skipped tests and for the warnings the
    GPU tests emit when they fall back (e.g. gloo instead of NCCL)."""
    log = (ctx.out / "pytest.log").read_text(errors="replace")
    tail = re.findall(r"^=*\s*(\d+ \w+.* in [\d.]+s.*?)\s*=*$", log, re.M)
    summary = tail[-1] if tail else "no pytest summary line"
    if codes[0] != 0:
        broken = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)
        return Result("FAIL", failed(codes, summary).notes + [f"failed: {t}" for t in broken])
    if not re.search(r"\b[1-9]\d* passed", summary):
        return Result("FAIL", [f"{summary}: no GPU test ran"])
    warned = re.findall(r"test_\w+\.py:\d+: \w*Warning: (.*)$", log, re.M)
    skipped = re.findall(r"^SKIPPED (.*)$", log, re.M)
    notes = [summary, *(f"warning: {w}" for w in dict.fromkeys(warned))]
    notes += [f"skipped: {s}" for s in skipped]
    return Result("WARN" if warned or skipped else "PASS", notes)


def train_verdict(ctx: Context, codes: list[int]) -> Result:
    from pkm_lm.metrics import read_metrics

    if codes[:2] != [0, 0]:
        return failed(codes[:2], "training")
    status, notes = "PASS", []
    for precision in ("fp16", "bf16"):
        recs = read_metrics(ctx.run_dir(precision))
        train = [r for r in recs if r["kind"] == "train"]
        evals = [r for r in recs if r["kind"] == "eval" and r["split"] == "valid"]
        if not train or len(evals) < 2:
            status = "FAIL"
            notes.append(f"{precision}: {len(train)} train and {len(evals)} eval records")
            continue
        last = train[-1]
        usage = min(last["memory_usage"].values())
        eval_usage = min(m["usage"] for m in evals[-1]["memory"].values())
        ppl = [round(r["ppl"], 1) for r in evals]
        problems = []
        if not all(math.isfinite(r["loss"]) for r in train):
            problems.append("non-finite loss")
        if last["skipped_steps"] > (0.1 if precision == "fp16" else 0) * last["step"]:
            problems.append(f"{last['skipped_steps']} skipped steps")
        if not ppl[-1] < 0.9 * ppl[0]:
            problems.append("validation perplexity not falling")
        if min(usage, eval_usage) <= 50:
            problems.append("memory usage <= 50%")
        notes.append(
            f"{precision}: loss {last['loss']:.3f}, valid ppl {' -> '.join(map(str, ppl))}, "
            f"skipped {last['skipped_steps']}/{last['step']}, memory usage {usage:.1f}% (train) "
            f"{eval_usage:.1f}% (valid), {last['tokens_per_s']:,.0f} tok/s (both runs share the GPU)"
            + (f": {', '.join(problems)}" if problems else "")
        )
        if problems:
            status = "FAIL"
    if codes[2] != 0:
        return Result("FAIL", notes + failed(codes[2:3], "evaluate").notes)
    test = [r for r in read_metrics(ctx.run_dir("bf16")) if r.get("split") == "test"]
    if not test or not math.isfinite(test[-1]["loss"]):
        return Result("FAIL", [*notes, "evaluate wrote no finite test record"])
    notes.append(f"evaluate (bf16 run, test): ppl {test[-1]['ppl']:.1f}")
    if codes[3] != 0:
        return Result("FAIL", notes + failed(codes[3:4], "generate").notes)
    generated = (ctx.out / "train.log").read_text(errors="replace")
    if "--- sample 2 ---" not in generated:
        return Result("FAIL", [*notes, "generate printed no second sample"])
    notes.append("generate: 2 samples")
    return Result(status, notes)


def paper_verdict(ctx: Context, codes: list[int]) -> Result:
    if codes[:1] != [0]:
        return failed(codes[:1], "12L_1mem step")
    r = json.loads((ctx.work / "paper.json").read_text())
    notes = [
        f"12L_1mem, {r['micro_batch']} x {r['seq_len']} tokens, vocabulary {r['vocab']:,}, "
        f"{r['precision']}: {r['ms_per_step']:.1f} ms/step (median of {r['steps']}, "
        f"{r['ms_min']:.1f}-{r['ms_max']:.1f}), peak GPU memory {r['peak_gib']:.2f} GiB "
        f"({r['peak_gib'] * 2**30 / 1e9:.1f} GB) allocated of {r['total_gib']:.1f} GiB"
    ]
    log = (ctx.out / "paper.log").read_text(errors="replace")
    estimate = re.search(r"^\| 12L_1mem \| dense grad \|[^|]*\| ([\d.]+) GB \|", log, re.M)
    if codes[1:] != [0] or estimate is None:
        return Result("WARN", [*notes, "scripts/comm_cost.py gave no estimate (see paper.log)"])
    notes.append(
        f"estimate (scripts/comm_cost.py, 1 rank, dense value gradient as the paper config): "
        f"{estimate.group(1)} GB without activations"
    )
    return Result("PASS", notes)


def command_outputs(log: Path) -> list[tuple[str, str]]:
    """(command, output) of each command ``run_group`` wrote into ``log``, in order."""
    parts = re.split(r"^\$ (.*)\n", log.read_text(errors="replace"), flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def bench_verdict(ctx: Context, codes: list[int], script: str, pattern: str) -> Result:
    """The benchmark's headline lines (``pattern``) from each of its runs in bench.log."""
    if not all_ok(codes):
        return failed(codes, script)
    notes = []
    for cmd, out in command_outputs(ctx.out / "bench.log"):
        if script in cmd:
            precision = re.search(r"--precision (\w+)", cmd)
            prefix = f"{precision.group(1)}: " if precision else ""
            notes += [prefix + line.strip() for line in re.findall(pattern, out, re.M)]
    return Result("PASS", notes or [f"{script}: table in bench.log"])


def bench_train_verdict(ctx: Context, codes: list[int]) -> Result:
    return bench_verdict(ctx, codes, "bench_train.py", r"^memory / .*$")


def bench_memory_verdict(ctx: Context, codes: list[int]) -> Result:
    ratios = r"^\| \w+ (?:fwd\+bwd|step) \| .*$|^\w+ fwd\+bwd growth .*$"
    return bench_verdict(ctx, codes, "bench_memory.py", ratios)


def repro_verdict(ctx: Context, codes: list[int]) -> Result:
    if not all_ok(codes):
        return failed(codes, "sweep.sh headline --scale gpu")
    tables = sorted((ctx.work / "sweep_out").rglob("headline*.md"))
    if not tables:
        return Result("FAIL", ["sweep.sh wrote no headline table"])
    names = ", ".join(t.name for t in tables)
    return Result("PASS", [f"{names}: below"], details="\n\n".join(t.read_text() for t in tables))


STAGES = [
    Stage("env", "environment", 60, "setup.log",
          "CUDA device, versions, bf16; the project's imports (missing ones from the wheelhouse)",
          env_groups, env_verdict),
    Stage("data", "data", 60, "setup.log",
          "datasets made through the real shard writer (manifest complete, checksums)",
          data_groups, data_verdict),
    Stage("train", "real command lines", 120, "train.log",
          "finite loss, skipped steps <= 10% (fp16) / 0 (bf16), last valid ppl < 0.9 x first, "
          "memory usage > 50%; evaluate writes a test record; generate prints 2 samples",
          train_groups, train_verdict),
    Stage("paper", "12L_1mem paper-width step", 90, "paper.log",
          "the real trainer runs 12L_1mem steps; ms/step and peak GPU memory",
          paper_groups, paper_verdict),
    Stage("bench-train", "bench_train.py on CUDA", 90, "bench.log",
          "L vs L + memory vs 2L, train and inference tokens/s, fp32 and bf16: tables printed",
          bench_train_groups, bench_train_verdict),
    Stage("bench-memory", "bench_memory.py on CUDA", 90, "bench.log",
          "the layer vs lucidrains' product-key-memory: the table is printed",
          bench_memory_groups, bench_memory_verdict),
    Stage("pytest", "pytest -m gpu", 220, "pytest.log",
          "every gpu-marked test passes (none may be missing); skips and the tests' fallback "
          "warnings are WARN",
          pytest_groups, pytest_verdict),
    Stage("repro", "reproduction headline (GPU scale)", 150, "repro.log",
          "scripts/sweep.sh headline --scale gpu writes its table",
          repro_groups, repro_verdict, optional=True, missing=repro_missing),
]  # fmt: skip
TIMEOUT = -999  # return code recorded for a command killed at its stage's deadline


# -- running ---------------------------------------------------------------------------------


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
    if stage.optional and left < stage.timeout:
        return Result("SKIP", [f"optional; {left:.0f} s of the budget left, needs {stage.timeout}"])
    if left < 10:
        return Result("SKIP", [f"out of budget (--budget {ctx.args.budget})"])
    if reason := stage.missing(ctx):
        return Result("SKIP", [reason])
    deadline = time.monotonic() + min(stage.timeout, left)
    codes: list[int] = []
    for group in stage.groups(ctx):
        codes += run_group(ctx, group, ctx.out / stage.log, deadline)
        if not all_ok(codes):
            break
    if stage.name == "env":
        ctx.info = json.loads((ctx.work / "env.json").read_text()) if all_ok(codes) else {}
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
        return (
            False,
            f"gpu-check: {PY} cannot import torch ({last}); use PYTHON=<a python with torch>",
        )
    ok, version, cuda, name = proc.stdout.split(maxsplit=3)
    if ok != "True":
        build = f"CUDA {cuda} build" if cuda != "None" else "a build without CUDA"
        return False, (
            f"gpu-check: no CUDA device (torch {version}, {build}, with {PY}): "
            "run it on a machine with an NVIDIA GPU; nothing was done"
        )
    return True, name.strip()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "gpu"


def write_summary(ctx: Context, results: dict[str, Result], argv: list[str]) -> Path:
    info = ctx.info
    lines = [
        f"# gpu-check {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `scripts/gpu_check.sh {shlex.join(argv)}`",
        f"- commit: {_git_commit()}",
    ]
    if info:
        lines += [
            f"- GPU: {info['gpu']} ({info['memory_gib']:.1f} GiB, capability {info['capability']},"
            f" {info['count']} device(s)), driver {info.get('driver') or '?'}",
            f"- torch {info['torch']}, CUDA {info['cuda']}, NCCL {info['nccl']}, "
            f"Python {info['python']}, {info['cpus']} CPUs",
        ]
    lines += ["", "| stage | status | time | notes |", "|---|---|---|---|"]
    for stage in STAGES:
        r = results.get(stage.name)
        if r is None:
            continue
        notes = "<br>".join(n.replace("|", "\\|") for n in r.notes)
        lines.append(f"| {stage.title} | **{r.status}** | {r.seconds:.0f} s | {notes} |")
    for stage in STAGES:
        r = results.get(stage.name)
        if r is not None and r.details:
            lines += ["", f"## {stage.title}", "", r.details.strip()]
    lines += ["", "What each stage checks:", ""]
    lines += [f"- {s.title}: {s.checks}" for s in STAGES if s.name in results]
    lines += ["", "Logs: " + ", ".join(sorted({s.log for s in STAGES if s.name in results}))]
    path = ctx.out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _git_commit() -> str:
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


def dry_run(ctx: Context, stages: list[Stage]) -> None:
    print(f"gpu-check dry run: budget {ctx.args.budget} s, python {PY}, work dir {ctx.work}")
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description=__doc__.split("\n\n")[0],
        epilog="make gpu-check [PYTHON=python3] [GPU_CHECK_OUT=DIR] [GPU_CHECK_ARGS='...'] runs "
        "this script. Offline: `make wheelhouse` first where there is a network, then carry "
        "wheelhouse/ to the GPU node.\n\n" + __doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", help="report folder (default results/gpu/<date>_<gpu>)")
    p.add_argument("--data", help="a preprocessed corpus (a pkm_lm.preprocess out_dir) for the "
                   "trainings and the paper step instead of the synthetic data")  # fmt: skip
    p.add_argument("--wheelhouse", default="wheelhouse", help="wheels for missing imports")
    p.add_argument("--work", help="scratch folder for data and runs, kept (default: a temporary "
                   "one, deleted at the end)")  # fmt: skip
    p.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    p.add_argument("--budget", type=float, default=370, help="seconds for all stages (370)")
    p.add_argument("--train-steps", type=int, default=300, help="steps of each training (300)")
    p.add_argument(
        "--stages",
        default=",".join(s.name for s in STAGES),
        help="comma-separated subset of " + ",".join(s.name for s in STAGES) + " (env always "
        "runs: it installs the imports; train and paper bring data)",
    )
    p.add_argument("--dry-run", action="store_true", help="print every stage and command")
    args = p.parse_args(argv)
    names = [s.name for s in STAGES]
    chosen = [n.strip() for n in args.stages.split(",") if n.strip()]
    bad = [n for n in chosen if n not in names]
    if bad or not chosen:
        p.error(f"--stages={args.stages!r}: unknown {bad}; choose from {names}")
    if args.budget <= 0 or args.train_steps < 3:
        p.error(f"--budget={args.budget} must be > 0 and --train-steps={args.train_steps} >= 3")
    if args.data and not (Path(args.data) / "dataset.json").is_file():
        p.error(f"--data={args.data}: no dataset.json there (a `pkm_lm.preprocess` out_dir)")
    # The env stage installs the imports every other stage needs; train and paper need data.
    needed = {"env"} | ({"data"} if {"train", "paper"} & set(chosen) else set())
    args.stages = [n for n in names if n in set(chosen) | needed]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    stages = [s for s in STAGES if s.name in args.stages]
    if args.dry_run:
        dry_run(Context(args, dry=True), stages)
        return 0
    ok, line = preflight()
    if not ok:
        print(line, file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))  # verdicts read metrics and manifests with the project's code
    ctx = Context(args)
    ctx.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(1, str(ctx.site))
    if ctx.out is None:
        ctx.out = ROOT / "results" / "gpu" / f"{dt.date.today():%Y-%m-%d}_{slug(line)}"
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
        summary = write_summary(ctx, results, argv)
        if not (args.keep_work or args.work):  # a --work folder is the user's: kept
            shutil.rmtree(ctx.work, ignore_errors=True)
    counts = {s: sum(r.status == s for r in results.values()) for s in STATUSES}
    print(f"gpu-check: {', '.join(f'{n} {s}' for s, n in counts.items() if n)}; {summary}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
