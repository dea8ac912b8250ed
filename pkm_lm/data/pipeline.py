"""raw text -> Moses -> BPE (fastBPE or sentencepiece) -> binary shards + dataset.json.

Each step records a key (a hash of its settings and of its inputs' keys) in the manifest
when it finishes; a rerun skips every step whose key is unchanged and whose outputs still
exist, so a killed run resumes after its last finished step. Raw files are identified by
size and modification time. Every output is written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pkm_lm.atomic import atomic_write_bytes
from pkm_lm.errors import (
    DataError,
    NotFoundError,
    check_choice,
    check_positive,
    import_extra,
    invalid,
    require,
)

from . import bpe, moses
from .manifest import SPECIAL, SPLITS, read_manifest, write_manifest
from .shards import ShardWriter, dtype_for_vocab
from .textio import Chunk, ordered_map, read_chunks

log = logging.getLogger(__name__)

TOKENIZERS = ("fastbpe", "sentencepiece")
SPM_MODEL_TYPES = ("bpe", "unigram")


@dataclass
class BPEConfig:
    n_codes: int = 60000  # the paper's; configs/preprocess.yaml uses 8000 for the books corpus


@dataclass
class SentencePieceConfig:
    model_type: str = "unigram"  # "bpe" | "unigram"
    vocab_size: int = 8000
    character_coverage: float = 1.0
    input_sentence_size: int = 2_000_000  # lines sampled for training: caps its memory
    seed: int = 0


@dataclass
class PreprocessConfig:
    raw_dir: str = "data/raw/books"
    out_dir: str = "data/bin/books"
    tokenizer: str = "fastbpe"  # "fastbpe" (Moses + fastBPE, as the paper) | "sentencepiece"
    lang: str = "en"
    workers: int = 0  # processes for Moses and BPE; 0 = every available core
    dtype: str = "auto"  # "auto" (uint16 when the vocabulary fits) | "uint16" | "uint32"
    shard_tokens: int = 1 << 28  # tokens per shard (512 MiB of uint16)
    chunk_bytes: int = 1 << 20  # raw bytes per unit of work
    bpe: BPEConfig = field(default_factory=BPEConfig)
    sentencepiece: SentencePieceConfig = field(default_factory=SentencePieceConfig)
    # A preprocessed dataset whose tokenizer to reuse instead of learning one: new text for
    # the models trained on that dataset (finetuning) gets their vocabulary.
    vocab_from: str | None = None

    def __post_init__(self):
        check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        check_choice("sentencepiece.model_type", self.sentencepiece.model_type, SPM_MODEL_TYPES)
        check_choice("dtype", self.dtype, ("auto", "uint16", "uint32"))
        require(self.workers >= 0, "workers", self.workers, "must be >= 0 (0 = every core)")
        for name in ("shard_tokens", "chunk_bytes"):
            check_positive(name, getattr(self, name))
        check_positive("bpe.n_codes", self.bpe.n_codes)
        require(
            self.sentencepiece.vocab_size > len(SPECIAL),
            "sentencepiece.vocab_size",
            self.sentencepiece.vocab_size,
            f"must exceed the {len(SPECIAL)} special tokens",
        )

    @property
    def n_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


# Per-chunk work, sent once to each worker process (see textio.ordered_map).


@dataclass(frozen=True)
class _MosesStep:
    lang: str
    tokenize: bool

    def __call__(self, chunk: Chunk) -> list[str]:
        return moses.process_lines(chunk.lines, self.lang, self.tokenize)


@dataclass
class _CountBPE:
    codes: str

    def __call__(self, chunk: Chunk) -> Counter:
        if not hasattr(self, "_bpe"):
            self._bpe = bpe.BPEApplier(self.codes)
        return bpe.count_bpe_tokens(chunk.lines, self._bpe)


@dataclass
class _Encode:
    """Token lines -> ids with `</s>` after each line; returns (ids, number of <unk>)."""

    tokenizer: str
    files: dict

    def _setup(self):
        if self.tokenizer == "fastbpe":
            self._bpe = bpe.BPEApplier(self.files["codes"], self.files["vocab"])
            itos = list(SPECIAL) + bpe.read_vocab(self.files["vocab"])
            self._stoi = {t: i for i, t in enumerate(itos)}
        else:
            spm = import_extra("sentencepiece", "tokenizer=sentencepiece")
            self._sp = spm.SentencePieceProcessor(model_file=self.files["model"])

    def __call__(self, chunk: Chunk) -> tuple[np.ndarray, int]:
        if not hasattr(self, "_ready"):
            self._setup()
            self._ready = True
        eos, unk = SPECIAL["</s>"], SPECIAL["<unk>"]
        ids: list[int] = []
        if self.tokenizer == "fastbpe":
            stoi = self._stoi
            for line in self._bpe.apply(chunk.lines):
                ids.extend(stoi.get(t, unk) for t in line.split())
                ids.append(eos)
        else:
            for line_ids in self._sp.encode(chunk.lines):
                ids.extend(line_ids)
                ids.append(eos)
        arr = np.asarray(ids, dtype=np.int64)
        return arr, int(np.count_nonzero(arr == unk))


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _raw_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("pkm-lm", "sacremoses", "fastBPE", "sentencepiece", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def check_dirs(raw_dir: Path, out_dir: Path) -> None:
    """Raw files present and non-empty; out_dir neither equal to nor inside raw_dir."""
    if not raw_dir.is_dir():
        raise NotFoundError(f"raw_dir={raw_dir} is not a directory")
    raw, out = raw_dir.resolve(), out_dir.resolve()
    require(
        not (out == raw or raw in out.parents),
        "out_dir",
        out_dir,
        f"must not be raw_dir={raw_dir} or inside it",
    )
    for split in SPLITS:
        path = raw_dir / f"{split}.txt"
        if not path.is_file():
            raise NotFoundError(f"raw file {path} is missing (need {', '.join(SPLITS)}.txt)")
        if path.stat().st_size == 0:
            raise DataError(f"raw file {path} is empty")


def _bar(desc: str, total: int) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True)


class Preprocessor:
    """Runs the steps of one PreprocessConfig, skipping those already done."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        self.raw_dir = Path(cfg.raw_dir)
        self.out_dir = Path(cfg.out_dir)
        self.work_dir = self.out_dir / "work"
        self.manifest: dict = {}

    # -- step bookkeeping -------------------------------------------------------------

    def _done(self, name: str, key: str) -> bool:
        step = self.manifest.get("steps", {}).get(name)
        if not step or step["key"] != key:
            return False
        return all((self.out_dir / f).is_file() for f in step["outputs"])

    def _record(self, name: str, key: str, outputs: list[str], stats: dict) -> None:
        self.manifest.setdefault("steps", {})[name] = {
            "key": key,
            "outputs": outputs,
            "stats": stats,
        }
        self.manifest["complete"] = False
        write_manifest(self.out_dir, self.manifest)

    def _step(self, name: str, key: str, fn) -> dict:
        """Run fn() -> (outputs, stats) unless already done; returns the step's record."""
        if self._done(name, key):
            log.info("%s: up to date, skipped", name)
        else:
            t0 = time.perf_counter()
            outputs, stats = fn()
            stats["seconds"] = round(time.perf_counter() - t0, 3)
            self._record(
                name, key, [str(Path(o).relative_to(self.out_dir)) for o in outputs], stats
            )
        return self.manifest["steps"][name]

    # -- steps ------------------------------------------------------------------------

    def _moses(self, split: str, dst: Path) -> tuple[list[Path], dict]:
        src = self.raw_dir / f"{split}.txt"
        step = _MosesStep(self.cfg.lang, tokenize=self.cfg.tokenizer == "fastbpe")
        stats = {"bytes": 0, "lines_in": 0, "lines_out": 0, "replaced_bytes": 0}
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        try:
            with (
                open(tmp, "w", encoding="utf-8") as f,
                _bar(f"moses {split}", src.stat().st_size) as bar,
            ):
                chunks = read_chunks(src, self.cfg.chunk_bytes)
                for chunk, lines in ordered_map(step, chunks, self.cfg.n_workers):
                    if lines:
                        f.write("\n".join(lines) + "\n")
                    stats["bytes"] += chunk.n_bytes
                    stats["lines_in"] += len(chunk.lines)
                    stats["lines_out"] += len(lines)
                    stats["replaced_bytes"] += chunk.n_replaced
                    bar.update(chunk.n_bytes)
            if stats["lines_out"] == 0:
                raise DataError(f"raw file {src} holds no text after normalisation")
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        if stats["replaced_bytes"]:
            log.warning(
                "%s: %d bytes were not valid UTF-8 and became U+FFFD", src, stats["replaced_bytes"]
            )
        return [dst], stats

    def _learn_bpe(self, src: Path, codes: Path) -> tuple[list[Path], dict]:
        with _bar(f"learnbpe {self.cfg.bpe.n_codes}", src.stat().st_size) as bar:
            n = bpe.learn_codes(src, codes, self.cfg.bpe.n_codes, on_bytes=bar.update)
        if n < self.cfg.bpe.n_codes:
            log.warning("learnbpe found only %d merges (bpe.n_codes=%d)", n, self.cfg.bpe.n_codes)
        return [codes], {"bytes": src.stat().st_size, "codes": n}

    def _bpe_vocab(self, src: Path, codes: Path, vocab: Path) -> tuple[list[Path], dict]:
        counts: Counter = Counter()
        with _bar("vocab", src.stat().st_size) as bar:
            chunks = read_chunks(src, self.cfg.chunk_bytes)
            for chunk, part in ordered_map(_CountBPE(str(codes)), chunks, self.cfg.n_workers):
                counts.update(part)
                bar.update(chunk.n_bytes)
        bpe.write_vocab(vocab, counts)
        return [vocab], {"bytes": src.stat().st_size, "tokens": len(counts)}

    def _train_spm(self, src: Path, model: Path, vocab: Path) -> tuple[list[Path], dict]:
        spm = import_extra("sentencepiece", "tokenizer=sentencepiece")

        sp = self.cfg.sentencepiece
        spm.set_random_generator_seed(sp.seed)
        with (
            tempfile.TemporaryDirectory(dir=self.out_dir) as tmp,
            _bar("sentencepiece", src.stat().st_size) as bar,
        ):
            prefix = Path(tmp) / "spm"
            try:
                spm.SentencePieceTrainer.train(
                    input=str(src),
                    model_prefix=str(prefix),
                    model_type=sp.model_type,
                    vocab_size=sp.vocab_size,
                    character_coverage=sp.character_coverage,
                    input_sentence_size=sp.input_sentence_size,
                    shuffle_input_sentence=True,
                    num_threads=self.cfg.n_workers,
                    bos_id=SPECIAL["<s>"],
                    eos_id=SPECIAL["</s>"],
                    pad_id=SPECIAL["<pad>"],
                    unk_id=SPECIAL["<unk>"],
                    minloglevel=2,
                )
            except RuntimeError as e:
                if "Vocabulary size too high" not in str(e):
                    raise
                raise invalid(
                    "sentencepiece.vocab_size", sp.vocab_size, f"is too large for {src}: {e}"
                ) from e
            os.replace(f"{prefix}.model", model)
            os.replace(f"{prefix}.vocab", vocab)
            bar.update(src.stat().st_size)
        return [model, vocab], {"bytes": src.stat().st_size}

    def _reuse_vocab(self, source: Path) -> tuple[dict, str, int]:
        """Copy the tokenizer files of the dataset ``source`` (vocab_from) into out_dir."""
        theirs = read_manifest(source)
        if not theirs.get("complete"):
            raise NotFoundError(f"vocab_from={source} is not a complete preprocessed dataset")
        require(
            theirs["tokenizer"] == self.cfg.tokenizer,
            "vocab_from",
            source,
            f"was made with tokenizer={theirs['tokenizer']}, not tokenizer={self.cfg.tokenizer}",
        )
        files = {k: self.out_dir / name for k, name in theirs["files"].items()}
        key = _key("vocab_from", theirs["steps"]["binarize/train"]["key"], theirs["files"])

        def copy() -> tuple[list[Path], dict]:
            for name in theirs["files"].values():
                atomic_write_bytes(self.out_dir / name, (source / name).read_bytes())
            return list(files.values()), {"source": str(source)}

        self._step("vocab_from", key, copy)
        return files, key, int(theirs["vocab_size"])

    def _binarize(
        self, split: str, src: Path, files: dict, vocab_size: int
    ) -> tuple[list[Path], dict]:
        dtype = dtype_for_vocab(vocab_size, self.cfg.dtype)
        encode = _Encode(self.cfg.tokenizer, {k: str(v) for k, v in files.items()})
        shards, writer = [], None
        stats = {"bytes": 0, "tokens": 0, "lines": 0, "unk": 0}
        try:
            with _bar(f"binarize {split}", src.stat().st_size) as bar:
                chunks = read_chunks(src, self.cfg.chunk_bytes)
                for chunk, (ids, n_unk) in ordered_map(encode, chunks, self.cfg.n_workers):
                    stats["lines"] += len(chunk.lines)
                    stats["unk"] += n_unk
                    stats["bytes"] += chunk.n_bytes
                    while ids.size:
                        if writer is None:
                            writer = ShardWriter(
                                self.out_dir / f"{split}.{len(shards):05d}.bin", dtype
                            )
                        room = self.cfg.shard_tokens - writer.n_tokens
                        writer.write(ids[:room])
                        ids = ids[room:]
                        if writer.n_tokens == self.cfg.shard_tokens:
                            shards.append(writer.close())
                            writer = None
                    bar.update(chunk.n_bytes)
            if writer is not None:
                shards.append(writer.close())
                writer = None
        finally:
            if writer is not None:
                writer.abort()
        stats["tokens"] = sum(s["tokens"] for s in shards)
        stats.update(shards=shards, dtype=dtype)
        for stale in self.out_dir.glob(f"{split}.*.bin"):
            if stale.name not in {s["file"] for s in shards}:
                stale.unlink()
        return [self.out_dir / s["file"] for s in shards], stats

    # -- driver -----------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        check_dirs(self.raw_dir, self.out_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*self.out_dir.glob(".*.tmp-*"), *self.work_dir.glob(".*.tmp-*")]:
            stale.unlink()  # left by a killed run (one run per out_dir at a time)
        self.manifest = read_manifest(self.out_dir)
        fastbpe = cfg.tokenizer == "fastbpe"
        if not fastbpe:  # known before training: fail before the slow steps
            dtype_for_vocab(cfg.sentencepiece.vocab_size, cfg.dtype)
        ext = "tok" if fastbpe else "norm"

        versions = _versions()
        tools = {k: versions[k] for k in ("sacremoses", "fastBPE", "sentencepiece")}
        text_keys = {}
        for split in SPLITS:
            raw = self.raw_dir / f"{split}.txt"
            key = _key("moses", split, cfg.lang, fastbpe, _raw_fingerprint(raw), tools)
            dst = self.work_dir / f"{split}.{ext}"
            self._step(f"moses/{split}", key, lambda s=split, d=dst: self._moses(s, d))
            text_keys[split] = key

        train_text = self.work_dir / f"train.{ext}"
        if cfg.vocab_from:
            files, vocab_key, vocab_size = self._reuse_vocab(Path(cfg.vocab_from))
        elif fastbpe:
            files = {"codes": self.out_dir / "codes", "vocab": self.out_dir / "vocab.txt"}
            codes_key = _key("learnbpe", cfg.bpe.n_codes, text_keys["train"], tools)
            self._step("learnbpe", codes_key, lambda: self._learn_bpe(train_text, files["codes"]))
            vocab_key = _key("vocab", codes_key)
            self._step(
                "vocab",
                vocab_key,
                lambda: self._bpe_vocab(train_text, files["codes"], files["vocab"]),
            )
            vocab_size = len(SPECIAL) + len(bpe.read_vocab(files["vocab"]))
        else:
            files = {"model": self.out_dir / "spm.model", "vocab": self.out_dir / "spm.vocab"}
            vocab_key = _key("sentencepiece", asdict(cfg.sentencepiece), text_keys["train"], tools)
            self._step(
                "sentencepiece",
                vocab_key,
                lambda: self._train_spm(train_text, files["model"], files["vocab"]),
            )
            vocab_size = cfg.sentencepiece.vocab_size
        dtype = dtype_for_vocab(vocab_size, cfg.dtype)

        splits = {}
        for split in SPLITS:
            key = _key("binarize", dtype, cfg.shard_tokens, vocab_key, text_keys[split])
            src = self.work_dir / f"{split}.{ext}"
            step = self._step(
                f"binarize/{split}",
                key,
                lambda s=split, p=src: self._binarize(s, p, files, vocab_size),
            )
            moses_stats = self.manifest["steps"][f"moses/{split}"]["stats"]
            splits[split] = {
                "shards": step["stats"]["shards"],
                "tokens": step["stats"]["tokens"],
                "lines": step["stats"]["lines"],
                "unk": step["stats"]["unk"],
                "raw_bytes": moses_stats["bytes"],
                "replaced_bytes": moses_stats["replaced_bytes"],
            }

        self.manifest.update(
            complete=True,
            format_version=1,
            tokenizer=cfg.tokenizer,
            vocab_size=vocab_size,
            dtype=dtype,
            special=dict(SPECIAL),
            files={k: v.name for k, v in files.items()},
            splits=splits,
            settings=asdict(cfg),
            versions=versions,
        )
        write_manifest(self.out_dir, self.manifest)
        return self.manifest


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run (or finish) preprocessing; returns the final manifest."""
    return Preprocessor(cfg).run()
