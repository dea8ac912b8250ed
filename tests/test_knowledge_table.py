"""The facts experiments' drivers and tables: commands (dry runs) and the tables' cells."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pkm_lm import capacity, forgetting
from pkm_lm.capacity import Paths
from pkm_lm.data.corpus import FACTS_JSON
from pkm_lm.knowledge_table import write_capacity_report, write_finetune_report

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_hands_the_capacity_group_to_its_driver():
    out = subprocess.run(
        ["bash", "scripts/sweep.sh", "capacity", "--scale", "cpu", "--seeds", "2", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    ).stdout  # fmt: skip
    trains = [line.split() for line in out.splitlines() if "pkm_lm.train" in line]
    assert len(trains) == 3 * 3 * 2  # experiments x population sizes x seeds
    assert [
        "+experiment=cpu/capacity_2L_1mem",
        "run_dir=runs/cpu/capacity/capacity_2L_1mem_p400/seed1",
        "data.dir=data/bin/facts_cpu_400",
        "train.seed=1",
    ] in [t[3:7] for t in trains]
    assert out.count("recall runs/cpu/capacity/") == len(trains)


def write_records(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def facts(path, phrasing: str, acc: float, bits: float, values: int = 0) -> dict:
    params = {"all": 1000, "non_embedding": 500, "values": values}
    return {
        "kind": "facts", "split": f"facts_{phrasing}", "step": 10, "facts": str(path),
        "phrasing": phrasing, "accuracy_overall": acc, "bits": bits, "bits_max": 455.2,
        "params": params, "bits_per_param": {k: bits / v if v else None for k, v in params.items()},
    }  # fmt: skip


def test_capacity_table(tmp_path):
    paths = Paths("cpu", tmp_path / "runs")
    own = paths.raw(10) / FACTS_JSON
    results = {
        "capacity_2L": [(0.1, 20.0), (0.2, 30.0)],
        "capacity_2L_1mem": [(0.5, 200.0), (0.6, 220.0)],
    }
    for name, seeds in results.items():
        for seed, (acc, bits) in enumerate(seeds):
            values = 800 if "mem" in name else 0
            other = facts("elsewhere/facts.json", "heldout", 0.9, 400.0, values)  # not its own
            write_records(paths.run(name, 10, seed), [
                facts(own, "heldout", acc, bits, values), facts(own, "train", acc + 0.1, bits, values), other,
            ])  # fmt: skip
    names = ("capacity_2L", "capacity_2L_1mem", "capacity_4L")
    text = write_capacity_report("cpu", names, (10,), 2, paths, tmp_path / "out").read_text()
    assert "| 10 | 455 | L | 1,000 / 500 / 0 | 15.0 +- 7.1% | 25.0 +- 7.1% | 25.0 +- 7.1 |" in text
    assert "| 10 | 455 | L + 1 memory | 1,000 / 500 / 800 | 55.0 +- 7.1% |" in text
    assert "| 2.63e-01 +- 1.8e-02 | 2 |" in text  # bits per value parameter: 210 / 800
    assert "| 10 | L + 1 memory > L | +740.0% | holds | yes |" in text
    assert "2L >" not in text  # no 2L runs: no claim about them
    assert (tmp_path / "out" / "capacity.png").stat().st_size > 0


def test_finetune_table(tmp_path):
    paths = Paths("cpu", tmp_path / "runs")
    people = forgetting.PRETRAINED_PEOPLE["cpu"]
    new, old = Path(f"{paths.raw(people)}_b") / FACTS_JSON, paths.raw(people) / FACTS_JSON
    old_valid = {"kind": "eval", "split": forgetting.OLD_VALID, "step": 10, "ppl": 40.0}
    pretrained = paths.run(forgetting.PRETRAINED, people, 0)
    write_records(pretrained, [facts(new, p, 0.0, 0) for p in ("heldout", "train")]
                  + [facts(old, p, 0.5, 100) for p in ("heldout", "train")] + [old_valid])  # fmt: skip
    finetuned = tmp_path / "ft" / "all" / "seed0"
    write_records(finetuned, [facts(new, p, 0.8, 300) for p in ("heldout", "train")]
                  + [facts(old, p, 0.1, 10) for p in ("heldout", "train")]
                  + [{**old_valid, "ppl": 90.0}])  # fmt: skip
    (finetuned / "finetune.json").write_text(json.dumps({"trained_params": 1000}))
    text = write_finetune_report("cpu", ["all", "memory"], 1, paths, tmp_path / "ft", tmp_path)
    rows = [line for line in text.read_text().splitlines() if line.startswith("| ")][1:]
    assert rows == [
        "| pretrained (before) | - | 0.0% | 0.0% | 50.0% | 50.0% | - | 40.0 | 1 |",
        "| all | 1,000 | 80.0% | 80.0% | 10.0% | 10.0% | 80.0% | 90.0 | 1 |",
    ]  # memory: not run, no row


@pytest.mark.parametrize("module", [capacity, forgetting])
def test_bad_arguments(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--scale", "paper"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: capacity does not run at --scale paper")
