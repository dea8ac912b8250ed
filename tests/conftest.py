"""Test-session setup and fixtures shared by several test files."""

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported (its own library functions are decorated
# then), so it is set here, before any test imports it: without CUDA, Triton kernels run on CPU
# tensors in its interpreter. With CUDA it stays unset and the kernels compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["torch", "cpp", "triton"])
def value_path(request, monkeypatch):
    """Every value-read path in turn, selected explicitly (tests/memory_references.py); the
    value is the ``kernel`` argument of ``value_bag`` and ``LazyAdam`` for it."""
    from memory_references import select_value_path

    yield from select_value_path(request.param, monkeypatch)


@pytest.fixture(params=["torch", "cpp"])
def cpu_value_path(request, monkeypatch):
    """The PyTorch compositions and the C++ passes, for the pieces Triton has no version of."""
    from memory_references import select_value_path

    yield from select_value_path(request.param, monkeypatch)


@pytest.fixture(scope="session")
def ids_data(tmp_path_factory) -> Path:
    """A dataset of Zipf token ids written by the real shard writer (no tokenizer needed)."""
    from pkm_lm.data.synthetic import write_zipf_ids

    out = tmp_path_factory.mktemp("ids")
    write_zipf_ids(out, vocab_size=500, train_tokens=50_000)
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small text dataset (fastBPE, 60 codes) made by the real preprocessing from Zipf text
    with bigram structure, for tests that need a tokenizer; tests must not write into it."""
    from pkm_lm.data.pipeline import BPEConfig, PreprocessConfig, preprocess
    from pkm_lm.data.synthetic import write_zipf_corpus

    raw = tmp_path_factory.mktemp("corpus_raw")
    write_zipf_corpus(raw, train_words=6000, heldout_words=600)
    out = tmp_path_factory.mktemp("corpus_bin")
    cfg = PreprocessConfig(raw_dir=str(raw), out_dir=str(out), workers=1, bpe=BPEConfig(n_codes=60))
    preprocess(cfg)
    return out
