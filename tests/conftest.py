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


@pytest.fixture(scope="session")
def ids_data(tmp_path_factory) -> Path:
    """A dataset of Zipf token ids written by the real shard writer (no tokenizer needed)."""
    from pkm_lm.data.synthetic import write_zipf_ids

    out = tmp_path_factory.mktemp("ids")
    write_zipf_ids(out, vocab_size=500, train_tokens=50_000)
    return out
