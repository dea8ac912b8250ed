"""Streaming text in bounded chunks, and an order-preserving process pool with a bounded queue.

Together they keep peak memory independent of corpus size (XLM's binarizer held the whole
corpus and ran out of memory above 128 GB) while using every core for the slow steps.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not valid UTF-8 (surrogateescape)


@dataclass
class Chunk:
    """A run of whole lines of a file: their text, raw size and invalid bytes replaced."""

    lines: list[str]
    n_bytes: int
    n_replaced: int


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode, replacing each invalid byte by U+FFFD; returns (text, number replaced)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="surrogateescape")
        n_bad = len(_ESCAPED.findall(text))
        return _ESCAPED.sub("\ufffd", text), n_bad


def read_chunks(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Yield `path` as chunks of about `chunk_bytes` bytes, cut at line ends.

    Lines are split on "\\n" only (a byte that never occurs inside a UTF-8 sequence), so
    a chunk never splits a character; the trailing newline is dropped from each line.
    """
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            if not data:
                return
            if not data.endswith(b"\n"):
                data += f.readline()
            text, n_bad = decode_utf8(data)
            yield Chunk(
                text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), len(data), n_bad
            )


def count_bytes(paths: Iterable[str | os.PathLike]) -> int:
    return sum(Path(p).stat().st_size for p in paths)


_worker_fn: Callable | None = None  # the mapped callable, set once per pool process


def _install(fn: Callable) -> None:
    global _worker_fn
    _worker_fn = fn


def _call(item):
    return _worker_fn(item)


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator[tuple]:
    """Yield `(item, fn(item))` over `workers` processes, in input order, at most 2*workers in flight.

    `fn` is sent to each worker once (not with every item), so it may carry a vocabulary and
    build heavy state lazily on its first call. Unlike Pool.imap, which drains its input as
    fast as it can, the bounded window keeps the reader from pulling the corpus into memory
    ahead of the workers. With workers == 1 it runs in this process: 1 and N workers run the
    same code on the same chunks, hence give identical output.
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if workers == 1:
        for item in items:
            yield item, fn(item)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_install, initargs=(fn,)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.apply_async(_call, (item,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
