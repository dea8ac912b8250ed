"""distributed.memory_parallel: value tables split by columns over gloo ranks equal one process
holding them whole (the read, every gradient, the averaging over groups, the gradient norm,
training steps and checkpoints across N), and bad settings refused before any work."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
from test_distributed import spawn
from torch import nn

from pkm_lm.memory.config import triton_installed
from pkm_lm.memory.optim import clip_grad_norm_
from pkm_lm.memory.values import value_bag
from pkm_lm.memory_parallel import MemoryParallel

torch.set_num_threads(1)
ROWS, WIDTH, READS = 24, 6, 4


def whole_table() -> torch.Tensor:
    return torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(0))


def rank_reads(rank: int):
    """Rank ``rank``'s reads (ranks hold different numbers of tokens) and its output weights."""
    g = torch.Generator().manual_seed(100 + rank)
    n = 2 + 3 * (rank % 2)
    indices = torch.randint(0, ROWS, (n, READS), generator=g)
    weights = torch.rand(n, READS, generator=g)
    return indices, weights, torch.randn(n, WIDTH, generator=g)


class OneTable(nn.Module):
    """The part of a model ``MemoryParallel.split_`` works on: memories with a value table."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.values = nn.Embedding(ROWS, WIDTH, sparse=sparse, device="meta")
        self.read_values = value_bag
        self.memories = {1: self}


def kernels(device: torch.device) -> list[str]:
    """The value-read kernels to test: Triton's run on CPU tensors in its interpreter
    (tests/conftest.py) when CUDA is absent, compiled on CUDA tensors."""
    triton = triton_installed() and (device.type == "cuda") == torch.cuda.is_available()
    return ["torch"] + ["triton"] * triton


def _read_worker(rank: int, port: int, world: int, size: int, backend: str, out) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    results = []
    for kernel, sparse in itertools.product(kernels(device), (False, True)):
        parallel = MemoryParallel(size, device)
        model = OneTable(sparse)
        parallel.split_(model)
        table = model.to_empty(device=device).values.weight
        table.data.copy_(whole_table()[:, model.value_columns])
        indices, weights, grad_out = (t.to(device) for t in rank_reads(rank))
        weights.requires_grad_()
        read = model.read_values(indices, weights, table, sparse, kernel)
        (read * grad_out).sum().backward()
        parallel.grad_sync(sparse).all_reduce_()
        grad = table.grad.to_dense() if sparse else table.grad
        norm = clip_grad_norm_([table], float("inf"), [table], parallel.group)
        columns = parallel.columns(WIDTH)
        tensors = [t.detach().cpu().numpy() for t in (read, weights.grad, grad)]
        results.append((kernel, sparse, *tensors, (columns.start, columns.stop), float(norm)))
    out.put((rank, results))
    dist.destroy_process_group()


def check_split_read(world: int, size: int, backend: str) -> None:
    """Each rank's output and read-weight gradient are those of the whole table; each table
    gradient is the mean over all ranks' tokens (the data group sums, the world size divides);
    the norm is that of the whole table's gradient. Dense and sparse gradients, each kernel."""
    table = nn.Parameter(whole_table())
    expected = []
    for rank in range(world):
        indices, weights, grad_out = rank_reads(rank)
        weights.requires_grad_()
        read = value_bag(indices, weights, table)
        (read * grad_out / world).sum().backward()
        expected.append((read.detach(), weights.grad * world))
    part = WIDTH // size
    for rank, (results,) in enumerate(spawn(_read_worker, world, size, backend, nprocs=world)):
        assert len(results) >= 2
        for kernel, sparse, read, grad_weights, grad, columns, norm in results:
            case = f"rank {rank}, kernel {kernel}, sparse {sparse}"
            start = (rank % size) * part
            assert columns == (start, start + part), case
            assert torch.allclose(torch.from_numpy(read), expected[rank][0], atol=1e-6), case
            assert torch.allclose(torch.from_numpy(grad_weights), expected[rank][1], atol=1e-6), (
                case
            )
            assert torch.allclose(
                torch.from_numpy(grad), table.grad[:, start : start + part], atol=1e-6
            ), case
            assert norm == pytest.approx(table.grad.norm().item(), rel=1e-5), case


