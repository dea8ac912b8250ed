"""Timing of the memory layer's Triton kernels against its torch path, on one GPU.

Every variant is first checked against the torch path on the same inputs, then timed with
torch.utils.benchmark (CUDA synchronised) in interleaved rounds; tables give the median of the
rounds' medians and their spread. GB/s counts only the bytes a kernel must move (formula beside
each table), so it can be set against the device's HBM bandwidth. Usage:

    python scripts/bench_kernels.py                     # dim 1024, 8k tokens, 512^2 slots
    python scripts/bench_kernels.py --tokens 4096 --n-keys 1024 --rounds 5

On a machine without CUDA it runs only with TRITON_INTERPRET=1 (Triton's interpreter, tiny
shapes, e.g. ``--tokens 4 --n-keys 4 --v-dim 8 --k-dim 8 --knn 2 --rounds 1``): a smoke run
of the script, whose timings mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import traceback

import torch
from torch.utils import benchmark

from pkm_lm import cli
from pkm_lm.errors import NotFoundError
from pkm_lm.memory import LazyAdam, MemoryConfig, ProductKeyMemory
from pkm_lm.memory.select import bag_score_gradients, dense_score_gradients
from pkm_lm.memory.values import value_bag
from pkm_lm.perf.machine import describe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_variants(fns: dict, args) -> dict[str, tuple[float, float, float] | str]:
    """(median, min, max) over rounds of each fn's median seconds; fns alternate in a round.

    A variant this build of torch cannot run (e.g. an op without a bf16 CUDA kernel) gets the
    error's name instead of a timing; the others are still timed.
    """
    failed = {}
    for name, fn in fns.items():
        try:
            fn()
        except (RuntimeError, NotImplementedError) as err:
            failed[name] = f"fails ({type(err).__name__})"
            print(f"{name}: {type(err).__name__}: {str(err).splitlines()[0]}", file=sys.stderr)
    per_round = {name: [] for name in fns if name not in failed}
    for _ in range(args.rounds):
        for name in per_round:
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fns[name]})
            per_round[name].append(timer.blocked_autorange(min_run_time=args.min_run_time).median)
    timed = {n: (statistics.median(t), min(t), max(t)) for n, t in per_round.items()}
    return {name: timed.get(name, failed.get(name)) for name in fns}


def cell(t: tuple[float, float, float] | str) -> str:
    if isinstance(t, str):
        return t
    return f"{t[0] * 1e3:.3f} ms ({t[1] * 1e3:.3f}-{t[2] * 1e3:.3f})"


def gbps(nbytes: int, seconds: float | None) -> str:
    return "-" if seconds is None else f"{nbytes / seconds / 1e9:.0f}"


def check(got, ref, what: str, tol: float) -> None:
    for g, r in zip(got, ref, strict=True):
        g = g.to_dense() if g.is_sparse else g
        r = r.to_dense() if r.is_sparse else r
        torch.testing.assert_close(g.float(), r.float(), rtol=tol, atol=tol, msg=what)


def value_read(args, device, dtype_name: str) -> None:
    """value_bag alone: forward, and forward + backward with dense and row-sparse gradients."""
    dtype = DTYPES[dtype_name]
    n, r, slots, v = args.tokens, args.heads * args.knn, args.n_keys**2, args.v_dim
    gen = torch.Generator(device=device).manual_seed(0)
    indices = torch.randint(0, slots, (n, r), device=device, generator=gen)
    weights = torch.rand(n, r, device=device, generator=gen).requires_grad_()
    table = torch.randn(slots, v, device=device, generator=gen).to(dtype).requires_grad_()
    grad_out = torch.randn(n, v, device=device, generator=gen).to(dtype)
    e = table.element_size()
    touched = indices.unique().numel()

    def step(kernel, sparse, backward=True, table=table, grad_out=grad_out):
        def fn():
            out = value_bag(indices, weights, table, sparse, kernel)
            if not backward:
                return out
            grads = torch.autograd.grad(out, (weights, table), grad_out)
            return (out, *grads)

        return fn

    # Checked against the torch path in fp32 on the same values (it runs for every dtype).
    table32 = table.detach().float().requires_grad_()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for sparse in (False, True):
        ref = step("torch", sparse, table=table32, grad_out=grad_out.float())()
        check(step("triton", sparse)(), ref, f"value_bag sparse={sparse}", tol)
    del ref, table32
    fns = {}
    for kernel in ("torch", "triton"):
        fns[f"{kernel}/forward"] = step(kernel, False, backward=False)
        fns[f"{kernel}/fwd+bwd dense"] = step(kernel, False)
        fns[f"{kernel}/fwd+bwd sparse"] = step(kernel, True)
    res = time_variants(fns, args)
    # Bytes that must move: the forward gathers N*R rows, writes N rows and reads 12 B per read
    # (slot, weight); the backward reads grad_out once, reads and writes each touched row once,
    # moves 16 B per read (slot, weight, weight gradient), and a dense gradient also zero-fills
    # the whole table.
    fwd_bytes = n * r * v * e + n * v * e + n * r * 12
    bwd_bytes = n * v * e + 2 * touched * v * e + n * r * 16
    dense_fill = slots * v * e
    print(
        f"\nvalue read, {dtype_name} table {slots} x {v}, {n} tokens x {r} reads, "
        f"{touched} touched rows; ms (min-max of {args.rounds} rounds)"
    )
    print("| kernel | forward | fwd+bwd dense | fwd+bwd sparse | fwd GB/s | bwd dense GB/s |")
    print("|---|---|---|---|---|---|")
    for kernel in ("torch", "triton"):
        fwd, both = res[f"{kernel}/forward"], res[f"{kernel}/fwd+bwd dense"]
        fwd = None if isinstance(fwd, str) else fwd[0]
        bwd = None if fwd is None or isinstance(both, str) else both[0] - fwd
        print(
            f"| {kernel} | {cell(res[f'{kernel}/forward'])} | "
            f"{cell(res[f'{kernel}/fwd+bwd dense'])} | {cell(res[f'{kernel}/fwd+bwd sparse'])} | "
            f"{gbps(fwd_bytes, fwd)} | {gbps(bwd_bytes + dense_fill, bwd)} |"
        )
    print(
        "fwd bytes = N*R*V*e + N*V*e + 12*N*R; bwd bytes = N*V*e + 2*touched*V*e + 16*N*R "
        "+ |K|*V*e (zero-fill), bwd time = fwd+bwd - fwd; e = bytes per table element"
    )


def sub_key_backward(args, device) -> None:
    """Backward of one query half's top-k: the CPU's bags vs the GPU's dense scatter + bmm."""
    h, n, d = args.heads, args.tokens, args.k_dim // 2
    gen = torch.Generator(device=device).manual_seed(1)
    query = torch.randn(h, n, d, device=device, generator=gen)
    keys = torch.randn(h, args.n_keys, d, device=device, generator=gen)
    grad_scores = torch.randn(h, n, args.knn, device=device, generator=gen)

    with torch.no_grad():  # the forward both variants differentiate
        _, top = torch.bmm(query, keys.transpose(1, 2)).topk(args.knn, dim=-1)

    def forward():
        with torch.no_grad():
            return torch.bmm(query, keys.transpose(1, 2)).topk(args.knn, dim=-1)

    fns = {
        "forward only (bmm + top-k)": forward,
        "bags (the CPU backward)": lambda: bag_score_gradients(query, keys, top, grad_scores),
        "dense scatter + bmm (the GPU backward)": lambda: dense_score_gradients(
            query, keys, top, grad_scores
        ),
    }
    ref = fns["bags (the CPU backward)"]()
    check(fns["dense scatter + bmm (the GPU backward)"](), ref, "dense score backward", 1e-3)
    res = time_variants(fns, args)
    print(
        f"\nsub-key score backward of one half: heads {h}, {n} tokens, {args.n_keys} sub-keys "
        f"of dim {d}, knn {args.knn}; every row but the first is forward + backward"
    )
    print("| variant | ms (min-max) |")
    print("|---|---|")
    for name, t in res.items():
        print(f"| {name} | {cell(t)} |")


