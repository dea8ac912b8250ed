"""Command-line entry points: a user's mistake is one line on stderr, a bug keeps its traceback.

A ``UserError``, and the configuration errors that Hydra and OmegaConf raise for a bad override
(an unknown key, a value of the wrong type, a missing experiment, a missing mandatory value),
print ``error: <message>`` and exit with status 2, as argparse does for its usage errors. Any
other exception propagates with its full traceback. ``@cli.main`` wraps an argparse ``main``;
``@cli.hydra_main("train")`` replaces ``@hydra.main`` and catches errors both while Hydra composes
the config and inside the job (where Hydra would print "Error executing job" first).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import CompactHydraException
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from pkm_lm.errors import UserError

USER_ERRORS = (
    UserError,
    CompactHydraException,
    MissingMandatoryValue,
    InterpolationToMissingValueError,
)
# OmegaConf's context lines under a message (the key is already in it), and Hydra's search path.
_DETAIL = re.compile(r"^\s*(full_key:|reference_type=|object_type=)")


def _text(error: BaseException) -> str:
    text = str(error).split("\nConfig search path:")[0]
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


def main(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``func``; on a user error print ``error: <message>`` and exit with status 2."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as e:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return run


def hydra_main(config_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``hydra.main`` on ``configs/<config_name>.yaml`` with user errors reported as ``main``."""

    def decorate(task: Callable[..., Any]) -> Callable[..., Any]:
        job = hydra.main(version_base="1.3", config_path="../configs", config_name=config_name)(
            main(task)
        )

        @functools.wraps(job)
        def run(*args: Any, **kwargs: Any) -> Any:
            # Hydra prints the composition errors it catches and exits 1; with HYDRA_FULL_ERROR
            # set it re-raises them, so that ``main`` reports them.
            os.environ.setdefault("HYDRA_FULL_ERROR", "1")
            return main(job)(*args, **kwargs)

        return run

    return decorate
