"""`dataset.json`: what a preprocessed dataset directory holds and how it was made."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pkm_lm.atomic import atomic_write_bytes
from pkm_lm.errors import DataError, NotFoundError

MANIFEST_NAME = "dataset.json"
SPLITS = ("train", "valid", "test")
SPECIAL = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3}  # XLM's ids


def manifest_path(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / MANIFEST_NAME


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest as written so far (possibly of an unfinished run), or {} when absent."""
    path = manifest_path(data_dir)
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_manifest(data_dir: str | os.PathLike, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(manifest_path(data_dir), text.encode("utf-8"))


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a finished dataset: "vocab_size", "special", "splits", "dtype", ...

    Raises FileNotFoundError / ValueError naming the directory when it was never or only
    partly preprocessed.
    """
    path = manifest_path(data_dir)
    if not path.exists():
        raise NotFoundError(
            f"{path} not found: data dir {data_dir} is not preprocessed "
            "(run `python -m pkm_lm.preprocess raw_dir=... out_dir=...`)"
        )
    manifest = read_manifest(data_dir)
    if not manifest.get("complete"):
        raise DataError(
            f"{path} describes an unfinished preprocessing run; rerun `python -m pkm_lm.preprocess` "
            f"with out_dir={data_dir} to finish it"
        )
    return manifest
