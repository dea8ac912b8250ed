"""Export a trained run as a self-contained folder: weights, model config and tokenizer.

    python -m pkm_lm.export run_dir=runs/demo_1mem out_dir=export/demo_1mem [dtype=bf16]

writes ``model.safetensors`` (the weights only: no optimiser state, no pickled code, so it loads
without trusting the file), ``config.json`` (the model config), and the tokenizer of the run's
dataset (fastBPE's ``codes`` + ``vocab.txt``, or the SentencePiece model) with a
``tokenizer.json`` that describes it. ``TransformerLM.from_pretrained(out_dir)`` and
``Vocabulary.load(out_dir)`` read the folder back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save

from pkm_lm import cli
from pkm_lm.atomic import atomic_write_bytes, atomic_write_text
from pkm_lm.checkpoint import load_run
from pkm_lm.data.vocab import TOKENIZER_JSON, Vocabulary
from pkm_lm.errors import DataError, check_choice
from pkm_lm.model import CONFIG_JSON, WEIGHTS, TransformerLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ExportConfig:
    run_dir: str = "???"
    out_dir: str = "???"
    dtype: str = "fp32"  # of the floating-point weights: fp32 or bf16 (half the size)
    checkpoint: str | None = None  # None: the newest complete checkpoint of the run

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, tuple(DTYPES))


ConfigStore.instance().store(name="base_export", node=ExportConfig)


def export(model: TransformerLM, vocab: Vocabulary, out_dir: str | Path, dtype: str = "fp32",
           metadata: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Write ``model`` and ``vocab`` to ``out_dir`` (created), each file atomically."""
    if len(vocab) != model.cfg.vocab_size:
        raise DataError(
            f"the tokenizer has {len(vocab)} tokens but the model model.vocab_size="
            f"{model.cfg.vocab_size}: was the dataset preprocessed again after training?"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    aliases = model.shared_names()  # safetensors stores a shared tensor once, by its first name
    tensors = {
        name: (t.to(DTYPES[dtype]) if t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in model.state_dict().items()
        if name not in aliases
    }
    atomic_write_bytes(out / WEIGHTS, save(tensors, {"format": "pt", **(metadata or {})}))
    for path in vocab.files.values():
        atomic_write_bytes(out / path.name, path.read_bytes())
    atomic_write_text(out / TOKENIZER_JSON, json.dumps(vocab.tokenizer_info(), indent=2) + "\n")
    # config.json last: a folder without it is not an export (a killed export is not mistaken).
    atomic_write_text(out / CONFIG_JSON, json.dumps(asdict(model.cfg), indent=2) + "\n")
    return out


@cli.hydra_main("export")
def main(dcfg: DictConfig) -> None:
    ecfg: ExportConfig = OmegaConf.to_object(dcfg)
    model, cfg, state = load_run(ecfg.run_dir, torch.device("cpu"), ecfg.checkpoint)
    vocab = Vocabulary.load(cfg.data.dir)
    meta = {"step": str(state["step"]), "run_dir": str(ecfg.run_dir), "dtype": ecfg.dtype}
    out = export(model, vocab, ecfg.out_dir, ecfg.dtype, meta)
    aliases = model.shared_names()
    n = sum(t.numel() for name, t in model.state_dict().items() if name not in aliases)
    print(f"exported {ecfg.run_dir} (step {state['step']}, {n:,} values, {ecfg.dtype}) -> {out}")


if __name__ == "__main__":
    main()