def layer(args, device, autocast: str | None) -> None:
    """Whole ProductKeyMemory forward + backward, kernel='torch' vs 'triton', and lucidrains'
    product-key-memory (PyPI) at the same sizes when it is installed."""
    x = torch.randn(1, args.tokens, args.v_dim, device=device)
    layers = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = MemoryConfig(
            n_keys=args.n_keys, heads=args.heads, knn=args.knn, k_dim=args.k_dim, kernel=kernel
        )
        layers[kernel] = ProductKeyMemory(args.v_dim, args.v_dim, cfg).to(device).train()
    if importlib.util.find_spec("product_key_memory") is not None:
        from product_key_memory import PKM

        layers["reference"] = PKM(
            args.v_dim, heads=args.heads, num_keys=args.n_keys, topk=args.knn,
            dim_head=args.k_dim // 2,
        ).to(device).train()  # fmt: skip

    def step(model):
        def fn():
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, DTYPES.get(autocast), enabled=autocast is not None):
                out = model(x)
            out.float().pow(2).mean().backward()
            return out

        return fn

    res = time_variants({k: step(m) for k, m in layers.items()}, args)
    print(
        f"\nlayer fwd+bwd, dim {args.v_dim}, {args.tokens} tokens, {args.n_keys}^2 slots, heads "
        f"{args.heads}, knn {args.knn}, k_dim {args.k_dim}, autocast {autocast or 'off'}; "
        "reference = lucidrains' product-key-memory (dense value gradient)"
    )
    print("| layer | ms (min-max) | ratio to torch | ratio to reference |")
    print("|---|---|---|---|")
    for name, t in res.items():
        ratios = [
            "-" if isinstance(t, str) or isinstance(res.get(base), str | None) else
            f"{t[0] / res[base][0]:.2f}x"
            for base in ("torch", "reference")
        ]  # fmt: skip
        print(f"| {name} | {cell(t)} | {ratios[0]} | {ratios[1]} |")


