"""pkm_lm.distributed: device choice, sparse value-gradient averaging (both branches) on 2 gloo
processes against one process, and the synced query BatchNorm; on the same 2 processes, the
memory statistics summed over ranks."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pkm_lm.distributed import SparseGrads, SyncedBatchNorm1d, resolve_device
from pkm_lm.memory import MemoryStats
from pkm_lm.memory.values import value_bag

torch.set_num_threads(1)
ROWS, WIDTH = 40, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args, nprocs: int = 2) -> list:
    """Run ``worker(rank, port, *args, out)`` on 2 gloo ranks; the results, in rank order."""
    out = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(free_port(), *args, out), nprocs=nprocs, start_method="spawn")
    return [r[1:] for r in sorted((out.get() for _ in range(nprocs)), key=lambda r: r[0])]


def reads(rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s reads of micro-step ``micro``: (tokens, reads) slot ids and weights.

    Rank 1 reads more rows than rank 0 (padding in the gather), the ranks overlap, and some rows
    are read by nobody."""
    g = torch.Generator().manual_seed(10 * rank + micro)
    n_tokens = 3 + 4 * rank
    return torch.randint(0, ROWS - 8, (n_tokens, 4), generator=g), torch.rand(
        n_tokens, 4, generator=g
    )


def table() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(0)))


def backward(p: torch.nn.Parameter, rank: int, micro: int, scale: float = 1.0) -> None:
    idx, w = reads(rank, micro)
    out = value_bag(idx, w, p, sparse=True)
    (out.square().sum() * scale).backward()


def sparse_gradient(rank: int, dense_fraction: float, micros: int, exact) -> tuple:
    """This rank's gradient after ``micros`` micro-steps, averaged by ``SparseGrads``: (branches
    taken, its rows, the dense gradient)."""
    p = table()
    grads = SparseGrads([p], dense_fraction, exact)
    for micro in range(micros):
        backward(p, rank, micro)
        if micro > 0:
            grads.compact_()
    branches = grads.all_reduce_()
    return branches, p.grad._indices()[0].tolist(), p.grad.to_dense().numpy()


def synced_batchnorm(rank: int, x: torch.Tensor, w: torch.Tensor) -> tuple:
    """This rank's half of ``x`` through a ``SyncedBatchNorm1d``: (input gradient, affine weight
    gradient, running mean, running variance)."""
    torch.manual_seed(0)
    bn = SyncedBatchNorm1d(x.shape[1])
    xr = x[rank * 3 : rank * 3 + 3].clone().requires_grad_()
    (bn(xr) * w[rank * 3 : rank * 3 + 3]).sum().backward()
    # numpy, not tensors: torch would share their memory with a process that is about to exit
    tensors = (xr.grad, bn.weight.grad, bn.running_mean, bn.running_var)
    return tuple(t.detach().numpy() for t in tensors)


def summed_memory_stats(rank: int, idx: torch.Tensor, w: torch.Tensor) -> tuple:
    """``MemoryStats`` of this rank's share of the reads (every other token), summed over the
    ranks: (weights, counts)."""
    stats = MemoryStats(30)
    stats.update(idx[rank::2], w[rank::2])
    stats.all_reduce()
    return stats.weights.numpy(), stats.counts.numpy()


BRANCHES = [(0.0, "dense"), (float("inf"), "gather")]
MICRO_STEPS = [(1, None), (3, None), (3, False)]


def _worker(rank: int, port: int, inputs: dict, out) -> None:
    """Every check's collectives in one process group (each spawn costs seconds of imports)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sparse = {
        (dense_fraction, micros, exact): sparse_gradient(rank, dense_fraction, micros, exact)
        for (dense_fraction, _), (micros, exact) in itertools.product(BRANCHES, MICRO_STEPS)
    }
    bn, stats = synced_batchnorm(rank, *inputs["bn"]), summed_memory_stats(rank, *inputs["stats"])
    out.put((rank, sparse, bn, stats))
    dist.barrier()  # no rank leaves while the other's last collective is in flight (gloo aborts)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> tuple[dict, list]:
    """The inputs of ``_worker`` (the BatchNorm's inputs and output weights, the statistics'
    slots and weights), and each rank's results."""
    g = torch.Generator().manual_seed(0)
    inputs = {
        "bn": (torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)),
        "stats": (
            torch.randint(0, 30, (20, 2, 3), generator=g),
            torch.rand(20, 2, 3, dtype=torch.float64, generator=g),
        ),
    }
    return inputs, spawn(_worker, inputs)