def test_split_read_and_gradients_equal_one_process_on_two_groups_of_two():
    """4 gloo ranks, memory groups {0, 1} and {2, 3}, uneven token counts."""
    check_split_read(4, 2, "gloo")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_split_read_and_gradients_on_two_gpus_with_nccl():
    """2 ranks on 2 GPUs, one memory group (nccl; the token counts travel on a gloo group)."""
    check_split_read(2, 2, "nccl")


# -- the trainer: N = 2 on 2 processes against N = 1 on 1, and checkpoints across N -------------
STEPS = ["train.log_interval=1", "train.eval_interval=3", "train.checkpoint_interval=3",
         "model.dropout=0", "model.attn_dropout=0",
         # (see test_train: rounding noise in gradients that are zero in theory, Adam's eps)
         "optim.eps=1e-4"]  # fmt: skip
VARIANTS = {
    # dense value gradient + Adam, query BatchNorm synced over the ranks
    "dense-adam-syncbn": ["model.memory.sparse_grad=false", "optim.value_optimizer=adam"],
    # row-sparse gradient + LazyAdam, 2 micro-steps per rank (no query norm: its statistics
    # per micro-batch cannot match across different micro-batch layouts), one table read by
    # the memories of both blocks
    "sparse-lazyadam-accumulation-shared": [
        "train.micro_batch_size=4",
        "model.memory.query_norm=none",
        "model.memory.layers=[1,2]",
        "model.memory.share_values=true",
    ],
}


