"""python -m pkm_lm.export: the exported folder gives the checkpoint's logits, alone."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_trainer import build_trainer

from pkm_lm.checkpoint import load_run
from pkm_lm.data import Vocabulary
from pkm_lm.errors import DataError, NotFoundError
from pkm_lm.model import TransformerLM

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    """A run with a memory (query BatchNorm statistics included) trained for a few steps (in
    this process: the training command is tested elsewhere)."""
    out = tmp_path_factory.mktemp("export_run")
    steps = ["train.max_steps=4", "train.eval_interval=4", "train.checkpoint_interval=4"]
    build_trainer(corpus, "cpu", out, *steps).fit()
    return out


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """dtype -> ``run_dir`` exported by ``python -m pkm_lm.export`` in that dtype (fp32: the
    default, not named), once per dtype (tests must not write into it)."""

    @functools.cache
    def export(dtype: str) -> Path:
        out = tmp_path_factory.mktemp("export") / dtype
        named = [] if dtype == "fp32" else [f"dtype={dtype}"]
        run("-m", "pkm_lm.export", f"run_dir={run_dir}", f"out_dir={out}", *named)
        return out

    return export


def checkpoint_logits(run_dir: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32):
    model, _, _ = load_run(run_dir, torch.device("cpu"))
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(dtype))  # the rounding an export in `dtype` applies
        return model.eval()(ids)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_exported_model_gives_the_checkpoint_logits(run_dir, corpus, exported, dtype, torch_dtype):
    out = exported(dtype)
    assert sorted(p.name for p in out.iterdir()) == [
        "codes", "config.json", "model.safetensors", "tokenizer.json", "vocab.txt",
    ]  # fmt: skip
    model = TransformerLM.from_pretrained(out)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    ids = torch.randint(
        0, model.cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        logits = model(ids)
    assert torch.equal(logits, checkpoint_logits(run_dir, ids, torch_dtype))

    text = "the export keeps its tokenizer"
    assert Vocabulary.load(out).encode(text) == Vocabulary.load(corpus).encode(text)
    assert Vocabulary.load(out).itos == Vocabulary.load(corpus).itos


def test_truncated_or_mismatched_weights_are_clear_errors(exported, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(exported("fp32"), out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="model.safetensors is not a complete safetensors file"):
        TransformerLM.from_pretrained(out)

    weights.write_bytes(data)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "dim": 2 * config["dim"]}))
    with pytest.raises(
        DataError,
        match=rf"does not fit .*config.json: shape tok_emb.weight \(\d+, {config['dim']}\) instead "
        rf"of \(\d+, {2 * config['dim']}\)",
    ):
        TransformerLM.from_pretrained(out)

    (out / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(DataError, match="config.json: missing blocks.2.attn.fn.qkv.weight"):
        TransformerLM.from_pretrained(out)

    shutil.rmtree(out)
    with pytest.raises(NotFoundError, match="is .* an exported model"):
        TransformerLM.from_pretrained(out)


def test_export_command_errors(run_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pkm_lm.export", f"run_dir={run_dir}", f"out_dir={tmp_path}", "dtype=fp16"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "error: dtype=fp16 is invalid: must be one of fp32, bf16\n"


def test_a_dataset_without_tokenizer_is_a_clear_error(ids_data):
    with pytest.raises(DataError, match="without a tokenizer"):
        Vocabulary.load(ids_data)
