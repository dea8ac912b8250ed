"""What only a CUDA device can show: the layer, its optimizer and the trainer on the GPU agree
with the CPU, keep fp32 where they must, skip fp16 overflows, never wait for the host, resume
after a kill and split over two ranks. Every test skips, with its reason, without CUDA;
`scripts/gpu_check.sh` runs them (`pytest -m gpu`) on a GPU node."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_trainer import build_trainer, kill_at_checkpoint, tiny_args

from pkm_lm.checkpoint import latest_checkpoint, load_checkpoint
from pkm_lm.memory import LazyAdam, MemoryConfig, ProductKeyMemory
from pkm_lm.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture
def exact_fp32():
    """fp32 matmuls without TF32, so CUDA and CPU differ only by summation order."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def layer(sparse_grad: bool = True, **kw) -> ProductKeyMemory:
    cfg = dict(n_keys=64, heads=4, knn=16, k_dim=64, sparse_grad=sparse_grad) | kw
    return ProductKeyMemory(96, 96, MemoryConfig(**cfg))


def dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_dense() if grad.is_sparse else grad


# -- the layer -------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse_grad", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("query_net", ["linear", "mlp"])
def test_layer_on_cuda_matches_cpu_output_and_every_gradient(exact_fp32, sparse_grad, query_net):
    torch.manual_seed(0)
    cpu = layer(sparse_grad, query_net=query_net, gated=query_net == "mlp", v_dim=64)
    gpu = copy.deepcopy(cpu).cuda()
    x, g = torch.randn(2, 128, 96), torch.randn(2, 128, 96)
    out_cpu = cpu(x)
    (out_cpu * g).sum().backward()
    out_gpu = gpu(x.cuda())
    (out_gpu * g.cuda()).sum().backward()
    with torch.no_grad():
        q = x.reshape(-1, 96)
        selected_cpu = cpu.select(cpu.query(q))[1]
        selected_gpu = gpu.select(gpu.query(q.cuda()))[1]
    differ = (selected_gpu.cpu() != selected_cpu).any(-1).sum().item()
    assert differ == 0, f"CUDA read other slots than the CPU for {differ} (token, head) pairs"
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-5)
    params = dict(gpu.named_parameters())
    assert len(params) >= 5
    # The query net's last bias feeds the BatchNorm, which removes it: its gradient is zero up to
    # rounding, so tolerances scale with the largest gradient of the layer, not of each tensor.
    scale = max(dense(p.grad).abs().max().item() for p in cpu.parameters())
    for name, p in cpu.named_parameters():
        assert p.grad is not None and params[name].grad is not None, name
        assert params[name].grad.is_sparse == p.grad.is_sparse, name
        torch.testing.assert_close(
            dense(params[name].grad).cpu(), dense(p.grad), rtol=1e-4, atol=1e-6 * scale, msg=name
        )
    for name, buf in cpu.named_buffers():  # BatchNorm running statistics
        torch.testing.assert_close(dict(gpu.named_buffers())[name].cpu(), buf, msg=name)


