"""How much a model's outputs at positions <= t depend on the tokens after t (a causal LM: none).

    python -m pkm_lm.causality RUN_DIR [RUN_DIR ...] [--out results/tiny/querynorm_leak.md]

Query BatchNorm in training mode normalises with the statistics of the whole batch, later
positions included, so it leaks the future into every position; in evaluation it uses its
running statistics and does not. For each run this measures, on a batch of its test split the
size of a training batch, the largest change of a log-probability at positions <= t when every
token after t = seq_len / 2 is replaced, in training mode (dropout masks drawn alike for both
passes) and in evaluation mode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from pkm_lm import cli
from pkm_lm.atomic import atomic_write_text
from pkm_lm.checkpoint import load_run
from pkm_lm.data.loader import open_split


@torch.no_grad()
def future_leak(
    model: nn.Module, tokens: torch.Tensor, t: int, training: bool
) -> tuple[float, float]:
    """How much log p(. | tokens) at the positions <= t moves when every token after t is
    replaced; ``tokens`` (B, T). (the largest change over those positions, the vocabulary and the
    batch; the mean change of the next token's log-probability at positions < t, whose next token
    is unchanged): (0.0, 0.0) for a causal model.

    The model runs in training mode (``training``) or evaluation mode, on copies of its buffers
    (BatchNorm's running statistics stay as they were); both passes draw the same dropout masks.
    """
    changed = tokens.clone()
    vocab = model.cfg.vocab_size
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(tokens.shape[1] - t - 1)) % vocab
    buffers = [(b, b.clone()) for b in model.buffers()]
    was_training = model.training
    model.train(training)
    outputs = []
    for batch in (tokens, changed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outputs.append(torch.log_softmax(model(batch)[:, : t + 1].double(), -1))
    model.train(was_training)
    for buffer, saved in buffers:
        buffer.copy_(saved)
    change = (outputs[0] - outputs[1]).abs()  # (B, t + 1, vocab)
    next_token = change[:, :t].gather(-1, tokens[:, 1 : t + 1, None])
    return change.max().item(), next_token.mean().item() if t else 0.0


def measure(run_dir: str | Path) -> dict:
    """The leak of a run's newest checkpoint, in training and evaluation mode."""
    model, cfg, state = load_run(run_dir)
    seq_len, rows = cfg.data.seq_len, cfg.train.batch_size
    test = open_split(cfg.data.dir, "test")
    n = min(rows, len(test) // seq_len)
    tokens = torch.as_tensor(test[: n * seq_len].astype("int64")).view(n, seq_len)
    t = seq_len // 2
    return {
        "run": str(run_dir),
        "query_norm": cfg.model.memory.query_norm,
        "batch": f"{n} x {seq_len}",
        "step": state["step"],
        "train": future_leak(model, tokens, t, training=True),
        "eval": future_leak(model, tokens, t, training=False),
    }


def _cell(leak: tuple[float, float]) -> str:
    return f"{leak[0]:.3g} / {leak[1]:.3g}"


def report(rows: list[dict]) -> str:
    lines = [
        "# Future leak of the query norm",
        "",
        "How much the log-probabilities at positions <= t move (nats) when every token after",
        "t = seq_len / 2 is replaced, on a test batch the size of a training batch: the largest",
        "change over the positions, the vocabulary and the batch / the mean change of the next",
        "token's log-probability at positions < t (whose next token is unchanged). 0 / 0 for a",
        "causal model. Written by `python -m pkm_lm.causality RUN_DIR ...`.",
        "",
        "| run | query norm | step | batch | training mode | evaluation mode |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['run']} | {r['query_norm']} | {r['step']} | {r['batch']} | {_cell(r['train'])} "
        f"| {_cell(r['eval'])} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


@cli.main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pkm_lm.causality", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", help="training run directories")
    parser.add_argument("--out", help="write the markdown table here (default: print it)")
    args = parser.parse_args(argv)
    text = report([measure(run) for run in args.runs])
    if args.out:
        atomic_write_text(Path(args.out), text)
    print(text, end="")


if __name__ == "__main__":
    main(sys.argv[1:])