def lazy_adam(args, device) -> None:
    """One LazyAdam step on the value table's row-sparse gradient: torch path vs fused kernel."""
    slots, v = args.n_keys**2, args.v_dim
    gen = torch.Generator(device=device).manual_seed(2)
    reads = torch.randint(0, slots, (args.tokens * args.heads * args.knn,), device=device)
    rows = reads.unique()
    grad = torch.sparse_coo_tensor(
        rows[None], torch.randn(rows.numel(), v, device=device, generator=gen), (slots, v)
    )
    start = torch.randn(slots, v, device=device, generator=gen)
    fns, params = {}, {}
    for row_wise in (False, True):
        for kernel in ("torch", "triton"):
            name = f"{kernel}{' row-wise' if row_wise else ''}"
            p = params[name] = torch.nn.Parameter(start.clone())
            opt = LazyAdam([p], lr=1e-3, row_wise=row_wise, kernel=kernel)

            def step(p=p, opt=opt):
                p.grad = grad
                opt.step()

            step()  # state allocated outside the timing
            fns[name] = step
        a, b = params["torch" + (" row-wise" if row_wise else "")], params[name]
        check([b.detach()], [a.detach()], f"LazyAdam row_wise={row_wise}", 1e-5)
    res = time_variants(fns, args)
    print(
        f"\nLazyAdam step, fp32 table {slots} x {v}, {rows.numel()} touched rows; GB/s counts "
        "the gradient read and the parameter and moments read and written once"
    )
    print("| kernel | ms (min-max) | GB/s |")
    print("|---|---|---|")
    for name, t in res.items():
        moved = rows.numel() * v * 4 * (5 if "row-wise" in name else 7)
        print(f"| {name} | {cell(t)} | {moved / t[0] / 1e9:.0f} |")


