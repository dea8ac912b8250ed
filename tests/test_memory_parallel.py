"""distributed.memory_parallel: value tables split by columns over gloo ranks equal one process
holding them whole (the read, every gradient, the averaging over groups, the gradient norm,
training steps and checkpoints across N), and bad settings refused before any work."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

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
    dist.barrier()  # no rank leaves while the other's last collective is in flight (gloo aborts)
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


def train_run(data, run_dir, overrides: list, steps: int, size: int, grads: bool) -> None:
    """Train ``run_dir`` to ``steps`` at ``distributed.memory_parallel=size`` (resuming its
    checkpoint if any); with ``grads``, first save the first batch's gradients to
    ``grads_RANK.pt`` in it."""
    from tiny_trainer import build_trainer

    trainer = build_trainer(data, "cpu", run_dir, *overrides, f"train.max_steps={steps}",
                            f"distributed.memory_parallel={size}")  # fmt: skip
    if grads:
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(first_gradients(trainer), run_dir / f"grads_{trainer.env.rank}.pt")
    trainer.fit()


def _train_worker(rank: int, port: int, data, runs: list, out) -> None:
    """Train each of ``runs`` (``train_run``'s arguments after ``data``) in turn on 2 gloo ranks."""
    from pkm_lm.distributed import cleanup_distributed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")  # fmt: skip
    for run in runs:
        train_run(data, *run)
    out.put((rank,))
    dist.barrier()  # no rank leaves while the other's last collective is in flight (gloo aborts)
    cleanup_distributed()


# fp16 autocast and loss scaling at N = 2.
FP16 = [*STEPS, *VARIANTS["dense-adam-syncbn"], "train.precision=fp16"]
# Plain DDP (N = 1) with one value table read by the memories of both blocks, its gradient dense
# (averaged by DDP) or row-sparse (averaged by SparseGrads, left out of DDP).
SHARED_TABLE = {
    "dense": [*STEPS, *VARIANTS["dense-adam-syncbn"], "model.memory.layers=[1,2]",
              "model.memory.share_values=true"],
    "sparse": [*STEPS, *VARIANTS["sparse-lazyadam-accumulation-shared"]],
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(ids_data, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Every training run the comparisons below read: case -> {"one": the one-process run (4
    steps, saving at 3 and 4), "two": the 2-process run (3 steps), "to_n2": the one-process run's
    step 3 resumed to step 4 at N = 2}. The one-process runs train here, then every 2-process run
    in one spawn of 2 gloo ranks (each spawn costs seconds of imports). Where gradients are
    compared, both runs save their first batch's before training."""
    import shutil

    root = tmp_path_factory.mktemp("runs")
    cases = {**{v: [*STEPS, *o] for v, o in VARIANTS.items()}, "fp16": FP16,
             **{f"shared-{k}": o for k, o in SHARED_TABLE.items()}}  # fmt: skip
    found, trained, two_process = {}, {}, []
    for case, overrides in cases.items():
        grads, size = case != "fp16", 1 if case.startswith("shared") else 2
        one = trained.get((tuple(overrides), grads))  # the same settings train once
        if one is None:
            one = trained[(tuple(overrides), grads)] = root / case / "one"
            train_run(ids_data, one, overrides, 4, 1, grads)
        found[case] = {"one": one, "two": root / case / "two"}
        two_process.append((root / case / "two", overrides, 3, size, grads))
        if case in VARIANTS:  # the one-process run as it was at step 3, resumed at N = 2
            to_n2 = found[case]["to_n2"] = root / case / "to_n2"
            shutil.copytree(one, to_n2)
            (to_n2 / "checkpoints/step_0000004.pt").unlink()
            (to_n2 / "checkpoints/step_0000004.json").unlink()
            two_process.append((to_n2, overrides, 4, 2, False))
    spawn(_train_worker, ids_data, two_process)
    return found


def assert_first_gradients_equal(one: Path, two: Path) -> None:
    """Every parameter's gradient on both ranks (split tables: whole on the first rank, None on
    the others) equals the one process's."""
    expected = torch.load(one / "grads_0.pt")
    for rank in range(2):
        for name, grad in torch.load(two / f"grads_{rank}.pt").items():
            if grad is not None or rank == 0:
                assert torch.allclose(grad, expected[name], atol=1e-6), (rank, name)


def losses(run_dir) -> dict[int, float]:
    from pkm_lm.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def assert_same_losses(one: Path, two: Path, steps: tuple[int, ...], rel: float) -> None:
    ref, got = losses(one), losses(two)
    assert [got[s] for s in steps] == pytest.approx([ref[s] for s in steps], rel=rel)


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


def assert_same_step_3(one: Path, two: Path) -> None:
    """The same 3 losses, the same validation at step 3 (split over the ranks: a rank with fewer
    batches runs empty ones) and the same step-3 checkpoint."""
    from pkm_lm.checkpoint import load_checkpoint

    assert_same_losses(one, two, (1, 2, 3), rel=1e-5)
    assert evaluation(two) == pytest.approx(evaluation(one), rel=1e-6)
    step_3 = "checkpoints/step_0000003.pt"
    assert_same_state(load_checkpoint(one / step_3), load_checkpoint(two / step_3))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_at_n2_equal_one_process_and_checkpoints_move_between_n(
    ids_data, runs, variant
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
    from pkm_lm.checkpoint import load_checkpoint

    one, two = runs[variant]["one"], runs[variant]["two"]
    assert_first_gradients_equal(one, two)
    assert_same_step_3(one, two)
    # N = 2 -> N = 1: the two-process run resumed in one process.
    train_run(ids_data, two, [*STEPS, *VARIANTS[variant]], 4, 1, False)
    final = load_checkpoint(one / "checkpoints/step_0000004.pt")
    for run in (two, runs[variant]["to_n2"]):
        assert_same_losses(one, run, (4,), rel=1e-5)
        assert_same_state(final, load_checkpoint(run / "checkpoints/step_0000004.pt"))


@pytest.mark.parametrize("gradient", list(SHARED_TABLE))
def test_a_shared_table_under_ddp_follows_one_process(runs, gradient):
    """model.memory.share_values=true on 2 processes (N = 1): the shared table's gradient (every
    parameter's), the losses, the validation and the step-3 weights and optimizer states are the
    one process's."""
    one, two = runs[f"shared-{gradient}"]["one"], runs[f"shared-{gradient}"]["two"]
    assert_first_gradients_equal(one, two)
    assert_same_step_3(one, two)


def test_fp16_autocast_and_loss_scaling_at_n2_follow_one_process(runs):
    """Autocast rounds differently for other batch shapes, so the losses agree to 1e-3 (measured:
    5e-5 over 3 steps, bf16 alike); the loss scale is the one process's."""
    from pkm_lm.checkpoint import load_checkpoint

    one, two = runs["fp16"]["one"], runs["fp16"]["two"]
    assert_same_losses(one, two, (1, 2, 3), rel=1e-3)
    step_3 = "checkpoints/step_0000003.pt"
    scales = [load_checkpoint(run / step_3)["scaler"] for run in (one, two)]
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
