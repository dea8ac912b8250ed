"""The capacity group: how many facts L layers, L + 1 memory and 2L layers store, at several
population sizes and a fixed number of exposures per fact.

    python -m pkm_lm.capacity --scale cpu --seeds 3 [--parallel N] [--dry-run]
    scripts/sweep.sh capacity --scale cpu --seeds 3          # the same

Per population size it builds a facts corpus (``pkm_lm.data.corpus facts``: every fact stated
``repetitions`` times) and preprocesses it with the vocabulary of the largest (so every model of
a scale has the same embedding); every experiment trains one pass over it (each fact read exactly
``repetitions`` times), then ``pkm_lm.recall`` scores it in both phrasings. The table and plot
go to ``results/SCALE/capacity.md`` and ``capacity.png``. Rerunning resumes and skips what is done.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from pkm_lm import cli
from pkm_lm.experiments import CAPACITY_PEOPLE, experiments
from pkm_lm.knowledge_table import write_capacity_report
from pkm_lm.recall import PHRASINGS, recall_run

ROOT = Path(__file__).resolve().parents[1]
REPETITIONS = {"cpu": 30, "gpu": 100}  # exposures per fact
BPE_CODES = 3000  # the pools' ~1,600 words and the templates' become whole tokens


@dataclass(frozen=True)
class Paths:
    scale: str
    runs: Path

    def raw(self, people: int) -> Path:
        return Path("data/raw") / f"facts_{self.scale}_{people}"

    def data(self, people: int) -> Path:
        return Path("data/bin") / f"facts_{self.scale}_{people}"

    def run(self, name: str, people: int, seed: int) -> Path:
        return self.runs / f"{name}_p{people}" / f"seed{seed}"


def run_command(cmd: list[str], dry_run: bool, log: Path | None = None) -> None:
    print(" ".join(map(str, cmd)), flush=True)
    if dry_run:
        return
    if log is None:
        subprocess.run(cmd, check=True)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def prepare_data(paths: Paths, sizes: tuple[int, ...], dry_run: bool, populations=("a",)) -> None:
    """Each size's corpus and shards, the largest first (the others take its vocabulary)."""
    largest = max(sizes)
    for people in sorted(sizes, reverse=True):
        for population in populations:
            suffix = "" if population == "a" else "_b"
            raw, data = Path(f"{paths.raw(people)}{suffix}"), Path(f"{paths.data(people)}{suffix}")
            if (data / "dataset.json").is_file():
                continue
            repetitions = REPETITIONS[paths.scale]
            py = sys.executable
            corpus = [py, "-m", "pkm_lm.data.corpus", "facts", f"--people={people}"]
            corpus += [f"--population={population}", f"--repetitions={repetitions}", f"--out={raw}"]
            run_command(corpus, dry_run)
            prep = [py, "-m", "pkm_lm.preprocess", f"raw_dir={raw}", f"out_dir={data}"]
            if paths.scale == "cpu":
                prep.append("workers=1")  # small corpora, shared cores
            if people != largest or population != "a":
                prep.append(f"vocab_from={paths.data(largest)}")
            else:
                prep.append(f"bpe.n_codes={BPE_CODES}")
            run_command(prep, dry_run)


def one_pass_steps(data: Path, scale: str) -> int | str:
    """Optimizer steps of one pass over the training split (TokenStream's epoch)."""
    if not (data / "dataset.json").is_file():
        return "ONE_PASS"  # a dry run before the data exists
    from pkm_lm.data import load_manifest

    cfg = OmegaConf.load(ROOT / "configs" / "scale" / f"facts_{scale}.yaml")
    tokens = load_manifest(data)["splits"]["train"]["tokens"]
    return (tokens - 1) // cfg.data.seq_len // cfg.train.batch_size


def recall_all(run_dir: Path, dry_run: bool) -> None:
    """Both phrasings' recall records at the run's last step (in this process)."""
    print(f"recall {run_dir} ({', '.join(PHRASINGS)})", flush=True)
    if not dry_run:
        for phrasing in PHRASINGS:
            recall_run(run_dir, phrasing, again=False)


def train_job(paths: Paths, name: str, people: int, seed: int, dry_run: bool) -> None:
    run_dir = paths.run(name, people, seed)
    cmd = [
        sys.executable, "-m", "pkm_lm.train", f"+experiment={paths.scale}/{name}",
        f"run_dir={run_dir}", f"data.dir={paths.data(people)}", f"train.seed={seed}",
        f"train.max_steps={one_pass_steps(paths.data(people), paths.scale)}",
    ]  # fmt: skip
    run_command(
        cmd, dry_run, None if dry_run else paths.runs / "logs" / f"{run_dir.parent.name}_{seed}.log"
    )
    recall_all(run_dir, dry_run)


def sweep(scale: str, seeds: int, parallel: int, runs: Path, out: Path, dry_run: bool) -> None:
    names = experiments("capacity", scale)
    sizes = CAPACITY_PEOPLE[scale]
    paths = Paths(scale, runs)
    prepare_data(paths, sizes, dry_run)
    jobs = [(name, people, seed) for seed in range(seeds) for people in sizes for name in names]
    if scale in ("cpu",):
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # small models: one thread per run
    with ThreadPoolExecutor(1 if dry_run else parallel) as pool:
        for future in [pool.submit(train_job, paths, *job, dry_run) for job in jobs]:
            future.result()
    if not dry_run:
        write_capacity_report(scale, names, sizes, seeds, paths, out)


@cli.main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pkm_lm.capacity", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--runs", default=None, help="default runs/SCALE/capacity")
    parser.add_argument("--out", default=None, help="default results/SCALE")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    experiments("capacity", args.scale)  # checks the scale, naming the allowed ones
    for key in ("seeds", "parallel"):
        if getattr(args, key) < 1:
            raise cli.UserError(f"--{key}={getattr(args, key)} is invalid: must be >= 1")
    runs = Path(args.runs or f"runs/{args.scale}/capacity")
    out = Path(args.out or f"results/{args.scale}")
    sweep(args.scale, args.seeds, args.parallel, runs, out, args.dry_run)


if __name__ == "__main__":
    main(sys.argv[1:])
