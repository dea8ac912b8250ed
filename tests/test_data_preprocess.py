"""raw text -> Moses -> fastBPE/sentencepiece -> shards, end to end on a small fixture."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pkm_lm.data import Vocabulary, load_manifest, moses, open_split
from pkm_lm.data import bpe as bpe_mod
from pkm_lm.data.pipeline import BPEConfig, PreprocessConfig, SentencePieceConfig, preprocess
from pkm_lm.data.textio import decode_utf8

RAW = Path(__file__).parent / "fixtures" / "data" / "raw"
REPO = Path(__file__).resolve().parents[1]


def config(raw_dir, out_dir, **kw):
    kw.setdefault("bpe", BPEConfig(n_codes=300))
    kw.setdefault("workers", 1)
    kw.setdefault("chunk_bytes", 4096)  # many chunks, so ordering across workers matters
    kw.setdefault("shard_tokens", 3000)  # several shards per split
    return PreprocessConfig(raw_dir=str(raw_dir), out_dir=str(out_dir), **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin1")
    preprocess(config(RAW, out))
    return out


def lines_of(ids, vocab):
    """Token strings of each `</s>`-terminated line of an id stream."""
    lines, cur = [], []
    for i in ids:
        if i == vocab.eos_index:
            lines.append(" ".join(cur))
            cur = []
        else:
            cur.append(vocab.itos[i])
    assert not cur, "stream must end with </s>"
    return lines


def test_round_trip_equals_tokenised_bpe_text(dataset):
    manifest = load_manifest(dataset)
    vocab = Vocabulary.load(dataset)
    assert manifest["vocab_size"] == len(vocab) and manifest["dtype"] == "uint16"
    assert vocab.itos[:4] == ["<s>", "</s>", "<pad>", "<unk>"]
    assert (dataset / "codes").is_file() and (dataset / "vocab.txt").is_file()
    import fastBPE

    applier = fastBPE.fastBPE(str(dataset / "codes"), str(dataset / "vocab.txt"))  # uncached
    train_tok = [t for t in (moses.tokenize_line(x) for x in (RAW / "train.txt").open()) if t]
    counts = Counter(
        t for line in fastBPE.fastBPE(str(dataset / "codes")).apply(train_tok) for t in line.split()
    )
    vocab_file = (dataset / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert {t: int(c) for t, c in (line.split(" ") for line in vocab_file)} == counts
    for split in ("train", "valid", "test"):
        raw = (RAW / f"{split}.txt").read_text(encoding="utf-8").split("\n")
        expected_tok = [moses.tokenize_line(line) for line in raw]
        expected_tok = [t for t in expected_tok if t]
        ids = open_split(dataset, split)[:]
        assert len(manifest["splits"][split]["shards"]) >= (2 if split == "train" else 1)
        got = lines_of(ids, vocab)
        bpe_text = applier.apply(expected_tok)
        # the tokenised, BPE'd text token for token, pieces outside the vocabulary as <unk>
        assert got == [
            " ".join(t if t in vocab.stoi else "<unk>" for t in line.split()) for line in bpe_text
        ]
        assert [bpe_mod.join_bpe(line) for line in bpe_text] == expected_tok
        assert manifest["splits"][split]["unk"] == sum(line.split().count("<unk>") for line in got)
        assert manifest["splits"][split]["tokens"] == len(ids)
    train_line = vocab.decode(open_split(dataset, "train")[:3000]).split("\n")[3]
    # Moses normalisation straightens quotes; detokenisation rejoins most (not all) tokens
    expected = (
        '"Curly quotes" - an em dash, caf\u00e9 na\u00efve, 3 \u00bd... & < tags > don\'t escape.'
    )
    assert train_line == expected


def test_vocabulary_encode_decode(dataset):
    vocab = Vocabulary.load(dataset)
    raw = (RAW / "valid.txt").read_text(encoding="utf-8")
    ids = vocab.encode(raw, add_eos=True)
    np.testing.assert_array_equal(ids, open_split(dataset, "valid")[:])
    text = "Thou art more lovely, and more temperate.\nA second line!"
    ids = vocab.encode(text)
    assert vocab.eos_index in ids and ids[-1] != vocab.eos_index
    assert vocab.decode(ids) == text
    assert (
        vocab.decode(ids, detokenize=False)
        == "Thou art more lovely , and more temperate .\nA second line !"
    )
    assert vocab.encode("\u4e2d") == [vocab.unk_index]  # a character never seen in training
    assert vocab.decode([vocab.unk_index, vocab.pad_index, vocab.eos_index]) == "<unk>\n"
    assert vocab.encode("\n \n") == []


def test_two_workers_write_identical_shards(dataset, tmp_path):
    """Through the real CLI, so configs/preprocess.yaml is exercised as well."""
    out = tmp_path / "bin2"
    cmd = [
        sys.executable, "-m", "pkm_lm.preprocess", f"raw_dir={RAW}", f"out_dir={out}",
        "bpe.n_codes=300", "workers=2", "chunk_bytes=4096", "shard_tokens=3000",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    one = sorted(p.name for p in dataset.glob("*.bin"))
    assert one == sorted(p.name for p in out.glob("*.bin")) and len(one) > 3
    for name in one + ["codes", "vocab.txt"]:
        assert (dataset / name).read_bytes() == (out / name).read_bytes(), name
    assert load_manifest(out)["settings"]["workers"] == 2


def test_finished_steps_are_skipped(tmp_path):
    out = tmp_path / "bin"

    def stamps():
        return {
            str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
        }

    preprocess(config(RAW, out))
    first = stamps()
    preprocess(config(RAW, out))  # nothing changed: only the manifest is rewritten
    assert {k: v for k, v in stamps().items() if k != "dataset.json"} == {
        k: v for k, v in first.items() if k != "dataset.json"
    }
    preprocess(config(RAW, out, bpe=BPEConfig(n_codes=200)))  # BPE changed: Moses output reused
    second = stamps()
    assert second["work/train.tok"] == first["work/train.tok"]
    assert (
        second["codes"] != first["codes"] and second["valid.00000.bin"] != first["valid.00000.bin"]
    )
    assert load_manifest(out)["settings"]["bpe"]["n_codes"] == 200
    (out / "valid.00000.bin").unlink()  # a lost output reruns its step, and only that one
    preprocess(config(RAW, out, bpe=BPEConfig(n_codes=200)))
    third = stamps()
    assert third["valid.00000.bin"] != second["valid.00000.bin"]
    assert third["train.00000.bin"] == second["train.00000.bin"]


def test_shard_count_shrinks_without_stale_files(tmp_path):
    out = tmp_path / "bin"
    preprocess(config(RAW, out, shard_tokens=2000))
    preprocess(config(RAW, out, shard_tokens=1 << 20))
    assert sorted(p.name for p in out.glob("*.bin")) == [
        "test.00000.bin",
        "train.00000.bin",
        "valid.00000.bin",
    ]


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(RAW, raw)
    with open(raw / "valid.txt", "ab") as f:
        f.write(b"bad \xff\xfe bytes and a cut \xe2\x80 char\n")
    manifest = preprocess(config(raw, tmp_path / "bin"))
    assert manifest["splits"]["valid"]["replaced_bytes"] == 4
    assert manifest["splits"]["train"]["replaced_bytes"] == 0
    assert decode_utf8(b"a\xffb") == ("a\ufffdb", 1)


@pytest.mark.parametrize("problem", ["missing", "empty", "blank"])
def test_bad_raw_files(tmp_path, problem):
    raw = tmp_path / "raw"
    shutil.copytree(RAW, raw)
    if problem == "missing":
        (raw / "test.txt").unlink()
        match = "raw file .*test.txt is missing"
    elif problem == "empty":
        (raw / "test.txt").write_text("")
        match = "raw file .*test.txt is empty"
    else:
        (raw / "test.txt").write_text("\n  \n\t\n")
        match = "raw file .*test.txt holds no text"
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        preprocess(config(raw, tmp_path / "bin"))


def test_out_dir_must_not_be_in_raw_dir(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(RAW, raw)
    for out in (raw, raw / "bin", raw / "." / "deeper" / ".."):
        with pytest.raises(ValueError, match="must not be raw_dir"):
            preprocess(config(raw, out))


def test_config_validation():
    with pytest.raises(
        ValueError, match="tokenizer=bpe is invalid: must be one of fastbpe, sentencepiece"
    ):
        PreprocessConfig(tokenizer="bpe")
    with pytest.raises(ValueError, match="sentencepiece.model_type=char is invalid"):
        PreprocessConfig(sentencepiece=SentencePieceConfig(model_type="char"))
    with pytest.raises(ValueError, match="dtype=int16 is invalid"):
        PreprocessConfig(dtype="int16")
    with pytest.raises(ValueError, match="bpe.n_codes=0"):
        PreprocessConfig(bpe=BPEConfig(n_codes=0))
    with pytest.raises(ValueError, match="workers=-1"):
        PreprocessConfig(workers=-1)


def test_forced_dtype_overflow_is_an_error(tmp_path):
    with pytest.raises(
        ValueError, match="dtype=uint16 is invalid: a vocabulary of .* tokens overflows it"
    ):
        preprocess(config(RAW, tmp_path / "bin", tokenizer="sentencepiece", dtype="uint16",
                          sentencepiece=SentencePieceConfig(vocab_size=70000)))  # fmt: skip


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_shares_format_and_loader(tmp_path, model_type):
    out = tmp_path / "spm"
    sp = SentencePieceConfig(model_type=model_type, vocab_size=300)
    manifest = preprocess(config(RAW, out, tokenizer="sentencepiece", sentencepiece=sp))
    assert manifest["tokenizer"] == "sentencepiece" and manifest["vocab_size"] == 300
    vocab = Vocabulary.load(out)
    assert len(vocab) == 300 and vocab.itos[:4] == ["<s>", "</s>", "<pad>", "<unk>"]
    ids = open_split(out, "valid")[:]
    assert ids[-1] == vocab.eos_index
    raw = (RAW / "valid.txt").read_text(encoding="utf-8")
    expected = [moses.normalize_line(line) for line in raw.split("\n") if line.strip()]
    assert vocab.decode(ids[:-1]).split("\n") == expected
    first_line = ids[: list(ids).index(vocab.eos_index)]
    pieces = vocab.decode(first_line, detokenize=False).split(" ")
    assert (
        len(pieces) == len(first_line)
        and "".join(pieces).replace("\u2581", " ").strip() == expected[0]
    )
    np.testing.assert_array_equal(vocab.encode(raw, add_eos=True), ids)
    assert json.loads((out / "dataset.json").read_text())["files"] == {
        "model": "spm.model",
        "vocab": "spm.vocab",
    }


def test_killed_run_leaves_no_complete_looking_shard(tmp_path, monkeypatch):
    """A crash mid-binarize leaves only temporary files and an unfinished manifest."""
    from pkm_lm.data import pipeline

    calls = {"n": 0}
    real = pipeline.ShardWriter.write

    def crash_on_third(self, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(self, ids)

    monkeypatch.setattr(pipeline.ShardWriter, "write", crash_on_third)
    out = tmp_path / "bin"
    with pytest.raises(KeyboardInterrupt):
        preprocess(config(RAW, out, shard_tokens=1 << 20))
    assert not list(out.glob("train.*.bin")) and not list(out.glob(".train*tmp*"))
    with pytest.raises(ValueError, match="unfinished"):
        load_manifest(out)
    monkeypatch.undo()
    (out / ".train.00000.bin.tmp-99999").write_bytes(b"half a shard")  # as after a SIGKILL
    preprocess(config(RAW, out, shard_tokens=1 << 20))
    assert len(open_split(out, "train")) > 0
    assert not [p for p in os.listdir(out) if "tmp" in p]
