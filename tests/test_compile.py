"""train.compile=true: the compiled blocks train like the eager ones, and break only where the
memory layer's eager kernels are."""

import pytest
import torch
from tiny_trainer import build_trainer

from pkm_lm.compile import graph_breaks

NO_DROPOUT = ("model.dropout=0", "model.attn_dropout=0")


def losses(trainer, steps=3):
    batches = [trainer.stream.next_batch() for _ in range(steps)]
    return [float(trainer.train_step(batch).loss) for batch in batches]


@pytest.mark.slow
def test_compiled_training_equals_eager_and_names_its_breaks(ids_data, tmp_path):
    eager = build_trainer(ids_data, "cpu", tmp_path / "eager", *NO_DROPOUT)
    compiled = build_trainer(
        ids_data, "cpu", tmp_path / "compiled", *NO_DROPOUT, "train.compile=true"
    )
    idx = torch.randint(0, 500, (2, 32))
    breaks = graph_breaks(compiled.model, idx)
    # Block 1 is dense: one graph. Block 2's memory on CPU: the sub-key top-k (its C++ bag
    # backward; both halves break at the same line) and the value read.
    assert [b.split(":")[0] for b in breaks] == ["block 2"] * 2, breaks
    assert "_half_topk (select.py" in breaks[0] and "forward (layer.py" in breaks[1], breaks
    torch.testing.assert_close(losses(compiled), losses(eager), rtol=1e-5, atol=1e-5)
