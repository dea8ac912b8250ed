"""The README's memory-layer example runs as written (docs that match the code)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_memory_layer_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "from pkm_lm.memory import" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (4, 64, 256)
    assert namespace["mem"].stats.counts.sum().item() == 4 * 64 * 4 * 32
