"""fastBPE: learn codes with its C++ `fast learnbpe` tool, apply them with its Python API.

fastBPE calls exit(1) on a file it cannot open, which would kill the whole Python process
(and a training job with it), so every path is checked here before fastBPE sees it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from pkm_lm.atomic import atomic_write_bytes
from pkm_lm.errors import DataError, NotFoundError, import_extra, invalid

BPE_SUFFIX = "@@"


def find_fast_binary() -> Path:
    """The fastBPE command-line tool: $PKM_FASTBPE, else `fast` beside sys.executable, else PATH."""
    env = os.environ.get("PKM_FASTBPE")
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise NotFoundError(f"PKM_FASTBPE={env} is not an executable file")
        return path
    beside = Path(sys.executable).parent / "fast"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    on_path = shutil.which("fast")
    if on_path:
        return Path(on_path)
    raise NotFoundError(
        f"fastBPE's `fast` tool was not found (looked at $PKM_FASTBPE, {beside} and PATH); "
        "run `make setup`, which builds it into .venv/bin/fast"
    )


def check_readable(path: str | os.PathLike, what: str) -> Path:
    """Raise a clear error unless `path` is a non-empty readable file."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{what} {path} does not exist")
    if not os.access(path, os.R_OK):
        raise DataError(f"{what} {path} is not readable")
    if path.stat().st_size == 0:
        raise DataError(f"{what} {path} is empty")
    return path


def learn_codes(
    text_path: str | os.PathLike,
    codes_path: str | os.PathLike,
    n_codes: int,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Learn `n_codes` merges on a tokenised text file; returns the number of codes written.

    The text is fed to `fast learnbpe` on stdin in blocks (`on_bytes` hears of each, for a
    progress bar): given a path, the tool would mmap the whole file, and its resident
    memory would grow with the corpus.
    """
    if n_codes < 1:
        raise invalid("bpe.n_codes", n_codes, "must be an integer >= 1")
    check_readable(text_path, "BPE training text")
    cmd = [str(find_fast_binary()), "learnbpe", str(n_codes), "-"]
    codes_path = Path(codes_path)
    tmp = codes_path.with_name(f".{codes_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as dst, tempfile.TemporaryFile() as err, open(text_path, "rb") as src:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=dst, stderr=err)
            try:
                while block := src.read(1 << 20):
                    proc.stdin.write(block)
                    if on_bytes is not None:
                        on_bytes(len(block))
            except BrokenPipeError:
                pass  # the tool died: its exit status and message are reported below
            finally:
                proc.stdin.close()
            if proc.wait() != 0:
                err.seek(0)
                message = err.read().decode(errors="replace")[-2000:]
                raise RuntimeError(
                    f"`{' '.join(cmd)} < {text_path}` failed ({proc.returncode}): {message}"
                )
        with open(tmp, "rb") as f:
            n = sum(1 for _ in f)
        os.replace(tmp, codes_path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


@contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ output that Python's sys.stderr cannot catch)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class BPEApplier:
    """Applies codes (restricted to `vocab` when given, as XLM does for valid/test).

    Output equals fastBPE's `apply` (words split on single spaces, empty words dropped), but
    each distinct word is segmented once and remembered: fastBPE re-segments every
    occurrence, and in Zipf-distributed text most occurrences are repeats (4-5x faster).
    """

    def __init__(
        self,
        codes_path: str | os.PathLike,
        vocab_path: str | os.PathLike | None = None,
        cache_words: int = 1 << 19,
    ):
        fastBPE = import_extra("fastBPE", "applying BPE codes")  # C extension, where used

        check_readable(codes_path, "BPE codes file")
        if vocab_path is not None:
            check_readable(vocab_path, "BPE vocabulary file")
        with _quiet_stderr():  # it prints "Loading codes ..." from C++ in every worker
            self._bpe = fastBPE.fastBPE(str(codes_path), str(vocab_path) if vocab_path else "")
        self._cache: dict[str, str] = {}
        self._cache_words = cache_words  # bounds memory on corpora with a long tail of words

    def apply(self, lines: list[str]) -> list[str]:
        cache = self._cache
        split = [[w for w in line.split(" ") if w] for line in lines]
        new = list({w for words in split for w in words if w not in cache})
        if len(cache) + len(new) > self._cache_words:
            cache.clear()
            new = list({w for words in split for w in words})
        cache.update(zip(new, self._bpe.apply(new), strict=True))
        return [" ".join([cache[w] for w in words]) for words in split]


def count_bpe_tokens(lines: list[str], applier: BPEApplier) -> Counter:
    """Counts of BPE tokens in `lines`: words are counted first and each distinct one
    segmented once (the same counts as segmenting every line)."""
    words = Counter(w for line in lines for w in line.split(" ") if w)
    counts: Counter = Counter()
    for n, pieces in zip(words.values(), applier.apply(list(words)), strict=True):
        for piece in pieces.split(" "):
            counts[piece] += n
    return counts


def write_vocab(path: str | os.PathLike, counts: Counter) -> None:
    """fastBPE's vocab format: `token count` per line, most frequent first (ties by token)."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    atomic_write_bytes(path, "".join(f"{t} {c}\n" for t, c in items).encode("utf-8"))


def read_vocab(path: str | os.PathLike) -> list[str]:
    """Tokens of a fastBPE vocab file, in file order."""
    check_readable(path, "vocabulary file")
    tokens = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1].isdigit():
                raise ValueError(f"{path}:{n}: expected `token count`, got {line.rstrip()!r}")
            tokens.append(parts[0])
    return tokens


def join_bpe(text: str) -> str:
    """Undo BPE segmentation: "hel@@ lo" -> "hello"."""
    return text.replace(BPE_SUFFIX + " ", "").removesuffix(BPE_SUFFIX)