@pytest.mark.parametrize("n_keys, knn", [(64, 32), (256, 32), (512, 64)])
def test_product_key_selection_on_cuda_is_the_exhaustive_top_k(n_keys, knn):
    torch.manual_seed(1)
    heads, k_dim = 4, 64
    mem = ProductKeyMemory(64, 64, MemoryConfig(n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim))
    mem = mem.cuda().eval()
    n = min(2048, 2**27 // (heads * n_keys**2))  # the exhaustive score table stays ~1 GiB
    q = torch.randn(n, heads, k_dim, device="cuda")
    with torch.no_grad():
        scores, indices = mem.select(q)
        halves = q.double().view(n, heads, 2, k_dim // 2)
        sub = mem.sub_keys.double()  # (heads, 2, n_keys, k_dim / 2)
        s1 = torch.einsum("nhd,hkd->nhk", halves[:, :, 0], sub[:, 0])
        s2 = torch.einsum("nhd,hkd->nhk", halves[:, :, 1], sub[:, 1])
        every = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # (n, heads, n_keys^2)
        ref_scores, ref_indices = every.topk(knn + 1, dim=-1)
    assert scores.shape == indices.shape == (n, heads, knn)
    assert_same_top_k(scores, indices, ref_scores, ref_indices)


def assert_same_top_k(scores, indices, ref_scores, ref_indices) -> None:
    """The knn best scores match the exhaustive float64 ones (``ref_*`` hold knn + 1), and every
    row whose knn-th and (knn+1)-th best keys are not near-tied selects the same set of keys."""
    knn = scores.shape[-1]
    torch.testing.assert_close(scores.double(), ref_scores[..., :knn], rtol=0, atol=1e-4)
    clear = ref_scores[..., knn - 1] - ref_scores[..., knn] > 1e-4
    share = clear.float().mean().item()
    assert share > 0.9, f"only {share:.1%} of the rows have no near-tie at the boundary"
    ours = indices.sort(-1).values[clear]
    mismatched = (ours != ref_indices[..., :knn].sort(-1).values[clear]).any(-1)
    assert not mismatched.any(), f"{mismatched.sum().item()} of {clear.sum().item()} rows differ"


def test_flat_key_selection_on_cuda_is_the_exhaustive_top_k():
    torch.manual_seed(2)
    cfg = MemoryConfig(n_keys=128, heads=2, knn=32, k_dim=32, keys="flat")
    mem = ProductKeyMemory(32, 32, cfg).cuda().eval()
    q = torch.randn(512, 2, 32, device="cuda")
    with torch.no_grad():
        scores, indices = mem.select(q)
        every = torch.einsum("nhd,hkd->nhk", q.double(), mem.keys.double())
        ref_scores, ref_indices = every.topk(33, dim=-1)
    assert_same_top_k(scores, indices, ref_scores, ref_indices)


@pytest.mark.parametrize("row_wise", [False, True])
def test_lazy_adam_on_cuda_equals_cpu(row_wise):
    torch.manual_seed(3)
    cpu = torch.nn.Parameter(torch.randn(400, 16))
    gpu = torch.nn.Parameter(cpu.detach().cuda())
    opts = [LazyAdam([p], lr=1e-2, row_wise=row_wise) for p in (cpu, gpu)]
    for step in range(6):
        if step == 3:  # a dense gradient in between
            grads = [torch.randn(400, 16)] * 2
        else:  # sorted unique rows (the layer's) or repeated rows (after an all-reduce)
            rows = torch.randint(0, 400, (150,))
            rows = rows.unique() if step % 2 else rows
            values = torch.randn(rows.numel(), 16)
            grads = [torch.sparse_coo_tensor(rows[None], values, (400, 16))] * 2
        cpu.grad, gpu.grad = grads[0], grads[1].cuda()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach(), rtol=1e-5, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(
            opts[1].state[gpu][key].cpu(), opts[0].state[cpu][key], rtol=1e-5, atol=1e-7
        )
    assert opts[1].state[gpu]["step"] == opts[0].state[cpu]["step"] == 6


@pytest.mark.parametrize("sparse_grad", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_reads_and_trains_the_value_table_in_fp32(dtype, sparse_grad):
    """Under autocast the value read and its backward stay in fp32: replaying the autocast
    run's selection (scores and slots) without autocast gives the same output and the same
    table gradient to fp32 rounding (a read in fp16/bf16 would differ by ~1e-3/1e-2)."""
    torch.manual_seed(4)
    mem = layer(sparse_grad).cuda()
    x = torch.randn(4, 64, 96, device="cuda")
    seen, select = [], mem.select

    def recording_select(query):
        seen.append(select(query))
        return seen[-1]

    mem.select = recording_select
    with torch.autocast("cuda", dtype=dtype):
        out = mem(x)
    out.float().pow(2).mean().backward()
    grad = dense(mem.values.weight.grad).clone()
    assert mem.values.weight.grad.is_sparse == sparse_grad and grad.abs().sum() > 0
    mem.zero_grad(set_to_none=True)
    scores, slots = seen[0]
    mem.select = lambda query: (scores.detach().float(), slots)
    ref = mem(x)
    ref.pow(2).mean().backward()
    torch.testing.assert_close(out.float(), ref)
    torch.testing.assert_close(grad, dense(mem.values.weight.grad))


# -- host-device synchronisation -------------------------------------------------------------


@contextlib.contextmanager
def no_host_sync():
    """Every synchronising CUDA call inside raises. Checked first, so a test using it cannot
    pass because the mode silently does nothing."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.ones(1, device="cuda").item()
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("sparse_grad", [True, False], ids=["sparse", "dense"])
def test_a_training_step_of_the_layer_never_waits_for_the_host(sparse_grad, kernel):
    if kernel == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(5)
    mem = layer(sparse_grad, kernel=kernel).cuda()
    values = [mem.values.weight]
    rest = [p for p in mem.parameters() if p is not mem.values.weight]
    value_opt = (
        LazyAdam(values, lr=1e-3, kernel=kernel)
        if sparse_grad
        else torch.optim.Adam(values, lr=1e-3, fused=True)
    )
    opts = [value_opt, torch.optim.Adam(rest, lr=1e-3, fused=True)]
    x, g = torch.randn(4, 64, 96, device="cuda"), torch.randn(4, 64, 96, device="cuda")

    def step():
        (mem(x) * g).sum().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # first step: lazily built constants and optimizer state may allocate
    torch.cuda.synchronize()
    with no_host_sync():
        step()
        step()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in mem.parameters())


def test_torch_kernel_trains_a_bf16_value_table_on_cuda():
    """Torch has no CUDA bf16 kernel for the read-weight gradient: the layer gathers instead."""
    torch.manual_seed(6)
    mem = layer(True, kernel="torch").cuda()
    reference = copy.deepcopy(mem)
    mem.values.to(torch.bfloat16)
    reference.values.weight.data.copy_(mem.values.weight.float())
    x = torch.randn(2, 64, 96, device="cuda")
    for m in (mem, reference):
        m(x).float().square().sum().backward()
    assert mem.values.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(
        mem.query_net.weight.grad,
        reference.query_net.weight.grad,
        rtol=0.05,
        atol=0.05 * reference.query_net.weight.grad.abs().max().item(),
    )


@contextlib.contextmanager
def counting_host_syncs(found: list[str]):
    """Record every synchronising CUDA call inside into ``found``; checked first, as above."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.ones(1, device="cuda").item()
            assert any("synchroniz" in str(w.message) for w in caught), "sync debug is off"
            caught.clear()
            yield
        found += [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_training_step_of_a_small_model_syncs_at_most_once(ids_data, tmp_path, precision):
    """Steps 2 and 3 of 4 are watched (step 1 warms up; step 4 logs, evaluates and saves,
    which read values on the host): at most one synchronisation per optimizer step (the
    overflow check of GradScaler or of the gradient norm)."""
    trainer = build_trainer(
        ids_data, "cuda", tmp_path / "run", f"train.precision={precision}", "train.max_steps=4",
        "train.log_interval=4", "train.eval_interval=4", "train.checkpoint_interval=4",
    )  # fmt: skip
    calls, found = [0], []
    stack = contextlib.ExitStack()

    def around_forward(module, args):
        calls[0] += 1
        if calls[0] == 2 and module.training:
            stack.enter_context(counting_host_syncs(found))
        elif calls[0] == 4:
            stack.close()

    handle = trainer.model.register_forward_pre_hook(around_forward)
    try:
        trainer.fit()
    finally:
        handle.remove()
        stack.close()
    assert calls[0] >= 4
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"] == [4]
    assert len(found) <= 2, f"{len(found)} synchronisations in 2 steps:\n" + "\n".join(found)


# -- the command line: kill + resume, two ranks ----------------------------------------------


def run(args: list[str], launcher: list[str] | None = None, check: bool = True, timeout=300):
    """Run a command line; on timeout its whole process group (torchrun's workers) is killed
    and the result has return code None."""
    cmd = (launcher or [sys.executable]) + args
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        code, stderr = None, stderr + f"\n(timed out after {timeout} s)"
    result = subprocess.CompletedProcess(cmd, code, stdout, stderr)
    if check and code != 0:
        raise AssertionError(f"{cmd} failed ({code}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return result


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_kill_and_resume_on_cuda_matches_an_uninterrupted_run(ids_data, tmp_path):
    """CUDA is not bitwise deterministic (atomics in the sparse backward, attention), so the
    comparison has a tolerance; the RNG states, optimizer and data position must all resume."""
    common = ["train.max_steps=60", "train.log_interval=1", "train.eval_interval=30",
              "train.checkpoint_interval=1", "model.dropout=0.1", "model.attn_dropout=0.1",
              "data.shuffle=true", "train.precision=bf16"]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(["-m", "pkm_lm.train", *tiny_args(ids_data, "cuda", whole, *common)])
    cmd = [sys.executable, "-m", "pkm_lm.train", *tiny_args(ids_data, "cuda", killed, *common)]
    kill_at_checkpoint(cmd, ENV, killed, 8)
    at_kill = latest_checkpoint(killed)
    assert at_kill is not None and load_checkpoint(at_kill)["step"] < 60, "run ended before kill"

    out = run(["-m", "pkm_lm.train", *tiny_args(ids_data, "cuda", killed, *common)]).stdout
    assert "resumed from" in out
    a, b = train_losses(whole), train_losses(killed)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 61))
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=2e-3), step
    final_a, final_b = (load_checkpoint(latest_checkpoint(d)) for d in (whole, killed))
    for name, tensor in final_a["model"].items():
        torch.testing.assert_close(final_b["model"][name], tensor, rtol=1e-2, atol=1e-3)
    assert final_a["data"] == final_b["data"]


def test_two_ranks_equal_one_process_on_cuda(ids_data, tmp_path):
    """NCCL when it can run the two ranks (two GPUs, or two ranks sharing one GPU where NCCL
    allows it); otherwise gloo on CUDA tensors, with a warning that gpu_check reports as WARN."""
    common = ["train.max_steps=6", "train.log_interval=1", "train.eval_interval=6",
              "train.checkpoint_interval=6", "model.dropout=0", "model.attn_dropout=0",
              "optim.eps=1e-4"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run(["-m", "pkm_lm.train", *tiny_args(ids_data, "cuda", one, *common)])
    args = ["-m", "pkm_lm.train", *tiny_args(ids_data, "cuda", two, *common)]
    nccl = run([*args, "distributed.backend=nccl"], launcher=TORCHRUN, check=False, timeout=90)
    if nccl.returncode != 0:
        if torch.cuda.device_count() >= 2:
            raise AssertionError(f"NCCL on 2 GPUs failed:\n{nccl.stderr[-4000:]}")
        # The two ranks' tracebacks interleave on stderr: name the error, not a line of it.
        found = re.search(r"NCCL error.*?(invalid usage|unhandled \w+ error)", nccl.stderr)
        reason = found.group(1) if found else f"exit status {nccl.returncode}"
        warnings.warn(
            f"NCCL could not run 2 ranks on {torch.cuda.device_count()} GPU ({reason}, NCCL "
            f"{'.'.join(map(str, torch.cuda.nccl.version()))}); "
            "compared 2 ranks on gloo with CUDA tensors instead",
            stacklevel=1,
        )
        shutil.rmtree(two)
        run([*args, "distributed.backend=gloo"], launcher=TORCHRUN)
    l1, l2 = train_losses(one), train_losses(two)
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 7))
    for (_, a), (_, b) in zip(l1, l2, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    a = load_checkpoint(latest_checkpoint(one))["model"]
    b = load_checkpoint(latest_checkpoint(two))["model"]
    for name in a:
        torch.testing.assert_close(b[name].float(), a[name].float(), rtol=1e-3, atol=1e-4)
