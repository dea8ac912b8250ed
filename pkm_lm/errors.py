"""Errors a user can fix, and the one wording every setting's validation uses.

A ``UserError`` (a setting outside what is allowed, a missing or unfinished input, a missing tool)
is printed by the command lines as one line, ``error: <message>``, with exit status 2 and no
traceback (``pkm_lm.cli``); any other exception is a bug and keeps its traceback. Each subclass
also derives from the built-in exception the code raised before, so ``except ValueError`` and
``except FileNotFoundError`` in library code keep working.

Settings are named as the user writes them on the command line: ``model.memory.knn=100000 is
invalid: must be an integer in [1, model.memory.n_keys=128]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any


class UserError(Exception):
    """A mistake the user can fix; the command lines print its message alone."""


class ConfigError(UserError, ValueError):
    """A setting outside what is allowed."""


class DataError(UserError, ValueError):
    """Input data that cannot be used as it is: empty, corrupted or unfinished."""


class NotFoundError(UserError, FileNotFoundError):
    """A file, directory or tool that the command needs is not there."""


class NotInstalledError(UserError, ImportError):
    """A Python package that the chosen option needs is not installed."""


def show(value: Any) -> str:
    """A value as it is typed in a Hydra override: ``fp8``, ``null``, ``true``, ``[1, 2]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    if isinstance(value, Iterable):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def invalid(key: str, value: Any, rule: str) -> ConfigError:
    """``key=value is invalid: rule``; ``rule`` says what is allowed ("must be ...")."""
    return ConfigError(f"{key}={show(value)} is invalid: {rule}")


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise invalid(key, value, rule)


def check_choice(key: str, value: Any, allowed: Sequence) -> None:
    require(value in allowed, key, value, "must be one of " + ", ".join(map(show, allowed)))


def check_positive(key: str, value: Any) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    require(ok, key, value, "must be an integer >= 1")


def check_probability(key: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0
    require(ok, key, value, "must be a probability in [0, 1)")


def import_extra(module: str, purpose: str, extra: str = "data") -> ModuleType:
    """``module``, imported; where it is missing, an error naming the extra that installs it
    (the layer and the trainer need none of the text-processing packages)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise NotInstalledError(
            f"{purpose} needs the {module} package: pip install 'pkm-lm[{extra}]'"
        ) from err
