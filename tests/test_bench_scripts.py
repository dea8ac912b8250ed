"""The benchmark scripts: the one machine line each prints (pkm_lm.perf.machine), and a tiny
bench_train run through its real command line."""

from __future__ import annotations

import builtins
import platform
import re
from pathlib import Path

import pytest
import torch

from pkm_lm.perf import machine, train_speed
from pkm_lm.perf.records import read_records

ROOT = Path(__file__).resolve().parents[1]

LOAD = re.compile(r"load average (\d+\.\d\d) (\d+\.\d\d) (\d+\.\d\d)")


def cpu_from_proc() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    names = re.findall(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    return names[0].strip() if names else None


def test_description_names_cpu_threads_and_load():
    line = machine.describe()
    cpu = cpu_from_proc() or platform.processor() or platform.machine()
    assert cpu and f"CPU {cpu} " in line
    assert f"{torch.get_num_threads()} threads" in line
    assert LOAD.search(line), line
    assert f"torch {torch.__version__}" in line
    assert ("GPU " in machine.describe("cuda")) == torch.cuda.is_available()
    assert "GPU " not in line


def test_cpu_model_without_proc_cpuinfo(monkeypatch):
    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    assert machine.cpu_model() == (platform.processor() or platform.machine() or "unknown CPU")


@pytest.mark.parametrize(
    "script", sorted((ROOT / "scripts").glob("bench_*.py")), ids=lambda p: p.name
)
def test_every_benchmark_prints_the_shared_description(script):
    """Each bench script (or the pkm_lm.perf module it runs) uses machine.describe and keeps
    no copy of its own."""
    text = script.read_text()
    if entry := re.search(r"^from pkm_lm\.perf\.(\w+) import main$", text, re.M):
        text = (ROOT / "pkm_lm" / "perf" / f"{entry.group(1)}.py").read_text()
    assert re.search(r"^from (pkm_lm\.perf|)\.machine import", text, re.M), script.name
    assert "describe(" in text
    assert "/proc/cpuinfo" not in text and "getloadavg" not in text


def test_bench_train_tiny_run_prints_and_records_both_precisions(tmp_path, capsys):
    """The flags' three models at toy sizes through the trainer's step, fp32 and bf16."""
    train_speed.main(
        "--dim 16 --heads 2 --layers 1 --n-keys 32 --vocab 50 --batch 2 --seq-len 8 --steps 2 "
        f"--warmup 1 --nproc 1 --precision fp32 bf16 --infer-values float32 bfloat16 "
        f"--out {tmp_path}".split()
    )
    out = capsys.readouterr().out
    assert "### fp32" in out and "### bf16" in out and "| 2 layers | " in out
    assert re.search(r"/ 1 layers, training \(bf16\): [\d.]+x \(spread \d+%\), target >= 0.8x", out)
    assert (tmp_path / "bench_train.md").read_text().endswith(out.strip() + "\n")
    (rec,) = read_records(tmp_path / "bench_train.jsonl")
    assert rec["command"].endswith("--out " + str(tmp_path)) and rec["machine"].startswith("CPU")
    for precision in ("fp32", "bf16"):
        fig = rec["figures"][precision]
        assert set(fig["infer"]) == {"float32", "bfloat16"} and len(fig["train"]) == 3
        assert set(fig["train"]) == set(fig["infer"]["bfloat16"])
        assert all(r["tok_s"] > 0 and r["peak_gib"] is None for r in fig["train"].values())
        assert [t["higher_is_better"] for t in fig["targets"]] == [True, True, True]
        assert fig["targets"][2]["name"].endswith(f"inference ({precision}, bfloat16 values)")


def test_bench_train_paper_preset_composes_the_paper_experiments():
    args = train_speed.parse_args(["--preset", "paper", "--steps", "3"])
    assert args.steps == 3 and args.warmup == 5 and args.precision == ["bf16", "fp16"]
    assert (args.train_target, args.infer_target, args.device) == (0.75, 1.4, "cuda")
    assert args.infer_values == ["float32", "bfloat16"]
    rows = train_speed.experiment_configs(args, "fp16")
    assert [name for name, _ in rows] == ["12L_0mem", "12L_1mem", "24L_0mem"]
    for name, cfg in rows:
        assert (cfg.model.dim, cfg.model.vocab_size, cfg.data.seq_len) == (1024, 60_000, 256)
        assert (cfg.train.batch_size, cfg.train.micro_batch_size) == (32, 32)
        assert cfg.train.precision == "fp16" and cfg.train.device == "cuda"
        assert cfg.model.n_layers == int(name[:2])
        assert len(cfg.model.memory_layers) == int(name[4])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "1"], "error: --steps=1: must be >= 2 (the spread needs two)"),
        (["--override", "train.compile=true"], "error: --override applies to --experiments"),
        (["--device", "cuda", "--nproc", "1", "2"], "error: --nproc > 1 runs gloo processes"),
    ],
)
def test_bench_train_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_speed.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1
