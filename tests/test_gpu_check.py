"""`scripts/gpu_check.sh` (pkm_lm.gpucheck) on the CPU: its listing, its no-CUDA exit, its stage
runner and report, its verdicts (speed goals PASS only beyond the spread), and the synthetic
data it trains on. The GPU stages themselves need a GPU; `--dry-run` runs them all at toy sizes
on a CPU (minutes: not part of the suite)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pkm_lm.data import load_manifest, open_split
from pkm_lm.data.synthetic import write_zipf_corpus, write_zipf_ids, zipf_text
from pkm_lm.gpucheck import commands, run, speed_verdicts, stage, verdicts
from pkm_lm.perf import commands as perf_commands

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# CUDA hidden, so the no-CUDA path is the one taken on a GPU machine too.
ENV = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )


def test_list_prints_every_stage_and_command():
    proc = gpu_check("--list", "--work", "/scratch")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for s in run.STAGES:
        assert f"[{s.name}] {s.title}" in out
    for needle in (
        "pkm_lm.gpucheck.probe env --wheelhouse wheelhouse",
        "pkm_lm.preprocess raw_dir=/scratch/data/raw out_dir=/scratch/data/text "
        "tokenizer=sentencepiece",
        "-m pytest -m gpu",
        "train.device=cuda train.precision=fp16",
        "train.device=cuda train.precision=bf16",
        "pkm_lm.evaluate run_dir=/scratch/runs/bf16 split=test",
        "pkm_lm.generate run_dir=/scratch/runs/bf16",
        "pkm_lm.gpucheck.probe paper-step",
        "profile_memory.py --preset dim512 --precision bf16",
        "roofline.py --preset dim512 --time 20 --measure-peaks",
        "bench_train.py --preset paper",
        "bench_memory.py --device cuda --batch 32 --sizes 128 256 512 1024",
        "sweep.sh headline --scale gpu",
    ):
        assert needle in out, needle
    assert not Path("/scratch").exists()  # listing creates nothing


def test_dry_run_lists_toy_sizes_on_the_cpu():
    out = gpu_check("--list", "--dry-run", "--work", "/scratch").stdout
    assert "cuda" not in out.replace("CUDA", "")
    for needle in ("probe env", "--device cpu", "train.device=cpu", "--preset toy",
                   "tiny/12L_1mem", "pytest -m gpu -p no:cacheprovider --collect-only",
                   "headline --scale tiny"):  # fmt: skip
        assert needle in out, needle


def test_chosen_stages_bring_the_stages_they_need():
    out = gpu_check("--list", "--stages", "paper").stdout
    assert "[env]" in out and "[data]" in out and "[paper]" in out and "[train]" not in out
    out = gpu_check("--list", "--stages", "pytest").stdout
    assert "[env]" in out and "[pytest]" in out and "[data]" not in out


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "report"
    proc = gpu_check("--out", str(out))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: no CUDA device") and "Traceback" not in proc.stderr
    assert "--dry-run" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stages", "env,warp"], "error: --stages='env,warp': unknown ['warp']"),
        (["--budget", "0"], "error: --budget=0.0 must be > 0"),
        (["--data", "/nonexistent"], "error: --data=/nonexistent: no dataset.json there"),
        (["--bogus"], "error: unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run.parse_args(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1


def _stage(name, code, timeout=30.0, optional=False, missing=None):
    """A stage whose one command runs ``code`` in Python (or is ``code``, a list)."""
    cmd = code if isinstance(code, list) else [sys.executable, "-c", code]
    return stage.Stage(
        name, f"stage {name}", timeout, "fake.log", f"checks of {name}",
        lambda ctx: [[cmd]],
        lambda ctx, codes: verdicts.failed(codes, name) if codes != [0]
        else stage.Result("PASS", [f"{name} fine"], details=f"details of {name}"),
        optional=optional, missing=missing or (lambda ctx: None),
    )  # fmt: skip


def test_stages_report_pass_fail_timeout_and_skip(monkeypatch, tmp_path):
    stages = [
        _stage("good", "print('hello from good')"),
        _stage("bad", "import sys; sys.exit(3)"),
        _stage("slow", spawn_and_sleep(tmp_path / "child.pid"), timeout=3.0),
        _stage("extra", "print('never')", timeout=10_000.0, optional=True),
        _stage("nodata", "print('never')", missing=lambda ctx: "no corpus here"),
    ]
    monkeypatch.setattr(run, "STAGES", stages)
    monkeypatch.setattr(run, "preflight", lambda: (True, "Fake GPU 80GB"))
    scratch = tmp_path / "scratch"
    monkeypatch.setattr(stage.tempfile, "mkdtemp", lambda prefix: str(scratch))
    out = tmp_path / "report"
    code = run.main(
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


def test_all_passing_exits_zero_and_out_of_budget_skips(monkeypatch, tmp_path):
    stages = [_stage("a", "pass"), _stage("b", "pass")]
    monkeypatch.setattr(run, "STAGES", stages)
    monkeypatch.setattr(run, "preflight", lambda: (True, "Fake GPU"))
    assert run.main(["--out", str(tmp_path / "r1"), "--stages", "a,b"]) == 0
    assert (tmp_path / "r1" / "summary.md").read_text().count("**PASS**") == 2
    monkeypatch.setattr(run.time, "monotonic", _clock(step=100.0))  # 100 s pass per call
    assert run.main(["--out", str(tmp_path / "r2"), "--stages", "a,b", "--budget", "150"]) == 0
    assert "out of budget" in (tmp_path / "r2" / "summary.md").read_text()


def _clock(step: float):
    t = [0.0]

    def now() -> float:
        t[0] += step
        return t[0]

    return now


def _ctx(tmp_path, *args: str) -> stage.Context:
    ctx = stage.Context(run.parse_args(["--work", str(tmp_path), *args]), listing=True)
    ctx.out = tmp_path
    return ctx


def test_pytest_verdict_never_passes_vacuously_and_reports_fallbacks(tmp_path):
    ctx = _ctx(tmp_path)
    log = tmp_path / "pytest.log"
    log.write_text("===== 12 deselected in 0.50s =====\n")
    assert verdicts.pytest_verdict(ctx, [0]).status == "FAIL"
    log.write_text(
        "tests/test_gpu.py::test_two_ranks\n"
        "  /x/tests/test_gpu.py:321: UserWarning: NCCL refused two ranks on one GPU; gloo used\n"
        "SKIPPED [1] tests/test_gpu.py:10: needs 2 GPUs\n"
        "===== 20 passed, 1 skipped, 1 warning in 61.20s (0:01:01) =====\n"
    )
    r = verdicts.pytest_verdict(ctx, [0])
    assert r.status == "WARN" and r.notes[0].startswith("20 passed, 1 skipped")
    assert any("gloo used" in n for n in r.notes) and any("needs 2 GPUs" in n for n in r.notes)
    log.write_text(
        "FAILED tests/test_gpu.py::test_a[x] - AssertionError: no\n"
        "===== 1 failed, 19 passed in 50.00s =====\n"
    )
    r = verdicts.pytest_verdict(ctx, [1])
    assert r.status == "FAIL" and r.notes[-1] == "failed: tests/test_gpu.py::test_a[x]"
    dry = _ctx(tmp_path, "--dry-run")
    log.write_text("tests/test_gpu.py::test_a\n\n77/690 tests collected (613 deselected) in 3s\n")
    r = verdicts.pytest_verdict(dry, [0])
    assert r.status == "SKIP" and r.notes == ["77 GPU tests collected; they need a GPU"]


def test_zipf_text_is_reproducible_zipfian_and_learnable():
    lines = zipf_text(50_000, seed=1)
    assert lines == zipf_text(50_000, seed=1) and lines != zipf_text(50_000, seed=2)
    words = " ".join(lines).lower().replace(".", "").split()
    assert abs(len(words) - 50_000) < 50
    unigrams = __import__("collections").Counter(words)
    counts = sorted(unigrams.values(), reverse=True)
    assert counts[0] > 5 * counts[20]  # heavy head
    # bigram structure: the most frequent successor of common words is far above its unigram rate
    pairs = __import__("collections").Counter(zip(words, words[1:], strict=False))
    top_word = max(unigrams, key=unigrams.get)
    follow = max(n for (a, _), n in pairs.items() if a == top_word) / unigrams[top_word]
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


def test_paper_verdict_reads_the_step_and_the_estimate(tmp_path):
    ctx = _ctx(tmp_path)
    step = {"experiment": "12L_1mem", "micro_batch": 32, "seq_len": 256, "vocab": 60000, "precision": "fp16", "steps": 5,
            "ms_per_step": 151.2, "ms_min": 150.0, "ms_max": 160.0, "peak_gib": 20.5,
            "total_gib": 79.1, "skipped_steps": 0}  # fmt: skip
    (tmp_path / "paper.json").write_text(json.dumps(step))
    estimate = commands.paper_groups(ctx)[1][0]
    assert "--vocab" in estimate and "60000" in estimate
    proc = subprocess.run(estimate, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "paper.log").write_text(proc.stdout)
    r = verdicts.paper_verdict(ctx, [0, 0])
    assert r.status == "PASS", r.notes
    assert "151.2 ms/step" in r.notes[0] and "20.50 GiB" in r.notes[0]
    assert re.search(r"estimate .*: [\d.]+ GB without activations", r.notes[1])
    assert verdicts.paper_verdict(ctx, [0, 1]).status == "WARN"
    assert verdicts.paper_verdict(ctx, [1]).status == "FAIL"


def _target(name, value, target, higher, spread):
    met = (value * (1 - spread) > target) if higher else (value * (1 + spread) < target)
    return {"name": name, "value": value, "target": target, "higher_is_better": higher,
            "spread": spread, "met": met}  # fmt: skip


def test_a_speed_goal_passes_only_when_met_beyond_the_spread(tmp_path):
    """bench_train's ratio 0.76x against a 0.75x target, from steps 5% apart, is WARN with the
    figure; every target met beyond its spread is PASS; a benchmark that failed is FAIL."""
    ctx = _ctx(tmp_path)
    below = _target("12L_1mem / 12L_0mem, training (bf16)", 0.76, 0.75, True, 0.05)
    above = _target("12L_1mem / 24L_0mem, inference (bf16)", 1.62, 1.4, True, 0.03)
    rec = {"command": "c", "machine": "m", "figures": {"bf16": {"targets": [below, above]}}}
    (tmp_path / "bench_train.jsonl").write_text(json.dumps(rec) + "\n")
    r = speed_verdicts.bench_train_verdict(ctx, [0])
    assert r.status == "WARN"
    assert r.notes[0] == ("12L_1mem / 12L_0mem, training (bf16): 0.76x (spread 5%), "
                          "target >= 0.75x: not met")  # fmt: skip
    assert r.notes[1].endswith("target >= 1.4x: met") and r.notes[-1].startswith("1 of 2")
    rec["figures"]["bf16"]["targets"] = [above]
    (tmp_path / "bench_train.jsonl").write_text(json.dumps(rec) + "\n")
    assert speed_verdicts.bench_train_verdict(ctx, [0]).status == "PASS"
    assert speed_verdicts.bench_train_verdict(ctx, [0, 1]).status == "FAIL"
    assert speed_verdicts.bench_memory_verdict(ctx, [0]).notes == [
        "no record in bench_memory.jsonl"
    ]


def test_roofline_verdict_reads_the_records_the_script_wrote(tmp_path, capsys):
    ctx = _ctx(tmp_path)
    flags = ["--device", "cpu", "--bandwidth", "2900", "--tflops", "500", "--out", str(tmp_path)]
    perf_commands.roofline_main([*flags, "--forward-ms", "0.5"])  # 0.51x its floor
    r = speed_verdicts.roofline_verdict(ctx, [0])
    assert r.status == "PASS", r.notes
    assert r.notes[0].startswith("dim 512 fp32: floor forward 0.97 ms, training step 3.59 ms")
    perf_commands.roofline_main([*flags, "--step-ms", "19"])  # 5.3x its floor
    r = speed_verdicts.roofline_verdict(ctx, [0, 0])
    assert r.status == "WARN" and any("training step / floor: 5.29x" in n for n in r.notes)
    capsys.readouterr()


def test_profile_verdict_summarises_each_profile(tmp_path, capsys):
    perf_commands.profile_main(["--preset", "toy", "--device", "cpu", "--steps", "1",
                                "--out", str(tmp_path)])  # fmt: skip
    capsys.readouterr()
    r = speed_verdicts.profile_verdict(_ctx(tmp_path), [0])
    assert r.status == "PASS" and r.notes[-1] == "tables: profile.md"
    assert re.match(r"dim 32 fp32 training step: [\d.]+ ms CPU, 0 kernels, \d+ ops; ", r.notes[0])
    assert speed_verdicts.profile_verdict(_ctx(tmp_path), [0, 0]).status == "FAIL"
