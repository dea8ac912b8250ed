"""Binary token shards: a small fixed header followed by a flat array of token ids.

Layout (little endian), 64-byte header so the payload stays aligned for memory-mapping:

    magic   8s   b"PKMTOKS\\0"
    version u32  FORMAT_VERSION
    itemsz  u32  2 (uint16) or 4 (uint32)
    ntok    u64  number of tokens in the payload
    crc32   u32  zlib.crc32 of the payload bytes
    pad     36x

A shard is written to a temporary name and renamed when complete, so a killed run can
never leave a half-written file under a name the loader would accept; on open the file
size must match the header exactly and, when asked, the checksum is re-computed.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from pkm_lm.errors import DataError, check_choice, invalid

MAGIC = b"PKMTOKS\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQI36x")
HEADER_SIZE = HEADER.size  # 64
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_CRC_BLOCK = 1 << 24  # bytes hashed per step when verifying, to keep memory flat


class ShardError(DataError):
    """A shard file is missing, truncated, corrupted or of an unknown format."""


def dtype_for_vocab(vocab_size: int, dtype: str = "auto") -> str:
    """The smallest id dtype for `vocab_size` ("auto"), or check that the requested one fits."""
    if dtype == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    check_choice("dtype", dtype, ("auto", *DTYPES))
    limit = np.iinfo(DTYPES[dtype]).max + 1
    if vocab_size > limit:
        raise invalid(
            "dtype",
            dtype,
            f"a vocabulary of {vocab_size} tokens overflows it (at most {limit} ids); "
            "use dtype=uint32 or dtype=auto",
        )
    return dtype


class ShardWriter:
    """Streams token-id arrays into one shard; `close()` seals it under its final name."""

    def __init__(self, path: str | os.PathLike, dtype: str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not allowed: use one of {sorted(DTYPES)}")
        self.path = Path(path)
        self.dtype = np.dtype(DTYPES[dtype])
        self.n_tokens = 0
        self.crc = 0
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")
        self._file.write(b"\0" * HEADER_SIZE)  # real header written on close

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype.name} in {self.path}")
        data = ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._file.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.n_tokens += ids.size

    def close(self) -> dict:
        """Seal the shard; returns its manifest entry."""
        header = HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self.n_tokens, self.crc)
        self._file.seek(0)
        self._file.write(header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return {"file": self.path.name, "tokens": self.n_tokens, "crc32": self.crc}

    def abort(self) -> None:
        """Drop the temporary file (on error)."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def read_header(path: str | os.PathLike) -> tuple[np.dtype, int, int]:
    """(dtype, n_tokens, crc32) of a shard, after checking magic, version and file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e}") from e
    if len(raw) < HEADER_SIZE:
        raise ShardError(f"shard {path} is truncated: {size} bytes, smaller than its header")
    magic, version, itemsize, n_tokens, crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(f"{path} is not a pkm-lm token shard (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"shard {path} has format version {version}; this reader knows {FORMAT_VERSION}"
        )
    if itemsize not in (2, 4):
        raise ShardError(f"shard {path} has item size {itemsize}; allowed: 2 (uint16), 4 (uint32)")
    expected = HEADER_SIZE + n_tokens * itemsize
    if size != expected:
        raise ShardError(
            f"shard {path} is truncated or corrupted: {size} bytes, header says {expected}"
        )
    dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32).newbyteorder("<")
    return dtype, n_tokens, crc


def verify_checksum(path: str | os.PathLike, expected: int) -> None:
    """Re-hash the payload in blocks; raise ShardError naming the file on mismatch."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        while block := f.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    if crc != expected:
        raise ShardError(
            f"shard {path} is corrupted: checksum {crc:#010x}, expected {expected:#010x}"
        )


def open_shard(path: str | os.PathLike, verify: bool = True) -> np.ndarray:
    """Memory-map a shard's token ids (read-only)."""
    dtype, n_tokens, crc = read_header(path)
    if verify:
        verify_checksum(path, crc)
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(n_tokens,))
