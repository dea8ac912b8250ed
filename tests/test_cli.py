"""Command lines report a user's mistake as one line and exit status 2; a bug keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from pkm_lm import cli
from pkm_lm.demo import stage
from pkm_lm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: {message}"]


def test_train_bad_override_names_the_key_as_typed(tmp_path):
    proc = run(
        "-m", "pkm_lm.train", "+experiment=demo_1mem", "model.memory.knn=100000",
        f"run_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert_one_line_error(
        proc,
        "model.memory.knn=100000 is invalid: must be an integer in [1, model.memory.n_keys=128]",
    )


def test_preprocess_missing_raw_dir(tmp_path):
    proc = run("-m", "pkm_lm.preprocess", "raw_dir=/nonexistent", f"out_dir={tmp_path / 'x'}")
    assert_one_line_error(proc, "raw_dir=/nonexistent is not a directory")
    assert not (tmp_path / "x").exists()


def test_hydra_composition_errors_are_one_line(tmp_path):
    proc = run("-m", "pkm_lm.evaluate", "split=test")
    assert_one_line_error(
        proc,
        "MissingMandatoryValue while resolving interpolation: Missing mandatory value: run_dir",
    )
    proc = run("-m", "pkm_lm.generate", "run_dir=x", "tempreature=1")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: Could not override 'tempreature'")


def test_argparse_entry_point(tmp_path):
    proc = run("-m", "pkm_lm.data.corpus", "news", "--source", str(tmp_path / "none.jsonl"))
    assert_one_line_error(proc, f"--source {tmp_path / 'none.jsonl'}: no such file")


def test_main_reports_user_errors_and_keeps_bugs(capsys):
    @cli.main
    def user_mistake():
        raise ConfigError("train.seed=x is invalid: must be an integer")

    with pytest.raises(SystemExit) as exit_info:
        user_mistake()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: train.seed=x is invalid: must be an integer\n"

    @cli.main
    def bug():
        return 1 / 0

    with pytest.raises(ZeroDivisionError):
        bug()


def test_one_line_joins_causes_and_drops_omegaconf_details():
    cause = ConfigKeyError("Key 'foo' not in 'ModelConfig'\n    full_key: model.foo\n")
    try:
        raise ConfigCompositionException(
            "Could not override 'model.foo'.\nUse +model.foo=1"
        ) from cause
    except ConfigCompositionException as e:
        error = e
    assert cli.one_line(error) == (
        "Could not override 'model.foo'. Use +model.foo=1: Key 'foo' not in 'ModelConfig'"
    )
    options = ConfigCompositionException(
        "Could not find 'experiment/x'\n\nAvailable options in 'experiment':\n\ta\n\tb\n"
        "Config search path:\n\tprovider=main"
    )
    assert (
        cli.one_line(options)
        == "Could not find 'experiment/x' Available options in 'experiment': a, b"
    )


def test_demo_stops_with_the_stage_status(tmp_path, capfd):
    with pytest.raises(SystemExit) as exit_info:
        stage("preprocess", ["-m", "pkm_lm.preprocess", f"raw_dir={tmp_path / 'none'}"])
    assert exit_info.value.code == 2
    assert "error: raw_dir=" in capfd.readouterr().err
