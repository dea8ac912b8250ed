"""The finetuning experiment: a pretrained memory model learns a second population; how much of
the first does it forget, training everything, every memory value, or only the top-T slots?

    python -m pkm_lm.forgetting --scale cpu --seeds 3 [--dry-run]

The pretrained models are the capacity group's L + 1 memory runs at ``PRETRAINED_PEOPLE``
(``python -m pkm_lm.capacity`` trains them); the new data is population b of the same size
(every fact ``repetitions`` times, preprocessed with the pretrained vocabulary). Each finetuning
is one pass over it with the pretrained run's optimiser settings. Scored after it: recall of the
new and the old facts (both phrasings) and the perplexity on the old data's validation split
(the old facts in their held-out phrasing). Table: ``results/SCALE/finetune.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pkm_lm import cli
from pkm_lm.capacity import Paths, one_pass_steps, prepare_data, run_command
from pkm_lm.checkpoint import load_run, read_run_config
from pkm_lm.data import open_split
from pkm_lm.data.corpus import FACTS_JSON
from pkm_lm.distributed import init_distributed
from pkm_lm.evaluate import evaluate_split
from pkm_lm.experiments import experiments
from pkm_lm.knowledge_table import write_finetune_report
from pkm_lm.metrics import MetricLogger, read_metrics
from pkm_lm.recall import PHRASINGS, recall_run

PRETRAINED = "capacity_2L_1mem"
PRETRAINED_PEOPLE = {"cpu": 200, "gpu": 5000}
TOP_SLOTS = {"cpu": (64, 256, 1024), "gpu": (256, 1024, 4096)}
OLD_VALID = "valid_old"  # the metrics split of the perplexity on the pretraining valid split


# The largest top-T again with the values' learning rate times this: a few rows trained at the
# pretraining's rate barely move (Lin et al. tune the rate per method).
FAST_VALUES = 10


def modes(scale: str) -> list[tuple[str, str, int | None, int]]:
    """(label, finetune.trainable, finetune.top_slots, value lr multiplier) of each finetuning."""
    top = [(f"top_{t}", "top_slots", t, 1) for t in TOP_SLOTS[scale]]
    t = TOP_SLOTS[scale][-1]
    fast = (f"top_{t}_lr{FAST_VALUES}x", "top_slots", t, FAST_VALUES)
    return [("all", "all", None, 1), ("memory", "memory", None, 1), *top, fast]


def score(run_dir: Path, new_raw: Path, old_raw: Path, old_data: Path, dry_run: bool) -> None:
    """New- and old-fact recall and the old validation perplexity, unless already recorded."""
    print(f"score {run_dir}: recall of new and old facts, {OLD_VALID} perplexity", flush=True)
    if dry_run:
        return
    for raw in (new_raw, old_raw):
        for phrasing in PHRASINGS:
            recall_run(run_dir, phrasing, facts=raw / FACTS_JSON, again=False)
    records = read_metrics(run_dir)
    last = max(r["step"] for r in records if r["kind"] == "facts")
    if any(r["kind"] == "eval" and r["split"] == OLD_VALID and r["step"] == last for r in records):
        return
    env = init_distributed(device="cpu")
    model, cfg, state = load_run(run_dir, env.device)
    tokens = open_split(old_data, "valid")
    result = evaluate_split(model, tokens, cfg.data.seq_len, cfg.train.batch_size, env, "fp32")
    record = {"kind": "eval", "split": OLD_VALID, "step": state["step"], "tokens": 0, **result}
    MetricLogger(run_dir).log(record, f"{run_dir}: {OLD_VALID} perplexity {result['ppl']:.2f}")


def sweep(scale: str, seeds: int, runs: Path, capacity_runs: Path, out: Path, dry_run: bool):
    people = PRETRAINED_PEOPLE[scale]
    paths = Paths(scale, capacity_runs)
    prepare_data(paths, (people,), dry_run, populations=("b",))
    new_data, new_raw = Path(f"{paths.data(people)}_b"), Path(f"{paths.raw(people)}_b")
    scored = (new_raw, paths.raw(people), paths.data(people), dry_run)
    steps = one_pass_steps(new_data, scale)
    for seed in range(seeds):
        pretrained = paths.run(PRETRAINED, people, seed)
        score(pretrained, *scored)
        trained = (pretrained / "config.yaml").is_file()
        value_lr = read_run_config(pretrained).optim.value_lr if trained else None
        for label, trainable, top, lr_scale in modes(scale):
            out_dir = runs / label / f"seed{seed}"
            cmd = [
                sys.executable, "-m", "pkm_lm.finetune", f"run_dir={pretrained}",
                f"data.dir={new_data}", f"out_dir={out_dir}", f"finetune.trainable={trainable}",
                f"train.max_steps={steps}", f"train.eval_interval={steps}",
                f"train.checkpoint_interval={steps}",
            ]  # fmt: skip
            if top is not None:
                cmd.append(f"finetune.top_slots={top}")
            if lr_scale != 1:  # a dry run before pretraining names the rule
                lr = f"{value_lr * lr_scale:g}" if value_lr else f"<pretrained x {lr_scale}>"
                cmd.append(f"optim.value_lr={lr}")
            run_command(cmd, dry_run, None if dry_run else runs / "logs" / f"{label}_{seed}.log")
            score(out_dir, *scored)
    if not dry_run:
        write_finetune_report(scale, [m[0] for m in modes(scale)], seeds, paths, runs, out)


@cli.main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pkm_lm.forgetting", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--runs", default=None, help="default runs/SCALE/finetune")
    parser.add_argument("--capacity-runs", default=None, help="default runs/SCALE/capacity")
    parser.add_argument("--out", default=None, help="default results/SCALE")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    experiments("capacity", args.scale)  # the pretrained runs' group: checks the scale
    if args.seeds < 1:
        raise cli.UserError(f"--seeds={args.seeds} is invalid: must be >= 1")
    runs = Path(args.runs or f"runs/{args.scale}/finetune")
    capacity_runs = Path(args.capacity_runs or f"runs/{args.scale}/capacity")
    out = Path(args.out or f"results/{args.scale}")
    sweep(args.scale, args.seeds, runs, capacity_runs, out, args.dry_run)


if __name__ == "__main__":
    main(sys.argv[1:])
