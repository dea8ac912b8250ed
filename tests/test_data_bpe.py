"""fastBPE: its inputs checked before it can exit the process, its tool found or named."""

import sys

import pytest

from pkm_lm.data import bpe as bpe_mod


def test_codes_file_checked_before_fastbpe(tmp_path):
    """fastBPE exit(1)s on a bad path; we must raise instead (this test would die otherwise)."""
    with pytest.raises(FileNotFoundError, match="BPE codes file .*nope does not exist"):
        bpe_mod.BPEApplier(tmp_path / "nope")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="BPE codes file .*empty is empty"):
        bpe_mod.BPEApplier(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bpe_mod.BPEApplier(tmp_path)  # a directory is not a codes file
    with pytest.raises(FileNotFoundError, match="BPE training text"):
        bpe_mod.learn_codes(tmp_path / "nope.tok", tmp_path / "codes", 10)


def test_missing_fast_tool_names_make_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("PKM_FASTBPE", str(tmp_path / "fast"))
    with pytest.raises(FileNotFoundError, match="PKM_FASTBPE"):
        bpe_mod.find_fast_binary()
    monkeypatch.delenv("PKM_FASTBPE")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make setup"):
        bpe_mod.find_fast_binary()


def test_learnbpe_failure_is_reported(tmp_path, monkeypatch):
    tool = tmp_path / "fast"
    tool.write_text("#!/bin/sh\necho 'out of cheese' >&2\nexit 3\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PKM_FASTBPE", str(tool))
    text = tmp_path / "train.tok"
    text.write_text("a b c\n" * 300_000)  # more than a pipe holds: the tool dies mid-write
    with pytest.raises(RuntimeError, match=r"failed \(3\): out of cheese"):
        bpe_mod.learn_codes(text, tmp_path / "codes", 10)
    assert not (tmp_path / "codes").exists() and not list(tmp_path.glob(".codes*"))
