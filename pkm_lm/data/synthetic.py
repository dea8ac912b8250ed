"""A made-up corpus with Zipf word frequencies and bigram structure, for checks on machines that
have neither a network nor a corpus (a GPU node), and for tests.

    python -m pkm_lm.data.synthetic text --out data/raw/synthetic --words 400000
    python -m pkm_lm.data.synthetic ids --out data/bin/ids60k --vocab 60000 --tokens 2000000

Words are built from syllables, so a subword tokenizer has pieces to learn. Each word follows
its predecessor from a short list of favourite successors half of the time and is drawn from the
Zipf unigram distribution otherwise: a language model's perplexity falls well below the
unigram's as it learns the bigrams, and a memory layer has many (context -> next word) facts to
store. The same seed gives the same text.

``ids`` skips text and tokenizer: Zipf-distributed token ids at any vocabulary size (the paper's
60k) written by the real shard writer with a complete manifest, for training and speed checks
at full width (not for ``generate``, which needs a tokenizer).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from pkm_lm.atomic import atomic_write_text

from .manifest import SPECIAL, SPLITS, write_manifest
from .shards import ShardWriter, dtype_for_vocab

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def make_words(n_types: int, rng: np.random.Generator) -> list[str]:
    """``n_types`` distinct words of 1-4 syllables."""
    words: dict[str, None] = {}
    while len(words) < n_types:
        n = int(rng.integers(1, 5))
        words["".join(rng.choice(_SYLLABLES, n))] = None
    return list(words)


def zipf_text(
    n_words: int,
    n_types: int = 4000,
    exponent: float = 1.1,
    successors: int = 4,
    follow: float = 0.5,
    seed: int = 0,
) -> list[str]:
    """Sentences (one per line, 5-20 words, capitalised, full stop) of about ``n_words`` words."""
    rng = np.random.default_rng(seed)
    words = make_words(n_types, rng)
    unigram = 1.0 / np.arange(1, n_types + 1) ** exponent
    unigram /= unigram.sum()
    favourites = rng.choice(n_types, size=(n_types, successors), p=unigram)
    draws = rng.choice(n_types, size=n_words, p=unigram)  # used when not following
    follows = rng.random(n_words) < follow
    picks = rng.integers(0, successors, n_words)
    ids = np.empty(n_words, dtype=np.int64)
    prev = draws[0]
    for i in range(n_words):  # a Markov chain: sequential by nature, ~1 s per million words
        prev = favourites[prev, picks[i]] if follows[i] else draws[i]
        ids[i] = prev
    lengths = rng.integers(5, 21, size=n_words // 5 + 1)
    bounds = np.cumsum(lengths)
    lines = []
    for start, end in zip(np.r_[0, bounds[:-1]], bounds, strict=True):
        if start >= n_words:
            break
        sentence = " ".join(words[j] for j in ids[start:end])
        lines.append(sentence[:1].upper() + sentence[1:] + ".")
    return lines


def write_zipf_corpus(
    out_dir: str | os.PathLike,
    train_words: int = 400_000,
    heldout_words: int = 20_000,
    seed: int = 0,
) -> dict[str, int]:
    """``train.txt``, ``valid.txt``, ``test.txt`` of one text stream (the held-out splits come
    from the same distribution); returns the lines per split."""
    total = train_words + 2 * heldout_words
    lines = zipf_text(total, seed=seed)
    counts = [len(lines) * n // total for n in (train_words, heldout_words)]
    cuts = {"train": (0, counts[0]), "valid": (counts[0], counts[0] + counts[1])}
    cuts["test"] = (cuts["valid"][1], len(lines))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        a, b = cuts[split]
        atomic_write_text(out / f"{split}.txt", "\n".join(lines[a:b]) + "\n")
    return {split: b - a for split, (a, b) in cuts.items()}


def write_zipf_ids(
    out_dir: str | os.PathLike, vocab_size: int, train_tokens: int, seed: int = 0
) -> dict:
    """A preprocessed dataset of Zipf-distributed ids (no tokenizer); returns its manifest.
    valid and test get 5% of ``train_tokens`` each."""
    rng = np.random.default_rng(seed)
    n_special = len(SPECIAL)
    probs = 1.0 / np.arange(1, vocab_size - n_special + 1) ** 1.1
    probs /= probs.sum()
    dtype = dtype_for_vocab(vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in SPLITS:
        n = train_tokens if split == "train" else max(train_tokens // 20, 1)
        writer = ShardWriter(out / f"{split}.00000.bin", dtype)
        writer.write(rng.choice(vocab_size - n_special, size=n, p=probs) + n_special)
        shard = writer.close()
        splits[split] = {"shards": [shard], "tokens": n, "lines": 0, "unk": 0}
    manifest = {
        "complete": True,
        "format_version": 1,
        "tokenizer": None,
        "vocab_size": vocab_size,
        "dtype": dtype,
        "special": dict(SPECIAL),
        "files": {},
        "splits": splits,
        "settings": {"synthetic": "zipf ids", "seed": seed},
    }
    write_manifest(out, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("text", help="raw train/valid/test.txt for `python -m pkm_lm.preprocess`")
    t.add_argument("--out", default="data/raw/synthetic")
    t.add_argument("--words", type=int, default=400_000, help="training words")
    t.add_argument("--heldout", type=int, default=20_000, help="words each for valid and test")
    i = sub.add_parser("ids", help="a preprocessed dataset of token ids (no tokenizer)")
    i.add_argument("--out", default="data/bin/synthetic_ids")
    i.add_argument("--vocab", type=int, default=60_000, help="vocabulary size (> 4)")
    i.add_argument("--tokens", type=int, default=2_000_000, help="training tokens")
    for q in (t, i):
        q.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes = ("words", "heldout") if args.kind == "text" else ("tokens", "vocab")
    for name in sizes:
        if getattr(args, name) <= (len(SPECIAL) if name == "vocab" else 0):
            p.error(f"--{name}={getattr(args, name)} is too small")
    if args.kind == "text":
        lines = write_zipf_corpus(args.out, args.words, args.heldout, args.seed)
        print(f"{args.out}: " + ", ".join(f"{s} {n} lines" for s, n in lines.items()))
    else:
        m = write_zipf_ids(args.out, args.vocab, args.tokens, args.seed)
        tokens = ", ".join(f"{s} {v['tokens']} tokens" for s, v in m["splits"].items())
        print(f"{args.out}: vocabulary {args.vocab}, {tokens}")


if __name__ == "__main__":
    main()
