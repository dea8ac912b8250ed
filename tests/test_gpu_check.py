"""`scripts/gpu_check.sh` on the CPU: its dry run, its no-CUDA exit, its stage runner and report,
and the synthetic data it trains on (the GPU stages themselves need a GPU)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pkm_lm.data import load_manifest, open_split
from pkm_lm.data.synthetic import write_zipf_corpus, write_zipf_ids, zipf_text

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# CUDA hidden, so the no-CUDA path is the one taken on a GPU machine too.
ENV = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def module(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_prints_every_stage_and_command(module):
    proc = gpu_check("--dry-run", "--work", "/scratch")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for stage in module.STAGES:
        assert f"[{stage.name}] {stage.title}" in out
    for needle in (
        "gpu_probe.py env --wheelhouse wheelhouse",
        "pkm_lm.preprocess raw_dir=/scratch/data/raw out_dir=/scratch/data/text "
        "tokenizer=sentencepiece",
        "-m pytest -m gpu",
        "train.device=cuda train.precision=fp16",
        "train.device=cuda train.precision=bf16",
        "pkm_lm.evaluate run_dir=/scratch/runs/bf16 split=test",
        "pkm_lm.generate run_dir=/scratch/runs/bf16",
        "gpu_probe.py paper-step",
        "bench_train.py --device cuda",
        "bench_memory.py --device cuda",
        "sweep.sh headline --scale gpu",
    ):
        assert needle in out, needle
    assert not Path("/scratch").exists()  # a dry run creates nothing


def test_chosen_stages_bring_the_stages_they_need():
    out = gpu_check("--dry-run", "--stages", "paper").stdout
    assert "[env]" in out and "[data]" in out and "[paper]" in out and "[train]" not in out
    out = gpu_check("--dry-run", "--stages", "pytest").stdout
    assert "[env]" in out and "[pytest]" in out and "[data]" not in out


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "report"
    proc = gpu_check("--out", str(out))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("gpu-check: no CUDA device") and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stages", "env,warp"], "--stages='env,warp': unknown ['warp']"),
        (["--budget", "0"], "--budget=0.0 must be > 0"),
        (["--data", "/nonexistent"], "--data=/nonexistent: no dataset.json there"),
    ],
)
def test_bad_arguments_are_named(args, message):
    proc = gpu_check(*args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def _stage(module, name, code, timeout=30.0, optional=False, missing=None):
    """A stage whose one command runs ``code`` in Python (or is ``code``, a list)."""
    cmd = code if isinstance(code, list) else [sys.executable, "-c", code]
    return module.Stage(
        name, f"stage {name}", timeout, "fake.log", f"checks of {name}",
        lambda ctx: [[cmd]],
        lambda ctx, codes: module.failed(codes, name) if codes != [0]
        else module.Result("PASS", [f"{name} fine"], details=f"details of {name}"),
        optional=optional, missing=missing or (lambda ctx: None),
    )  # fmt: skip


def test_stages_report_pass_fail_timeout_and_skip(module, monkeypatch, tmp_path):
    stages = [
        _stage(module, "good", "print('hello from good')"),
        _stage(module, "bad", "import sys; sys.exit(3)"),
        _stage(module, "slow", spawn_and_sleep(tmp_path / "child.pid"), timeout=3.0),
        _stage(module, "extra", "print('never')", timeout=10_000.0, optional=True),
        _stage(module, "nodata", "print('never')", missing=lambda ctx: "no corpus here"),
    ]
    monkeypatch.setattr(module, "STAGES", stages)
    monkeypatch.setattr(module, "preflight", lambda: (True, "Fake GPU 80GB"))
    scratch = tmp_path / "scratch"
    monkeypatch.setattr(module.tempfile, "mkdtemp", lambda prefix: str(scratch))
    out = tmp_path / "report"
    code = module.main(
        ["--out", str(out), "--stages", "good,bad,slow,extra,nodata", "--budget", "900"]
    )
    assert code == 1  # a FAIL makes the exit status non-zero
    summary = (out / "summary.md").read_text()
    assert "| stage good | **PASS** |" in summary and "good fine" in summary
    assert "| stage bad | **FAIL** |" in summary and "exit status [3]" in summary
    assert "| stage slow | **FAIL** |" in summary and "timed out" in summary
    assert "| stage extra | **SKIP** |" in summary and "optional" in summary
    assert "| stage nodata | **SKIP** | 0 s | no corpus here |" in summary
    assert "## stage good\n\ndetails of good" in summary
    log = (out / "fake.log").read_text()
    assert "hello from good" in log and "[exit 3]" in log and "never" not in log
    assert not scratch.exists()  # the temporary scratch folder is removed
    child = int((tmp_path / "child.pid").read_text())  # what the timed-out command started
    assert not _alive(child), "a command's child outlived its stage's timeout"
    assert len(list(out.iterdir())) <= 8


def spawn_and_sleep(pidfile: Path) -> list[str]:
    """A command that starts a child (its pid in ``pidfile``) and waits: a shell starts in
    milliseconds, well inside the stage's timeout even on a busy machine."""
    return ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_all_passing_exits_zero_and_out_of_budget_skips(module, monkeypatch, tmp_path):
    stages = [_stage(module, "a", "pass"), _stage(module, "b", "pass")]
    monkeypatch.setattr(module, "STAGES", stages)
    monkeypatch.setattr(module, "preflight", lambda: (True, "Fake GPU"))
    assert module.main(["--out", str(tmp_path / "r1"), "--stages", "a,b"]) == 0
    assert (tmp_path / "r1" / "summary.md").read_text().count("**PASS**") == 2
    monkeypatch.setattr(module.time, "monotonic", _clock(step=100.0))  # 100 s pass per call
    assert module.main(["--out", str(tmp_path / "r2"), "--stages", "a,b", "--budget", "150"]) == 0
    assert "out of budget" in (tmp_path / "r2" / "summary.md").read_text()


