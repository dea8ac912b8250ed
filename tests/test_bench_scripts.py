"""The benchmark scripts: the one machine line each prints (pkm_lm.perf.machine), and a tiny
bench_train run through its real command line."""

from __future__ import annotations

import builtins
import platform
import re
from pathlib import Path

import pytest
import torch

from pkm_lm.perf import machine

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
    """Each bench script uses machine.describe and keeps no copy of its own."""
    text = script.read_text()
    assert "from pkm_lm.perf.machine import" in text and "describe(" in text
    assert "/proc/cpuinfo" not in text and "getloadavg" not in text
