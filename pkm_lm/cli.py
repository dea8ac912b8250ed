"""Command-line entry points: a user's mistake is one line on stderr, a bug keeps its traceback.

A ``UserError``, and the configuration errors that Hydra and OmegaConf raise for a bad override
(an unknown key, a value of the wrong type, a missing experiment, a missing mandatory value, an
override that does not parse: the message names the override as typed), print
``error: <message>`` and exit with status 2, as argparse does for its usage errors. Any other
exception propagates with its full traceback. ``@cli.main`` wraps an argparse ``main``;
``@cli.hydra_main("train")`` replaces ``@hydra.main`` and catches errors both while Hydra composes
the config and inside the job (where Hydra would print "Error executing job" first).

Under torchrun every process would print the same line, and torchrun would then wrap the failure
in its own report. So a process that torchrun started (it sets ``TORCHELASTIC_ERROR_FILE``)
writes the line to its error file instead: plain torchrun shows it once, in its report, and
``python -m pkm_lm.torchrun`` (torchrun's arguments) prints it alone and exits with status 2.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import CompactHydraException, OverrideParseException
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from pkm_lm.atomic import atomic_write_text
from pkm_lm.errors import ConfigError, UserError

USER_ERRORS = (
    UserError,
    CompactHydraException,
    MissingMandatoryValue,
    InterpolationToMissingValueError,
)
# The exit status of a user error, as argparse's; ``pkm_lm.torchrun`` passes it on.
USER_ERROR_STATUS = 2
# OmegaConf's context lines under a message (the key is already in it), and Hydra's search path.
_DETAIL = re.compile(r"^\s*(full_key:|reference_type=|object_type=)")
# An override without a key (``=3``, ``+=3``): Hydra fails on it with a bare ValueError.
_NO_KEY = re.compile(r"^[+~]*=")


def _text(error: BaseException) -> str:
    text = str(error).split("\nConfig search path:")[0]
    if isinstance(error, OverrideParseException) and error.override not in text:
        text = f"Error parsing override '{error.override}': {text}"
    text = re.sub(r":?\n+\t", lambda m: ": " if m.group(0).startswith(":") else ", ", text)
    lines = [line.strip() for line in text.splitlines() if not _DETAIL.match(line)]
    return " ".join(line for line in lines if line)


def one_line(error: BaseException) -> str:
    """The message of ``error`` and of its causes (Hydra wraps OmegaConf's), on one line."""
    parts: list[str] = []
    cause: BaseException | None = error
    while cause is not None:
        text = _text(cause)
        if text and not any(text in part for part in parts):
            parts.append(text)
        cause = cause.__cause__
    return ": ".join(parts)


def report(error: BaseException) -> None:
    """``error: <message>`` on stderr, or in torchrun's error file for this process."""
    line = f"error: {one_line(error)}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        atomic_write_text(error_file, json.dumps({"message": line, "timestamp": int(time.time())}))
    else:
        print(line, file=sys.stderr, flush=True)


def main(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``func``; on a user error print ``error: <message>`` and exit with status 2."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as e:
            report(e)
            raise SystemExit(USER_ERROR_STATUS) from None

    return run


def check_override_keys(args: list[str]) -> None:
    """Refuse a command-line override without a key before Hydra fails on it with a traceback."""
    for arg in args:
        if _NO_KEY.match(arg):
            raise ConfigError(f"{arg} is not an override: it needs a key, KEY=VALUE")


def hydra_main(config_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``hydra.main`` on ``configs/<config_name>.yaml`` with user errors reported as ``main``."""

    def decorate(task: Callable[..., Any]) -> Callable[..., Any]:
        job = hydra.main(version_base="1.3", config_path="../configs", config_name=config_name)(
            main(task)
        )

        @functools.wraps(job)
        @main
        def run(*args: Any, **kwargs: Any) -> Any:
            # Hydra prints the composition errors it catches and exits 1; with HYDRA_FULL_ERROR
            # set it re-raises them, so that ``main`` reports them.
            os.environ.setdefault("HYDRA_FULL_ERROR", "1")
            check_override_keys(sys.argv[1:])
            return job(*args, **kwargs)

        return run

    return decorate
