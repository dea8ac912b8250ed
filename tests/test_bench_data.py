"""scripts/bench_data.py through its real command line on the small fixture corpus: the tables
it prints are the ones it records, with the command and the machine line (the source that docs
quote for the data pipeline's speed)."""

import subprocess
import sys
from pathlib import Path

from pkm_lm.perf.records import read_records

ROOT = Path(__file__).resolve().parents[1]
RAW = Path(__file__).parent / "fixtures" / "data" / "raw"


def test_bench_data_prints_and_records(tmp_path):
    args = [
        "scripts/bench_data.py", "--raw", str(RAW), "--workers", "1", "--repeats", "1",
        "--n-codes", "100", "--loader-seconds", "0.05", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    (rec,) = read_records(tmp_path / "bench_data.jsonl")
    assert rec["command"].endswith(" ".join(args)) and rec["machine"].startswith("CPU")
    figures = rec["figures"]
    (row,) = figures["preprocess"]
    assert row["workers"] == 1 and set(row["step_mb_s"]) == {
        "moses",
        "learnbpe",
        "vocab",
        "binarize",
    }
    assert all(rate > 0 for rate in [*row["step_mb_s"].values(), row["end_to_end_mb_s"]])
    assert set(figures["moses_mb_s"]) == {"sacremoses as shipped", "pkm_lm.data.moses"}
    assert len(figures["loader_tokens_s"]) == 3 and min(figures["loader_tokens_s"].values()) > 0
    table = (tmp_path / "bench_data.md").read_text()
    assert table.startswith(f"$ {rec['command']}\n") and "| pkm_lm.data.moses |" in table
    assert table.split("\n", 2)[2].strip() in done.stdout