def first_gradients(trainer) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (averaged over ranks; split tables whole on the first rank,
    None on the others) on the next batch, which stays next."""
    import torch.nn.functional as F

    position = trainer.stream.state_dict()
    batch = trainer.stream.next_batch()
    trainer.stream.load_state_dict(position)
    logits = trainer.ddp(batch[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    trainer.sparse_grads.all_reduce_()
    split = {id(p) for p in trainer.parallel.tables} if trainer.parallel else set()
    grads = {}
    for name, p in trainer.model.named_parameters():
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
        grads[name] = trainer.parallel.whole(grad) if id(p) in split else grad.clone()
    trainer.optim.zero_grad()
    return grads


def _train_worker(rank: int, port: int, data, runs: list, overrides: list, out) -> None:
    """Train each of ``runs`` (run_dir, max_steps, memory_parallel) in turn on 2 gloo ranks;
    the gradients of the first run's first batch go to a file (a queue's pipe is too small)."""
    from tiny_trainer import build_trainer

    from pkm_lm.distributed import cleanup_distributed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")  # fmt: skip
    grads = None
    for run_dir, steps, size in runs:
        trainer = build_trainer(data, "cpu", run_dir, *overrides, f"train.max_steps={steps}",
                                f"distributed.memory_parallel={size}")  # fmt: skip
        if grads is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            grads = run_dir / f"grads_{rank}.pt"
            torch.save(first_gradients(trainer), grads)
        trainer.fit()
    out.put((rank, grads))
    cleanup_distributed()


def losses(run_dir) -> dict[int, float]:
    from pkm_lm.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def evaluation(run_dir) -> list[float]:
    """(loss, tokens) of the first validation."""
    from pkm_lm.metrics import read_metrics

    first = next(r for r in read_metrics(run_dir) if r["kind"] == "eval")
    return [first["loss"], first["n_tokens"]]


def assert_same_state(a: dict, b: dict) -> None:
    """Model and both optimizers' states equal (to float rounding)."""
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=1e-5), name
    for opt in ("base", "values"):
        for i, state in a["optim"][opt]["state"].items():
            for key, value in state.items():
                other = b["optim"][opt]["state"][i][key]
                if isinstance(value, torch.Tensor):
                    value, other = value.to_dense().float(), other.to_dense().float()
                    assert torch.allclose(value, other, atol=1e-5, rtol=1e-4), (opt, i, key)
                else:
                    assert value == other, (opt, i, key)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_at_n2_equal_one_process_and_checkpoints_move_between_n(
    ids_data, tmp_path, variant
):
    """One process (N = 1) trains 4 steps, saving at 3 and 4. Two processes at N = 2 give the
    same gradients of every parameter, the same 3 losses and the same step-3 checkpoint (whole
    tables, optimizer state included); the N = 2 checkpoint resumes in one process and the
    N = 1 checkpoint at N = 2, each giving step 4 of the one-process run.

    One step after each resumption: the ranks' synced query norm rounds differently from one
    process (queries 3e-6 apart), and a later top-k selection may break a near-tie the other way,
    which moves a read row by a whole update. Measured: at the second step after resuming the
    N = 1 checkpoint at N = 2, one of 1,024 token-heads selected another slot set (boundary
    scores 1e-7 apart) and a value row moved 1e-4 from the one-process run."""
    import shutil

    from tiny_trainer import build_trainer

    from pkm_lm.checkpoint import load_checkpoint

    overrides = [*STEPS, *VARIANTS[variant]]
    one = build_trainer(ids_data, "cpu", tmp_path / "one", *overrides, "train.max_steps=4")
    expected_grads = first_gradients(one)
    one.fit()
    # The one-process run as it was at step 3, to resume at N = 2.
    shutil.copytree(tmp_path / "one", tmp_path / "to_n2")
    (tmp_path / "to_n2/checkpoints/step_0000004.pt").unlink()
    (tmp_path / "to_n2/checkpoints/step_0000004.json").unlink()
    runs = [(tmp_path / "two", 3, 2), (tmp_path / "to_n2", 4, 2)]
    for rank, (path,) in enumerate(spawn(_train_worker, ids_data, runs, overrides)):
        for name, grad in torch.load(path).items():
            if grad is not None or rank == 0:
                assert torch.allclose(grad, expected_grads[name], atol=1e-6), name
    ref = losses(tmp_path / "one")
    for step, loss in losses(tmp_path / "two").items():
        assert loss == pytest.approx(ref[step], rel=1e-5), step
    # Validation at step 3 split over the ranks (a rank with fewer batches runs empty ones).
    assert evaluation(tmp_path / "two") == pytest.approx(evaluation(tmp_path / "one"), rel=1e-6)
    saved = load_checkpoint(tmp_path / "two/checkpoints/step_0000003.pt")
    assert_same_state(load_checkpoint(tmp_path / "one/checkpoints/step_0000003.pt"), saved)
    # N = 2 -> N = 1: the two-process run resumed in one process.
    build_trainer(ids_data, "cpu", tmp_path / "two", *overrides, "train.max_steps=4").fit()
    final = load_checkpoint(tmp_path / "one/checkpoints/step_0000004.pt")
    for run in ("two", "to_n2"):
        assert losses(tmp_path / run)[4] == pytest.approx(ref[4], rel=1e-5), run
        assert_same_state(final, load_checkpoint(tmp_path / f"{run}/checkpoints/step_0000004.pt"))


