"""What `pip install pkm-lm` gives without extras: the layer, the model and the trainer on token
ids; each text-pipeline package, when missing, is named with the extra that installs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pkm_lm.errors import NotInstalledError

ROOT = Path(__file__).resolve().parents[1]
DATA_PACKAGES = ("fastBPE", "sacremoses", "sentencepiece")
INSTALL = "pip install 'pkm-lm[data]'"


def test_the_text_pipeline_packages_are_the_data_extra():
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    required = {Requirement(r).name for r in project["dependencies"]}
    data = {Requirement(r).name for r in extras["data"]}
    assert set(DATA_PACKAGES) <= data and not required & data
    assert "wandb" in {Requirement(r).name for r in extras["dev"]}
    assert Requirement(next(r for r in extras["data"] if "sacremoses" in r)).specifier


def test_training_and_the_layer_import_without_the_data_extra():
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in DATA_PACKAGES)
    code = (
        f"import sys; {blocked}\n"
        "import pkm_lm.train, pkm_lm.evaluate, pkm_lm.export, pkm_lm.data, pkm_lm.memory\n"
        "from pkm_lm.data import moses\n"
        "try:\n    moses.tokenize_line('Hello, world.')\n"
        "except ImportError as err:\n    print(err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"Moses preprocessing needs the sacremoses package: {INSTALL}"


@pytest.mark.parametrize(
    "module,call",
    [
        ("sacremoses", lambda: __import__("pkm_lm.data.moses").data.moses.tokenize_line("a b")),
        ("fastBPE", lambda: __import__("pkm_lm.data.bpe").data.bpe.BPEApplier("none.codes")),
        ("sentencepiece", lambda: __import__("pkm_lm.data.vocab").data.vocab._sentencepiece("m")),
    ],
)
def test_a_missing_data_package_names_the_extra(module, call, monkeypatch):
    from pkm_lm.data import moses

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "pkm_lm.data.moses_fast", raising=False)
    moses._tools.cache_clear()
    with pytest.raises(NotInstalledError) as err:
        call()
    assert str(err.value).endswith(f"needs the {module} package: {INSTALL}")
    moses._tools.cache_clear()
