"""Token shards and the loader: boundaries, resumption, rank partitions, eval coverage."""

import pickle

import numpy as np
import pytest
import torch

from pkm_lm.data import ShardError, TokenArray, TokenStream, eval_batches, open_split
from pkm_lm.data.manifest import write_manifest
from pkm_lm.data.shards import HEADER_SIZE, ShardWriter, dtype_for_vocab


def make_dataset(tmp_path, tokens: np.ndarray, shard_sizes: list[int], dtype="uint16"):
    """A dataset dir whose train split is `tokens` cut into shards of `shard_sizes`."""
    assert sum(shard_sizes) == len(tokens)
    shards, start = [], 0
    for k, size in enumerate(shard_sizes):
        writer = ShardWriter(tmp_path / f"train.{k:05d}.bin", dtype)
        writer.write(tokens[start : start + size])
        shards.append(writer.close())
        start += size
    write_manifest(
        tmp_path,
        {
            "complete": True,
            "vocab_size": int(tokens.max()) + 1,
            "splits": {"train": {"shards": shards, "tokens": len(tokens)}},
        },
    )
    return tmp_path


@pytest.fixture
def tokens():
    return np.random.default_rng(0).integers(0, 60000, size=1000).astype(np.int64)


def test_shard_boundaries_invisible(tmp_path, tokens):
    data = make_dataset(tmp_path, tokens, [1, 300, 0, 450, 249])
    a = open_split(data, "train")
    assert len(a) == len(tokens)
    for i, j in [
        (0, 1000),
        (0, 1),
        (1, 2),
        (290, 310),
        (299, 752),
        (750, 751),
        (998, 1000),
        (5, 5),
    ]:
        np.testing.assert_array_equal(a[i:j], tokens[i:j])
    assert a[301] == tokens[301] and a[-1] == tokens[-1]
    np.testing.assert_array_equal(a[10:400:7], tokens[10:400:7])
    with pytest.raises(IndexError):
        a[1000]
    b = pickle.loads(pickle.dumps(a))  # by path, re-mapped
    np.testing.assert_array_equal(b[0:1000], tokens)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_dtype_roundtrip(tmp_path, dtype):
    tokens = np.array([0, 1, 65535, 7], dtype=np.int64)
    a = open_split(make_dataset(tmp_path, tokens, [4], dtype), "train")
    assert a.dtype.itemsize == (2 if dtype == "uint16" else 4)
    np.testing.assert_array_equal(a[:], tokens)


def test_dtype_overflow():
    assert dtype_for_vocab(65536) == "uint16"
    assert dtype_for_vocab(65537) == "uint32"
    with pytest.raises(
        ValueError, match="dtype=uint16 is invalid: a vocabulary of 70000 tokens overflows"
    ):
        dtype_for_vocab(70000, "uint16")
    with pytest.raises(
        ValueError, match="dtype=int8 is invalid: must be one of auto, uint16, uint32"
    ):
        dtype_for_vocab(10, "int8")
    writer = ShardWriter("/tmp/unused-overflow.bin", "uint16")
    with pytest.raises(ValueError, match="out of range"):
        writer.write(np.array([70000]))
    writer.abort()


def test_truncated_and_corrupted_shards(tmp_path, tokens):
    data = make_dataset(tmp_path, tokens, [500, 500])
    shard = tmp_path / "train.00001.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-2])
    with pytest.raises(ShardError, match="train.00001.bin is truncated"):
        open_split(data, "train")
    corrupted = bytearray(raw)
    corrupted[HEADER_SIZE + 10] ^= 0xFF
    shard.write_bytes(bytes(corrupted))
    with pytest.raises(ShardError, match="train.00001.bin is corrupted: checksum"):
        open_split(data, "train")
    open_split(data, "train", verify=False)  # size still right: only the checksum catches it
    shard.write_bytes(b"garbage" * 20)
    with pytest.raises(ShardError, match="not a pkm-lm token shard"):
        TokenArray([shard])
    shard.write_bytes(raw[:10])
    with pytest.raises(ShardError, match="smaller than its header"):
        TokenArray([shard])


def test_unfinished_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="not preprocessed"):
        open_split(tmp_path, "train")
    write_manifest(tmp_path, {"complete": False})
    with pytest.raises(ValueError, match="unfinished"):
        open_split(tmp_path, "train")