def _clock(step: float):
    t = [0.0]

    def now() -> float:
        t[0] += step
        return t[0]

    return now


def test_pytest_verdict_never_passes_vacuously_and_reports_fallbacks(module, tmp_path):
    ctx = module.Context(module.parse_args(["--work", str(tmp_path)]), dry=True)
    ctx.out = tmp_path
    log = tmp_path / "pytest.log"
    log.write_text("===== 12 deselected in 0.50s =====\n")
    assert module.pytest_verdict(ctx, [0]).status == "FAIL"
    log.write_text(
        "tests/test_gpu.py::test_two_ranks\n"
        "  /x/tests/test_gpu.py:321: UserWarning: NCCL refused two ranks on one GPU; gloo used\n"
        "SKIPPED [1] tests/test_gpu.py:10: needs 2 GPUs\n"
        "===== 20 passed, 1 skipped, 1 warning in 61.20s (0:01:01) =====\n"
    )
    r = module.pytest_verdict(ctx, [0])
    assert r.status == "WARN" and r.notes[0].startswith("20 passed, 1 skipped")
    assert any("gloo used" in n for n in r.notes) and any("needs 2 GPUs" in n for n in r.notes)
    log.write_text(
        "FAILED tests/test_gpu.py::test_a[x] - AssertionError: no\n"
        "===== 1 failed, 19 passed in 50.00s =====\n"
    )
    r = module.pytest_verdict(ctx, [1])
    assert r.status == "FAIL" and r.notes[-1] == "failed: tests/test_gpu.py::test_a[x]"


def test_zipf_text_is_reproducible_zipfian_and_learnable():
    lines = zipf_text(50_000, seed=1)
    assert lines == zipf_text(50_000, seed=1) and lines != zipf_text(50_000, seed=2)
    words = " ".join(lines).lower().replace(".", "").split()
    assert abs(len(words) - 50_000) < 50
    counts = sorted(__import__("collections").Counter(words).values(), reverse=True)
    assert counts[0] > 5 * counts[20]  # heavy head
    # bigram structure: the most frequent successor of common words is far above its unigram rate
    pairs = __import__("collections").Counter(zip(words, words[1:], strict=False))
    top_word = max(set(words), key=words.count)
    follow = max(n for (a, _), n in pairs.items() if a == top_word) / words.count(top_word)
    assert follow > 0.08


def test_synthetic_datasets_go_through_the_real_pipeline(tmp_path):
    lines = write_zipf_corpus(tmp_path / "raw", train_words=4000, heldout_words=400)
    assert all(n > 0 for n in lines.values())
    assert (tmp_path / "raw" / "train.txt").read_text().count("\n") == lines["train"]
    manifest = write_zipf_ids(tmp_path / "ids", vocab_size=70_000, train_tokens=5000)
    assert manifest == load_manifest(tmp_path / "ids") and manifest["dtype"] == "uint32"
    train = open_split(tmp_path / "ids", "train")
    assert len(train) == 5000 and len(open_split(tmp_path / "ids", "valid")) == 250
    ids = train[0:5000]
    assert ids.min() >= 4 and ids.max() < 70_000  # no special ids, all in the vocabulary


def test_paper_verdict_reads_the_step_and_the_estimate(module, tmp_path):
    ctx = module.Context(module.parse_args(["--work", str(tmp_path)]), dry=True)
    ctx.out = tmp_path
    step = {"micro_batch": 32, "seq_len": 256, "vocab": 60000, "precision": "fp16", "steps": 5,
            "ms_per_step": 151.2, "ms_min": 150.0, "ms_max": 160.0, "peak_gib": 20.5,
            "total_gib": 79.1, "skipped_steps": 0}  # fmt: skip
    (tmp_path / "paper.json").write_text(module.json.dumps(step))
    estimate = module.paper_groups(ctx)[1][0]
    assert "--vocab" in estimate and "60000" in estimate
    proc = subprocess.run(estimate, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "paper.log").write_text(proc.stdout)
    r = module.paper_verdict(ctx, [0, 0])
    assert r.status == "PASS", r.notes
    assert "151.2 ms/step" in r.notes[0] and "20.50 GiB" in r.notes[0]
    assert re.search(r"estimate .*: [\d.]+ GB without activations", r.notes[1])
    assert module.paper_verdict(ctx, [0, 1]).status == "WARN"
    assert module.paper_verdict(ctx, [1]).status == "FAIL"


def test_bench_verdicts_quote_each_runs_headline(module, tmp_path):
    ctx = module.Context(module.parse_args(["--work", str(tmp_path)]), dry=True)
    ctx.out = tmp_path
    for i, precision in enumerate(["fp32", "bf16"]):  # stand-ins named like the real commands
        ratio = f"memory / same depth, training: 0.6{i}x (target >= 0.8x)"
        code = f"print('| model | train tok/s |'); print({ratio!r})"
        cmd = [sys.executable, "-c", code, "scripts/bench_train.py", "--precision", precision]
        module.run_group(ctx, [cmd], tmp_path / "bench.log", module.time.monotonic() + 30)
    r = module.bench_train_verdict(ctx, [0, 0])
    assert r.status == "PASS" and r.notes == [
        "fp32: memory / same depth, training: 0.60x (target >= 0.8x)",
        "bf16: memory / same depth, training: 0.61x (target >= 0.8x)",
    ]
    assert module.bench_memory_verdict(ctx, [0]).notes == ["bench_memory.py: table in bench.log"]
    assert module.bench_memory_verdict(ctx, [2]).status == "FAIL"
