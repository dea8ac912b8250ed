"""Command lines report a user's mistake as one line and exit status 2; a bug keeps its traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf.errors import ConfigKeyError
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from pkm_lm import cli, torchrun
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


def test_override_grammar_errors_name_the_override():
    """Hydra's parser says where it failed, not in which override: the message adds it."""
    error = OverrideParseException(
        override="model.dim=[1,", message="no viable alternative at input '[1,'"
    )
    assert cli.one_line(error) == (
        "Error parsing override 'model.dim=[1,': no viable alternative at input '[1,'"
    )
    named = OverrideParseException(
        override="a=1)", message="Error parsing override 'a=1)'\nextraneous input ')'"
    )
    assert cli.one_line(named) == "Error parsing override 'a=1)' extraneous input ')'"
    cli.check_override_keys(["model.dim=3", "+experiment=x", "~train.seed", "--cfg", "job"])
    for arg in ("=3", "+=3", "++=x", "~="):
        with pytest.raises(ConfigError, match=f"^{arg.replace('+', '[+]')} is not an override"):
            cli.check_override_keys(["run_dir=x", arg])


def test_override_without_a_key_is_one_line(monkeypatch, capsys):
    """Hydra itself fails on it with a bare ValueError and a traceback: refused before."""
    ran = []
    task = cli.hydra_main("evaluate")(ran.append)
    monkeypatch.setattr(sys, "argv", ["pkm_lm.evaluate", "run_dir=x", "+=3"])
    with pytest.raises(SystemExit) as exit_info:
        task()
    assert exit_info.value.code == 2 and not ran
    assert capsys.readouterr().err == "error: +=3 is not an override: it needs a key, KEY=VALUE\n"


def test_user_error_under_torchrun_goes_to_its_error_file(tmp_path, monkeypatch, capsys):
    """One line in torchrun's error file for this process, nothing on stderr (every rank would
    print it; the launcher prints it once)."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    cli.report(ConfigError("train.seed=x is invalid: must be an integer"))
    assert capsys.readouterr().err == ""
    record = json.loads(error_file.read_text())
    assert record["message"] == "error: train.seed=x is invalid: must be an integer"
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message == record["message"]  # as torchrun reads it back


def child_failure(tmp_path: Path, exitcode: int, message: str) -> ChildFailedError:
    error_file = tmp_path / f"{exitcode}.json"
    error_file.write_text(json.dumps({"message": message, "timestamp": 1}))
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file=str(error_file))
    return ChildFailedError("pkm_lm.train", {0: failure})


def test_torchrun_launcher_ends_with_the_user_error_alone(tmp_path, monkeypatch, capsys):
    failed = child_failure(tmp_path, 2, "error: train.seed=x is invalid")
    monkeypatch.setattr(torchrun, "run", lambda args: (_ for _ in ()).throw(failed))
    with pytest.raises(SystemExit) as exit_info:
        torchrun.main(["--nproc_per_node", "2", "-m", "pkm_lm.train"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: train.seed=x is invalid\n"
    # A crash, or status 2 from a program that wrote no such line, keeps torchrun's report.
    for failure in (child_failure(tmp_path, 1, "error: x"), child_failure(tmp_path, 2, "usage")):
        monkeypatch.setattr(torchrun, "run", lambda args, f=failure: (_ for _ in ()).throw(f))
        with pytest.raises(ChildFailedError):
            torchrun.main(["--nproc_per_node", "1", "-m", "pkm_lm.train"])


def test_torchrun_job_with_a_bad_override(tmp_path):
    """A real one-process torchrun on CPU: the job's last line is the error, status 2."""
    proc = run(
        "-m", "pkm_lm.torchrun", "--standalone", "--nproc_per_node", "1", "-m", "pkm_lm.train",
        "+experiment=demo_1mem", "model.memory.knn=100000", f"run_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "error: model.memory.knn=100000 is invalid: must be an integer in "
        "[1, model.memory.n_keys=128]"
    )
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "run").glob("*"))  # nothing trained or written


def test_wheelhouse_bad_option_before_any_download(tmp_path):
    proc = run("scripts/wheelhouse.py", "--python-version", "3", "--dest", str(tmp_path / "w"))
    assert_one_line_error(proc, "--python-version=3 is invalid: use MAJOR.MINOR, e.g. 3.12")
    assert not (tmp_path / "w").exists()


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
