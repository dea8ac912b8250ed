"""Sample text from a trained run.

    python -m pkm_lm.generate run_dir=runs/demo_1mem prompt="The old man" max_new_tokens=60

The prompt goes through the dataset's own normalisation, Moses and BPE; the output is joined and
detokenised back to plain text. Generation starts after a ``</s>``, as every line does in training.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from pkm_lm import cli
from pkm_lm.checkpoint import load_run, read_run_config
from pkm_lm.config import GenerateConfig, register_configs
from pkm_lm.data import Vocabulary
from pkm_lm.distributed import resolve_device
from pkm_lm.model import TransformerLM
from pkm_lm.precision import autocast

register_configs()


@torch.no_grad()
def sample(
    model: TransformerLM,
    context: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Extend ``context`` (B, T) by ``max_new_tokens`` sampled tokens; the model sees at most
    ``max_seq_len`` tokens (the window slides)."""
    model.eval()
    window = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        with autocast(context.device, precision):
            logits = model(context[:, -window:])[:, -1, :].float() / temperature  # (B, vocab)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        context = torch.cat([context, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return context


@cli.hydra_main("generate")
def main(dcfg: DictConfig) -> None:
    gcfg: GenerateConfig = OmegaConf.to_object(dcfg)
    device = resolve_device(gcfg.device or read_run_config(gcfg.run_dir).train.device)
    model, cfg, _ = load_run(
        gcfg.run_dir, device, gcfg.checkpoint, getattr(torch, gcfg.value_dtype)
    )
    vocab = Vocabulary.load(cfg.data.dir)
    prompt_ids = [vocab.eos_index] + vocab.encode(gcfg.prompt)
    context = torch.tensor([prompt_ids] * gcfg.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(gcfg.seed)
    out = sample(
        model,
        context,
        gcfg.max_new_tokens,
        gcfg.temperature,
        gcfg.top_k,
        generator,
        cfg.train.precision,
    )
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i + 1} ---")
        print(vocab.decode(row[1:]))


if __name__ == "__main__":
    main()
