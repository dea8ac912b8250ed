"""Token ids <-> text for a preprocessed dataset, through the same steps as preprocessing."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pkm_lm.errors import DataError, NotFoundError, import_extra

from . import moses
from .bpe import BPEApplier, join_bpe, read_vocab
from .manifest import SPECIAL, load_manifest

TOKENIZER_JSON = "tokenizer.json"  # an exported model's stand-in for dataset.json


class Vocabulary:
    """itos/stoi plus `encode` (raw text -> ids) and `decode` (ids -> text).

    Special ids follow XLM: <s>=0, </s>=1, <pad>=2, <unk>=3. A line break in the text is a
    `</s>` in the token stream, as in the binarized shards.
    """

    bos_index = SPECIAL["<s>"]
    eos_index = SPECIAL["</s>"]
    pad_index = SPECIAL["<pad>"]
    unk_index = SPECIAL["<unk>"]

    def __init__(self, itos: list[str], tokenizer: str, files: dict[str, Path], lang: str = "en"):
        if itos[: len(SPECIAL)] != list(SPECIAL):
            raise ValueError(f"vocabulary must start with {list(SPECIAL)}, got {itos[:4]}")
        if tokenizer not in ("fastbpe", "sentencepiece"):
            raise ValueError(f"tokenizer={tokenizer!r}: allowed 'fastbpe', 'sentencepiece'")
        self.itos = itos
        self.stoi = {t: i for i, t in enumerate(itos)}
        self.tokenizer = tokenizer
        self.files = files
        self.lang = lang
        self._backend = None  # fastBPE / SentencePiece object, created on first encode

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> Vocabulary:
        """The vocabulary of a preprocessed dataset directory, or of an exported model folder
        (``python -m pkm_lm.export``), whose ``tokenizer.json`` replaces the dataset manifest."""
        exported = Path(data_dir) / TOKENIZER_JSON
        if exported.is_file():
            manifest = json.loads(exported.read_text(encoding="utf-8"))
        else:
            manifest = load_manifest(data_dir)
        tokenizer = manifest["tokenizer"]
        if tokenizer is None:
            raise DataError(
                f"{data_dir} is a dataset of token ids without a tokenizer: text in and out "
                "(generate, export) needs a dataset preprocessed from text"
            )
        files = {k: Path(data_dir) / v for k, v in manifest["files"].items()}
        if tokenizer == "fastbpe":
            itos = list(SPECIAL) + read_vocab(files["vocab"])
        else:
            sp = _sentencepiece(files["model"])
            itos = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        if len(itos) != manifest["vocab_size"]:
            raise ValueError(
                f"{data_dir}: vocabulary has {len(itos)} tokens, manifest says {manifest['vocab_size']}"
            )
        return cls(itos, tokenizer, files, manifest["settings"].get("lang", "en"))

    def tokenizer_info(self) -> dict:
        """What ``tokenizer.json`` holds: enough for ``load`` beside copies of ``files``."""
        return {
            "tokenizer": self.tokenizer,
            "files": {k: p.name for k, p in self.files.items()},
            "vocab_size": len(self.itos),
            "settings": {"lang": self.lang},
        }

    def __len__(self) -> int:
        return len(self.itos)

    def _line_ids(self, line: str) -> list[int]:
        if self.tokenizer == "sentencepiece":
            if self._backend is None:
                self._backend = _sentencepiece(self.files["model"])
            text = moses.normalize_line(line, self.lang)
            return self._backend.encode(text) if text else []
        if self._backend is None:
            self._backend = BPEApplier(self.files["codes"], self.files["vocab"])
        tokenized = moses.tokenize_line(line, self.lang)
        if not tokenized:
            return []
        pieces = self._backend.apply([tokenized])[0].split()
        return [self.stoi.get(p, self.unk_index) for p in pieces]

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Ids of `text`: each non-empty line tokenised; lines separated by `</s>`."""
        ids: list[int] = []
        for line in text.split("\n"):
            line_ids = self._line_ids(line)
            if not line_ids:
                continue
            if ids:
                ids.append(self.eos_index)
            ids.extend(line_ids)
        if add_eos and ids:
            ids.append(self.eos_index)
        return ids

    def decode(self, ids, detokenize: bool = True) -> str:
        """Text of `ids`; `</s>` becomes a line break, <pad> is dropped.

        detokenize=True joins BPE pieces and undoes Moses tokenisation (readable text);
        False gives the Moses-tokenised text (BPE joined), as it was before BPE. With
        sentencepiece, False gives the pieces separated by spaces.
        """
        lines, current = [], []
        for i in (int(x) for x in ids):
            if i == self.eos_index:
                lines.append(current)
                current = []
            elif i != self.pad_index:
                current.append(self.itos[i])
        lines.append(current)
        return "\n".join(self._decode_line(tokens, detokenize) for tokens in lines)

    def _decode_line(self, pieces: list[str], detokenize: bool) -> str:
        if self.tokenizer == "sentencepiece":
            if not detokenize:
                return " ".join(pieces)
            return "".join(pieces).replace("\u2581", " ").strip()
        words = join_bpe(" ".join(pieces)).split()
        return moses.detokenize(words, self.lang) if detokenize else " ".join(words)


def _sentencepiece(model_path: Path):
    spm = import_extra("sentencepiece", "a sentencepiece vocabulary")

    if not Path(model_path).is_file():
        raise NotFoundError(f"sentencepiece model {model_path} does not exist")
    return spm.SentencePieceProcessor(model_file=str(model_path))