def value_step(args, device) -> None:
    """The values' optimizer step by table size, for the gradient rule of docs/memory.md:
    LazyAdam on the row-sparse gradient of one step's reads against torch's fused Adam on the
    dense gradient (both over a table of n_keys/2, n_keys and 2 n_keys squared slots)."""
    reads, v = args.tokens * args.heads * args.knn, args.v_dim
    print(
        f"\nvalues' optimizer step, fp32 tables x {v}, {reads} reads a step (tokens x heads x knn)"
    )
    print("| slots | rows touched | LazyAdam, sparse | fused Adam, dense | sparse / dense |")
    print("|---|---|---|---|---|")
    for n_keys in (max(args.n_keys // 2, 2), args.n_keys, args.n_keys * 2):
        slots = n_keys**2
        gen = torch.Generator(device=device).manual_seed(n_keys)
        rows = torch.randint(0, slots, (reads,), device=device, generator=gen).unique()
        grads = torch.randn(rows.numel(), v, device=device, generator=gen)
        sparse = torch.sparse_coo_tensor(rows[None], grads, (slots, v), is_coalesced=True)
        dense = sparse.to_dense()
        start = torch.randn(slots, v, device=device, generator=gen)
        lazy_p, dense_p = torch.nn.Parameter(start), torch.nn.Parameter(start.clone())
        lazy_opt = LazyAdam([lazy_p], lr=1e-3)
        dense_opt = torch.optim.Adam([dense_p], lr=1e-3, fused=True)

        def stepper(p, opt, grad):
            def fn():
                p.grad = grad
                opt.step()

            return fn

        fns = {
            "lazy": stepper(lazy_p, lazy_opt, sparse),
            "dense": stepper(dense_p, dense_opt, dense),
        }
        t = time_variants(fns, args)
        ratio = (
            "-"
            if isinstance(t["lazy"], str) or isinstance(t["dense"], str)
            else (f"{t['lazy'][0] / t['dense'][0]:.2f}x")
        )
        print(f"| {n_keys}^2 | {rows.numel() / slots:.0%} | {cell(t['lazy'])} | "
              f"{cell(t['dense'])} | {ratio} |")  # fmt: skip
        del lazy_opt, dense_opt, lazy_p, dense_p, dense, start
        if device.type == "cuda":
            torch.cuda.empty_cache()


@cli.main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--n-keys", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--knn", type=int, default=32)
    parser.add_argument("--k-dim", type=int, default=512)
    parser.add_argument("--v-dim", type=int, default=1024, help="value and layer dim")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    args = parser.parse_args()

    from pkm_lm.memory import triton_bag  # triton is needed from here on

    if torch.cuda.is_available():
        device, note = torch.device("cuda"), ""
    elif triton_bag.INTERPRETED:
        device, note = torch.device("cpu"), "; Triton interpreter on the CPU (timings meaningless)"
    else:
        raise NotFoundError(
            "bench_kernels.py needs a CUDA device (or TRITON_INTERPRET=1 for a smoke run)"
        )
    import triton

    print(
        f"{describe(device)}, triton {triton.__version__}, "
        f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}{note}"
    )
    sections = [(f"value read {d}", functools.partial(value_read, args, device, d)) for d in DTYPES]
    sections.append(("sub-key backward", functools.partial(sub_key_backward, args, device)))
    sections.append(("LazyAdam", functools.partial(lazy_adam, args, device)))
    sections.append(("values' optimizer step", functools.partial(value_step, args, device)))
    for autocast in (None, "bf16"):
        sections.append((f"layer {autocast}", functools.partial(layer, args, device, autocast)))
    failed = []
    for name, section in sections:  # one failing section must not hide the others' tables
        try:
            section()
        except Exception:
            failed.append(name)
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if failed:
        raise SystemExit(f"failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
