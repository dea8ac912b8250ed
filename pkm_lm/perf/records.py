"""Benchmark figures as JSON lines: what ran, on which machine, and what it measured.

Tables in docs quote figures; each figure needs a source a reader can check. Every benchmark
appends one record per run to a ``.jsonl`` file beside its table: the command as typed, the
machine line (``pkm_lm.perf.machine.describe``), the UTC time and the figures.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pkm_lm.atomic import atomic_write_text


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a shell would take it back."""
    argv = sys.argv if argv is None else argv
    return shlex.join([Path(sys.executable).name, *argv])


def record(machine: str, figures: dict[str, Any], argv: list[str] | None = None) -> dict:
    return {
        "command": command_line(argv),
        "machine": machine,
        "time_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "figures": figures,
    }


def append_record(path: str | os.PathLike, rec: dict) -> None:
    """Add ``rec`` as one line of ``path`` (created with its folder); the file is rewritten
    whole and renamed, so a killed run leaves the old lines intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + json.dumps(rec, sort_keys=True) + "\n")


def read_records(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save(out: str | os.PathLike, stem: str, table: str, rec: dict) -> None:
    """Append the printed table, under its command, to ``out/<stem>.md`` and the record to
    ``out/<stem>.jsonl``: several runs into one folder keep every table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{stem}.md"
    old = md.read_text() + "\n" if md.exists() else ""
    atomic_write_text(md, f"{old}$ {rec['command']}\n\n{table.strip()}\n")
    append_record(out / f"{stem}.jsonl", rec)


class _Tee(io.StringIO):
    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def tee_stdout() -> Iterator[io.StringIO]:
    """Print as usual and keep a copy (``.getvalue()``): a benchmark that prints its tables
    saves the same text with ``save``."""
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield tee
