"""Fact recall: how many of a synthetic population's facts a trained run completes, in bits.

    python -m pkm_lm.recall run_dir=runs/facts [facts=data/raw/facts/facts.json] [phrasing=heldout]

For every person and attribute of ``facts.json`` (``python -m pkm_lm.data.corpus facts``) the
prompt is the attribute's phrasing up to the value ("Steasoum Donoulil's birthplace is"), after a
``</s>`` as every line starts in training; the fact is recalled when greedy decoding produces the
value's tokens exactly. ``phrasing=heldout`` (default) prompts with the phrasing kept out of the
training text, ``phrasing=train`` with the first phrasing the training text used (memorisation alone).

Knowledge in bits: the sum over attributes of people x entropy x accuracy above chance,
``N * H_a * max(0, (acc_a - chance_a) / (1 - chance_a))``, where ``H_a = log2(pool size)`` (0 for
the employer's city, a function of the employer) and ``chance_a`` is the accuracy of always
answering the population's most frequent value. With uniform pools this is Allen-Zhu & Li's
accuracy-weighted entropy, less what guessing gets. Divided by the parameters (all, all but the
token and position embeddings, and the memory value tables), it is bits per parameter.
The result is printed and appended to ``run_dir/metrics.jsonl`` as a ``{"kind": "facts"}`` record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pkm_lm import cli
from pkm_lm.checkpoint import load_run, read_run_config
from pkm_lm.data import Vocabulary, load_manifest
from pkm_lm.data.corpus import FACTS_JSON
from pkm_lm.data.facts import ATTRIBUTES
from pkm_lm.distributed import resolve_device
from pkm_lm.errors import DataError, NotFoundError, check_choice, check_positive
from pkm_lm.metrics import MetricLogger, read_metrics
from pkm_lm.model import TransformerLM
from pkm_lm.precision import autocast

PHRASINGS = ("heldout", "train")


@dataclass
class RecallConfig:
    run_dir: str = "???"
    facts: str | None = None  # None: facts.json beside the raw text of the run's data.dir
    phrasing: str = "heldout"
    batch_size: int = 256  # prompts per forward
    checkpoint: str | None = None  # None: the run's newest complete checkpoint
    device: str | None = None  # auto, cpu or cuda; None: the run's train.device

    def __post_init__(self) -> None:
        check_choice("phrasing", self.phrasing, PHRASINGS)
        check_positive("batch_size", self.batch_size)
        check_choice("device", self.device, (None, "auto", "cpu", "cuda"))


ConfigStore.instance().store(name="base_recall", node=RecallConfig)


def facts_path(data_dir: str | Path) -> Path:
    """facts.json of the raw corpus a dataset was preprocessed from."""
    raw_dir = load_manifest(data_dir)["settings"]["raw_dir"]
    path = Path(raw_dir) / FACTS_JSON
    if not path.is_file():
        raise NotFoundError(
            f"{path} not found: was {data_dir} made from a facts corpus? Set facts="
        )
    return path


def read_facts(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"facts={path} does not exist")
    index = json.loads(path.read_text(encoding="utf-8"))
    if set(index.get("attributes", ())) != {a.name for a in ATTRIBUTES}:
        raise DataError(f"facts={path} is not a facts.json of python -m pkm_lm.data.corpus facts")
    return index


def phrasing_template(attribute: dict, phrasing: str, templates: int) -> str:
    """The held-out phrasing, or the first of the ``templates`` the training text used."""
    if phrasing == "heldout":
        return attribute["heldout"]
    return attribute["templates"][-templates]


def encode_facts(index: dict, vocab: Vocabulary, phrasing: str) -> list[tuple[str, list, list]]:
    """(attribute, prompt ids, value ids) of every fact; the prompt starts with ``</s>``."""
    items = []
    for name, attribute in index["attributes"].items():
        used = index["settings"]["templates"]
        head = phrasing_template(attribute, phrasing, used).split("{value}")[0]
        for person in index["people"]:
            prompt = head.format(name=person["name"]).rstrip()
            prompt_ids = [vocab.eos_index] + vocab.encode(prompt)
            full = [vocab.eos_index] + vocab.encode(f"{prompt} {person[name]}")
            if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
                raise DataError(f"{prompt!r}: its tokens are not a prefix of the statement's")
            items.append((name, prompt_ids, full[len(prompt_ids) :]))
    return items


@torch.no_grad()
def recalled(
    model: TransformerLM, items: list, batch_size: int, precision: str = "fp32"
) -> list[bool]:
    """Whether greedy decoding after each prompt yields its value's tokens.

    Computed in one forward per prompt: greedy decoding yields the value exactly when, with the
    value's tokens as context, the argmax at every value position is the next value token.
    Sequences are right-padded (a causal model's outputs before the padding do not see it).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i][1]) + len(items[i][2]))
    out = [False] * len(items)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        seqs = [items[i][1] + items[i][2] for i in chunk]
        width = max(map(len, seqs))
        batch = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            batch[row, : len(seq)] = torch.tensor(seq)
        with autocast(device, precision):
            predicted = model(batch.to(device)).argmax(-1).cpu()
        for row, i in enumerate(chunk):
            start, value = len(items[i][1]), items[i][2]
            guess = predicted[row, start - 1 : start - 1 + len(value)]
            out[i] = guess.tolist() == value
    model.train(was_training)
    return out


def knowledge(index: dict, items: list, correct: list[bool], model: TransformerLM) -> dict:
    """Accuracy per attribute and overall, knowledge in bits, and bits per parameter."""
    n = len(index["people"])
    accuracy, bits = {}, 0.0
    for name, attribute in index["attributes"].items():
        hits = [ok for (a, _, _), ok in zip(items, correct, strict=True) if a == name]
        accuracy[name] = sum(hits) / len(hits)
        chance = attribute["chance_accuracy"]
        above = max(0.0, (accuracy[name] - chance) / (1.0 - chance)) if chance < 1 else 0.0
        bits += n * attribute["entropy_bits"] * above
    embedding = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    params = {
        "all": model.num_params(),
        "non_embedding": model.num_params() - embedding,
        "values": sum(p.numel() for p in model.value_parameters()),
    }
    return {
        "people": n,
        "accuracy": accuracy,
        "accuracy_overall": sum(correct) / len(correct),
        "bits": bits,
        "bits_max": n * sum(a["entropy_bits"] for a in index["attributes"].values()),
        "params": params,
        "bits_per_param": {k: bits / v if v else None for k, v in params.items()},
    }


def format_line(rec: dict) -> str:
    per = " ".join(f"{k} {100 * v:.1f}%" for k, v in rec["accuracy"].items())
    per_param = rec["bits_per_param"]["all"]
    return (
        f"facts ({rec['phrasing']} phrasing) @ step {rec['step']} | recall "
        f"{100 * rec['accuracy_overall']:.1f}% ({per}) | {rec['bits']:.0f} of "
        f"{rec['bits_max']:.0f} bits | {per_param:.2e} bits/param"
    )


def run_recall(
    model: TransformerLM, vocab: Vocabulary, index: dict, phrasing: str, batch_size: int, precision
) -> dict:
    items = encode_facts(index, vocab, phrasing)
    return knowledge(index, items, recalled(model, items, batch_size, precision), model)


def recall_run(
    run_dir: str | Path,
    phrasing: str = "heldout",
    facts: str | Path | None = None,
    batch_size: int = 256,
    checkpoint: str | None = None,
    device: str | None = None,
    again: bool = True,
) -> dict:
    """Score a run's recall, append the record to its metrics.jsonl and return it; with
    ``again=False`` a run that already has this record at its checkpoint's step is not redone."""
    run_cfg = read_run_config(run_dir)
    path = Path(facts) if facts else facts_path(run_cfg.data.dir)
    model, cfg, state = load_run(
        run_dir, resolve_device(device or run_cfg.train.device), checkpoint
    )
    split = f"facts_{phrasing}"
    done = [
        r
        for r in read_metrics(run_dir)
        if r["kind"] == "facts" and r["split"] == split and r["step"] == state["step"]
        and r["facts"] == str(path)
    ]  # fmt: skip
    if done and not again:
        return done[-1]
    index = read_facts(path)
    vocab = Vocabulary.load(cfg.data.dir)
    step = state["step"]
    record = {
        "kind": "facts",
        "split": split,
        "step": step,
        "tokens": step * cfg.train.batch_size * cfg.data.seq_len,
        "facts": str(path),
        "phrasing": phrasing,
        **run_recall(model, vocab, index, phrasing, batch_size, cfg.train.precision),
    }
    MetricLogger(run_dir).log(record, format_line(record))
    return record


@cli.hydra_main("recall")
def main(dcfg: DictConfig) -> None:
    r: RecallConfig = OmegaConf.to_object(dcfg)
    recall_run(r.run_dir, r.phrasing, r.facts, r.batch_size, r.checkpoint, r.device)


if __name__ == "__main__":
    main()