def test_stream_chunks_and_epochs(tokens):
    s = TokenStream(tokens, seq_len=10, batch_size=4)
    assert s.n_chunks == 99 and s.batches_per_epoch == 24
    it = iter(s)
    first = next(it)
    assert first.shape == (4, 11) and first.dtype == torch.int64
    for r in range(4):
        np.testing.assert_array_equal(first[r].numpy(), tokens[r * 10 : r * 10 + 11])
    for _ in range(23):
        next(it)
    assert s.epoch == 1 and s.batch == 0
    np.testing.assert_array_equal(next(it).numpy(), first.numpy())  # document order repeats


def test_shuffle_is_a_seeded_permutation_per_epoch(tokens):
    def epochs(seed, n=2):
        s = TokenStream(tokens, seq_len=10, batch_size=3, shuffle=True, seed=seed)
        return [torch.cat([s.next_batch() for _ in range(s.batches_per_epoch)]) for _ in range(n)]

    epoch0, epoch1 = epochs(seed=5)
    expected = sorted(tuple(tokens[c * 10 : c * 10 + 11]) for c in range(99))
    assert sorted(tuple(row) for row in epoch0.tolist()) == expected  # 99 % 3 == 0: all chunks
    assert not torch.equal(epoch0, epoch1)  # a new permutation each epoch
    assert torch.equal(epochs(seed=5)[1], epoch1)  # ... determined by (seed, epoch)
    assert not torch.equal(epochs(seed=6, n=1)[0], epoch0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_mid_epoch(tokens, shuffle):
    ref = TokenStream(tokens, seq_len=7, batch_size=8, shuffle=shuffle, seed=3)
    batches = [ref.next_batch() for _ in range(40)]  # crosses an epoch (17 batches/epoch)
    s = TokenStream(tokens, seq_len=7, batch_size=8, shuffle=shuffle, seed=3)
    for _ in range(13):
        s.next_batch()
    state = pickle.loads(pickle.dumps(s.state_dict()))
    resumed = TokenStream(tokens, seq_len=7, batch_size=8, shuffle=shuffle, seed=3)
    resumed.load_state_dict(state)
    for b in batches[13:]:
        assert torch.equal(resumed.next_batch(), b)
    wrong = TokenStream(tokens, seq_len=7, batch_size=4, shuffle=shuffle, seed=3)
    with pytest.raises(ValueError, match="saved batch_size=8"):
        wrong.load_state_dict(state)


@pytest.mark.parametrize("shuffle", [False, True])
def test_rank_partition_is_disjoint_and_complete(tokens, shuffle):
    world = 4
    single = TokenStream(tokens, seq_len=9, batch_size=8, shuffle=shuffle, seed=1)
    ranks = [
        TokenStream(tokens, 9, 8, rank=r, world_size=world, shuffle=shuffle, seed=1)
        for r in range(world)
    ]
    for _ in range(single.batches_per_epoch + 2):
        parts = [r.next_batch() for r in ranks]
        assert all(p.shape == (2, 10) for p in parts)
        assert torch.equal(torch.cat(parts), single.next_batch())


def test_stream_errors(tokens):
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by world_size=4"):
        TokenStream(tokens, 10, 6, world_size=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        TokenStream(tokens[:50], 10, 8)
    with pytest.raises(ValueError, match="rank=2"):
        TokenStream(tokens, 10, 4, rank=2, world_size=2)


@pytest.mark.parametrize(
    "n,seq_len,batch_size,world",
    [(1000, 10, 4, 1), (1000, 7, 3, 3), (23, 5, 2, 2), (11, 5, 8, 4), (1, 5, 2, 1)],
)
def test_eval_covers_every_target_once(tokens, n, seq_len, batch_size, world):
    data = tokens[:n]
    targets, positions = [], 0
    per_rank = [list(eval_batches(data, seq_len, batch_size, r, world)) for r in range(world)]
    k = 0  # batches are dealt round-robin: rebuild the global order
    while any(per_rank):
        batch = per_rank[k % world].pop(0)
        k += 1
        for row in batch:
            np.testing.assert_array_equal(row.numpy(), data[positions : positions + len(row)])
            targets.extend(row[1:].tolist())
            positions += len(row) - 1
    np.testing.assert_array_equal(targets, data[1:])
    last = list(eval_batches(data, seq_len, batch_size))
    if (n - 1) % seq_len:
        assert last[-1].shape == (1, (n - 1) % seq_len + 1)