def test_fp16_autocast_and_loss_scaling_at_n2_follow_one_process(ids_data, tmp_path):
    """Autocast rounds differently for other batch shapes, so the losses agree to 1e-3 (measured:
    5e-5 over 3 steps, bf16 alike); the loss scale is the one process's."""
    from tiny_trainer import build_trainer

    from pkm_lm.checkpoint import latest_checkpoint, load_checkpoint

    overrides = [*STEPS, *VARIANTS["dense-adam-syncbn"], "train.precision=fp16"]
    build_trainer(ids_data, "cpu", tmp_path / "one", *overrides, "train.max_steps=3").fit()
    spawn(_train_worker, ids_data, [(tmp_path / "two", 3, 2)], overrides)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [two[s] for s in (1, 2, 3)] == pytest.approx([one[s] for s in (1, 2, 3)], rel=1e-3)
    scales = [load_checkpoint(latest_checkpoint(tmp_path / r))["scaler"] for r in ("one", "two")]
    assert scales[0]["scale"] == scales[1]["scale"] > 0


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        ({}, 3, "distributed.memory_parallel=2 is invalid: must divide the world size 3"),
        ({"model.memory.v_dim": 33}, 4, "must divide the value dim 33"),
        ({"model.memory.layers": []}, 2, "needs a memory layer"),
        ({"train.compile": True}, 2, "not supported with train.compile=true"),
    ],
    ids=["world-size", "value-dim", "no-memory", "compile"],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, overrides, world, message):
    """The trainer refuses them first: before it reads the data (none exists here) or builds
    anything; a group size below 1 is refused by the config itself."""
    from omegaconf import OmegaConf

    from pkm_lm.config import TrainConfig
    from pkm_lm.distributed import DistEnv
    from pkm_lm.errors import ConfigError
    from pkm_lm.trainer import Trainer

    base = {"run_dir": str(tmp_path / "run"), "data.dir": str(tmp_path / "missing"),
            "model.vocab_size": 50, "model.dim": 32, "model.n_heads": 2,
            "model.memory.layers": [1], "model.memory.n_keys": 8, "model.memory.k_dim": 8,
            "model.memory.knn": 4, "train.batch_size": 12, "distributed.memory_parallel": 2}  # fmt: skip
    dotlist = [f"{k}={v}" for k, v in {**base, **overrides}.items()]
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(dotlist))
    env = DistEnv(0, 0, world, torch.device("cpu"))
    with pytest.raises(ConfigError, match=message):
        Trainer(OmegaConf.to_object(cfg), env)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="distributed.memory_parallel=0 is invalid"):
        OmegaConf.to_object(OmegaConf.merge(cfg, {"distributed": {"memory_parallel": 0}}))


def test_comm_cost_counts_a_split_table_once_per_group_and_its_reads(monkeypatch):
    """scripts/comm_cost.py against the counts by hand for one table of 64 x 16 values beside
    1,000 other parameters, 8 ranks, N = 1 and N = 4 (dense value gradient, Adam, fp32)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts/comm_cost.py"
    spec = importlib.util.spec_from_file_location("comm_cost", path)
    comm_cost = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "comm_cost", comm_cost)  # its dataclass looks itself up
    spec.loader.exec_module(comm_cost)
    rows, width, other, tokens, reads = 64, 16, 1000, 10, 4
    s = comm_cost.Shapes(params=other + rows * width, values=rows * width, rows=rows, width=width,
                         tables=1, touched_micro=0, touched_step=0, grad_rows=rows, accum=2,
                         layers=1, tokens=tokens, reads=reads)  # fmt: skip
    whole = comm_cost.rows_for(s, 8, 1)[0]
    assert whole[1] == 4 * (other + rows * width) * 4  # weights, gradient, two moments
    assert whole[3] == pytest.approx(2 * 7 / 8 * (other + rows * width) * 4)  # one all-reduce
    mode, memory, _, sent = comm_cost.rows_for(s, 8, 4)[0]
    # Held until the backward: the group's 4 x 10 tokens' indices (8 bytes) and weights (4), and
    # the group's columns of them (40 tokens x 4 columns).
    held = 4 * tokens * reads * 12 + 4 * tokens * (width // 4) * 4
    assert memory == 4 * (other + rows * width // 4) * 4 + held
    # Per micro-step (2): an all-gather sending 3 blocks of (indices, weights), the columns'
    # all-to-all out and back (3 of 4 blocks of 10 x 4 values each way), a reduce-scatter
    # sending 3 blocks of 10 x 4 weight gradients; the table averaged over 2 ranks.
    read = 2 * (
        3 * tokens * reads * 12 + 2 * 3 * tokens * (width // 4) * 4 + 3 * tokens * reads * 4
    )
    averaging = 2 * 1 / 2 * rows * width // 4 * 4
    assert sent == pytest.approx(2 * 7 / 8 * other * 4 + averaging + read)
    # Initialising: the model with a quarter of the table, and one block of the whole table's
    # rows (all 64 of them here).
    assert comm_cost.building_peak(s, 4) == (other + rows * width // 4 + rows * width) * 4
