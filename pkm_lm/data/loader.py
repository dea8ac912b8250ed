"""Reading token shards: one array across shards, a resumable training stream, eval batches."""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pkm_lm.errors import invalid, show

from .manifest import load_manifest
from .shards import ShardError, open_shard


class TokenArray:
    """A split's token ids as one read-only sequence over memory-mapped shards.

    `a[i:j]` returns an np.ndarray and may cross shard boundaries; pickling keeps only the
    paths (worker processes re-map the files instead of copying the data).
    """

    def __init__(self, paths: list[str | os.PathLike], verify: bool = True):
        self.paths = [str(p) for p in paths]
        self._shards = [open_shard(p, verify=verify) for p in self.paths]
        self._starts = [0]
        for shard in self._shards:
            self._starts.append(self._starts[-1] + len(shard))
        dtypes = {s.dtype for s in self._shards}
        if len(dtypes) > 1:
            raise ShardError(f"shards {self.paths} mix dtypes {sorted(d.name for d in dtypes)}")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self._starts[-1]

    def __reduce__(self):
        return (TokenArray, (self.paths, False))

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"token index {key} out of range for {n} tokens")
            s = bisect.bisect_right(self._starts, i) - 1
            return self._shards[s][i - self._starts[s]]
        if not isinstance(key, slice):
            raise TypeError(f"TokenArray indices must be int or slice, not {type(key).__name__}")
        start, stop, step = key.indices(n)
        if step != 1:
            return self[start:stop][::step]
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = bisect.bisect_right(self._starts, start) - 1
        last = bisect.bisect_right(self._starts, stop - 1) - 1
        if first == last:
            off = self._starts[first]
            return np.asarray(self._shards[first][start - off : stop - off])
        parts = []
        for s in range(first, last + 1):
            off = self._starts[s]
            parts.append(
                self._shards[s][max(start, off) - off : min(stop, self._starts[s + 1]) - off]
            )
        return np.concatenate(parts)


def open_split(data_dir: str | os.PathLike, split: str, verify: bool = True) -> TokenArray:
    """The token ids of `split` in a preprocessed dataset directory.

    `verify` re-checks every shard's checksum (reads the split once); sizes are always checked.
    """
    manifest = load_manifest(data_dir)
    splits = manifest["splits"]
    if split not in splits:
        raise invalid("split", split, f"not in {data_dir}; available: {show(sorted(splits))}")
    return TokenArray([Path(data_dir) / s["file"] for s in splits[split]["shards"]], verify=verify)


def _chunks(tokens, starts: np.ndarray, length: int) -> torch.Tensor:
    """Rows tokens[s : s + length] for each start, as an int64 tensor (len(starts), length)."""
    out = np.empty((len(starts), length), dtype=np.int64)
    for row, s in enumerate(starts):
        out[row] = tokens[int(s) : int(s) + length]
    return torch.from_numpy(out)


def _consecutive_chunks(tokens, first: int, rows: int, seq_len: int) -> torch.Tensor:
    """Chunks first..first+rows-1 with one contiguous read (neighbours share one token)."""
    start = first * seq_len
    flat = np.asarray(tokens[start : start + rows * seq_len + 1], dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(flat, seq_len + 1)[::seq_len]
    return torch.from_numpy(view.copy())


class TokenStream:
    """Endless, resumable, rank-partitioned (B/W, T+1) batches of contiguous token chunks.

    Chunk i covers tokens[i*T : i*T + T + 1] (inputs and next-token targets). Epoch e visits
    chunks in document order, or in a permutation seeded by (seed, e) with `shuffle`; global
    batch b is chunks order_e[b*B:(b+1)*B] (an incomplete last batch is dropped) and rank r
    takes rows [r*B/W, (r+1)*B/W). Global batches do not depend on the world size, so a run
    may resume on a different number of ranks and see the same data.
    """

    def __init__(
        self,
        tokens,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = False,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by world_size={world_size}: "
                "the global batch must split evenly over ranks"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.n_chunks = max(len(tokens) - 1, 0) // seq_len
        self.batches_per_epoch = self.n_chunks // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(tokens)} tokens make {self.n_chunks} chunks of seq_len={seq_len}, "
                f"fewer than one batch of batch_size={batch_size}"
            )
        self.epoch = 0
        self.batch = 0  # next global batch index within the epoch
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _epoch_order(self) -> np.ndarray:
        """The shuffled chunk order of the current epoch (int32 while it fits: half the memory)."""
        if self._order_epoch != self.epoch:
            dtype = np.int32 if self.n_chunks < 2**31 else np.int64
            self._order = np.arange(self.n_chunks, dtype=dtype)
            np.random.default_rng([self.seed, self.epoch]).shuffle(self._order)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> torch.Tensor:
        """This rank's rows of the next global batch; advances the stream."""
        per_rank = self.batch_size // self.world_size
        lo = self.batch * self.batch_size + self.rank * per_rank
        if self.shuffle:
            starts = self._epoch_order()[lo : lo + per_rank].astype(np.int64) * self.seq_len
            batch = _chunks(self.tokens, starts, self.seq_len + 1)
        else:  # document order: chunk ids are positions, no order array needed
            batch = _consecutive_chunks(self.tokens, lo, per_rank, self.seq_len)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch += 1
            self.batch = 0
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_chunks": self.n_chunks,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved position; the data and global-batch settings must match."""
        for key in ("seed", "shuffle", "seq_len", "batch_size", "n_chunks"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume TokenStream: saved {key}={state[key]!r}, "
                    f"this stream has {key}={getattr(self, key)!r}"
                )
        if not 0 <= state["batch"] < self.batches_per_epoch:
            raise ValueError(
                f"cannot resume TokenStream: batch={state['batch']} outside "
                f"[0, {self.batches_per_epoch})"
            )
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])


def eval_batches(
    tokens, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """One in-order pass over `tokens` in which every token but the first is a target once.

    Yields batches of up to `batch_size` full (T+1)-token chunks, then the final partial
    chunk alone as (1, r+1); batch k goes to rank k % world_size.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    n_targets = max(len(tokens) - 1, 0)
    n_full = n_targets // seq_len
    k = 0
    for first in range(0, n_full, batch_size):
        if k % world_size == rank:
            yield _consecutive_chunks(tokens, first, min(batch_size, n_full - first), seq_len)
        k += 1
    rest = n_targets - n_full * seq_len
    if rest and k % world_size == rank:
        tail = np.asarray(tokens[n_full * seq_len :], dtype=np.int64)
        yield torch.from_numpy(tail).unsqueeze(0)