@pytest.mark.parametrize(
    ("micros", "exact"),
    MICRO_STEPS,
    ids=["one-micro-step", "accumulated", "fixed-size-rows-as-on-gpus"],
)
@pytest.mark.parametrize(("dense_fraction", "branch"), BRANCHES)
def test_both_branches_equal_the_single_process_gradient(
    two_ranks, dense_fraction, branch, micros, exact
):
    # One process sees both ranks' reads; the mean over ranks is half their sum.
    ref = table()
    for rank in range(2):
        for micro in range(micros):
            backward(ref, rank, micro, scale=0.5)
    touched = torch.cat([reads(r, m)[0].reshape(-1) for r in range(2) for m in range(micros)])
    for sparse, *_ in two_ranks[1]:
        branches, rows, grad = sparse[(dense_fraction, micros, exact)]
        assert branches == [branch]
        grad = torch.from_numpy(grad)
        assert torch.allclose(grad, ref.grad.to_dense(), atol=1e-6)
        # Ascending unique rows covering every slot read by any rank (what the lazy optimizer
        # updates); any other row in them has a zero gradient, which it leaves alone.
        assert rows == sorted(set(rows)) and set(touched.tolist()) <= set(rows)
        extra = sorted(set(rows) - set(touched.tolist()))
        assert not grad[extra].any()


def test_compact_sums_the_duplicate_rows_of_an_accumulated_gradient():
    p = torch.nn.Parameter(torch.zeros(6, 2))
    # CUDA's sparse add concatenates: two micro-steps give rows [1, 4, 1, 2], uncoalesced.
    p.grad = torch.sparse_coo_tensor(
        [[1, 4, 1, 2]], torch.ones(4, 2), (6, 2), check_invariants=True
    )
    SparseGrads([p]).compact_()
    assert p.grad._indices()[0].tolist() == [1, 2, 4]
    assert torch.equal(p.grad.to_dense()[1], torch.full((2,), 2.0))


def test_cuda_asked_for_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="train.device=cuda .* use train.device=cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_local_ranks_share_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device("auto", r) for r in range(4)] == [
        torch.device("cuda", i) for i in (0, 1, 0, 1)
    ]
    assert resolve_device("cpu", 3) == torch.device("cpu")


def test_synced_batchnorm_over_two_ranks_equals_batchnorm_on_the_union(two_ranks):
    (x, w), ranks = two_ranks[0]["bn"], two_ranks[1]
    ref = torch.nn.BatchNorm1d(5)
    xg = x.clone().requires_grad_()
    (ref(xg) * w).sum().backward()
    results = [[torch.from_numpy(a) for a in bn] for _, bn, _ in ranks]
    grad_x = torch.cat([r[0] for r in results])
    assert torch.allclose(grad_x, xg.grad, atol=1e-5)
    # Each rank's affine gradient is its share; DDP sums them (and divides by 2 for the mean).
    assert torch.allclose(results[0][1] + results[1][1], ref.weight.grad, atol=1e-5)
    for r in results:
        assert torch.allclose(r[2], ref.running_mean, atol=1e-6)
        assert torch.allclose(r[3], ref.running_var, atol=1e-6)


def test_synced_batchnorm_is_plain_batchnorm_in_one_process():
    bn = torch.nn.BatchNorm1d(4)
    synced = SyncedBatchNorm1d.from_batchnorm(bn)
    x = torch.randn(8, 4)
    assert torch.allclose(bn(x), synced(x))
    assert synced.state_dict().keys() == bn.state_dict().keys()


def test_memory_stats_summed_over_two_ranks_equal_one_process(two_ranks):
    (idx, w), ranks = two_ranks[0]["stats"], two_ranks[1]
    whole = MemoryStats(30)
    whole.update(idx, w)
    for *_, (weights, counts) in ranks:
        torch.testing.assert_close(torch.from_numpy(weights), whole.weights)
        torch.testing.assert_close(torch.from_numpy(counts), whole.counts)
    assert not os.environ.get("RANK"), "the test must not leak distributed state"
