"""Where a memory layer's step spends its time: torch.profiler events grouped by region.

The layer's forward names its regions (``query``, ``select``, ``value_read``: record_function
calls in ``ProductKeyMemory.forward``) and the training step adds ``clip`` and ``optimizer``.
A backward op belongs to the region of the forward op that recorded its autograd node (the
profiler gives both the same sequence number), so each region also has a ``<region> backward``
row; everything else (zero_grad, the loss and its backward, gradient accumulation) is
``rest``. On CUDA a region's time is the device time of the kernels its ops launched; on the
CPU it is the ops' own CPU time. Ops are counted as the profiler's leaf aten ops that do work
(views, reshapes and allocations excluded): about one kernel launch each on a GPU, so the count
is a device-free measure of launch overhead.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

REGIONS = ("query", "select", "value_read", "clip", "optimizer")
ROWS = (
    "query", "select", "value_read",
    "query backward", "select backward", "value_read backward",
    "clip", "optimizer", "rest",
)  # fmt: skip
BACKWARD = "autograd::engine::evaluate_function: "
# Ops that launch no kernel: views and metadata, allocations, no-op casts (a real cast shows
# up as its copy_ leaf).
NO_WORK = {
    "aten::" + name
    for name in (
        "view as_strided reshape _reshape_alias _unsafe_view transpose t permute select slice "
        "expand unsqueeze squeeze detach alias unbind split narrow view_as expand_as "
        "empty empty_like empty_strided resize_ to lift_fresh promote_types result_type "
        "is_nonzero item _local_scalar_dense contiguous set_ size stride numpy_T"
    ).split()
}


@dataclass
class RegionStats:
    ops: int = 0
    kernels: int = 0
    device_us: float = 0.0
    cpu_us: float = 0.0


def _chain(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def _is_op(event) -> bool:
    """A dispatched operator (aten::, a torch.library namespace), not an annotation."""
    return "::" in event.name and not event.name.startswith("autograd::")


def _forward_region(event) -> str | None:
    for e in _chain(event):
        if e.name.startswith(BACKWARD):
            return None
        if e.name in REGIONS:
            return e.name
    return None


def attribute(events) -> dict[str, RegionStats]:
    """Per row of ``ROWS``: leaf ops that do work, kernels, their device time, CPU self time."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    seq_region: dict[int, str] = {}
    for e in cpu:
        r = _forward_region(e)
        if r is not None and e.sequence_nr >= 0:
            seq_region.setdefault(e.sequence_nr, r)

    def region(e) -> str:
        for a in _chain(e):
            if a.name in REGIONS:
                return a.name
            if a.name.startswith(BACKWARD):
                r = seq_region.get(a.sequence_nr)
                return f"{r} backward" if r in ("query", "select", "value_read") else "rest"
        return "rest"

    stats = {row: RegionStats() for row in ROWS}
    for e in cpu:
        s = stats[region(e)]
        s.ops += _is_op(e) and e.name not in NO_WORK and not any(map(_is_op, e.cpu_children))
        s.kernels += len(e.kernels)
        s.device_us += sum(k.duration for k in e.kernels)
        s.cpu_us += e.self_cpu_time_total
    return stats


def top_kernels(events, n: int = 15) -> list[tuple[str, int, float]]:
    """(name, calls, total device us) of the ``n`` kernels with the most device time."""
    calls, total = Counter(), defaultdict(float)
    for e in events:
        if e.device_type != DeviceType.CPU:
            calls[e.name] += 1
            total[e.name] += e.time_range.elapsed_us()
    return sorted(((k, calls[k], total[k]) for k in total), key=lambda t: -t[2])[:n]


def profile_events(fn: Callable[[], None], device: torch.device, steps: int = 1, warmup: int = 2):
    """The events of ``steps`` calls of ``fn`` after ``warmup`` unprofiled ones."""
    for _ in range(warmup):
        fn()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof.events()


def count_ops(fn: Callable[[], None]) -> dict[str, int]:
    """Leaf ops that do work per row of one call of ``fn`` on the CPU (no warm-up run)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {row: s.ops for row, s in attribute(prof.events()).items()}


def region_table(stats: dict[str, RegionStats], steps: int, on_device: bool) -> str:
    """Markdown: per region and per step, ops, kernels, time (device or CPU) and its share."""
    what = "device" if on_device else "CPU"
    times = {r: (s.device_us if on_device else s.cpu_us) / steps for r, s in stats.items()}
    whole = sum(times.values()) or 1.0
    lines = [
        f"| region | ops | kernels | {what} ms | share |",
        "|---|---|---|---|---|",
    ]
    for row, s in stats.items():
        lines.append(
            f"| {row} | {s.ops / steps:.0f} | {s.kernels / steps:.0f} | "
            f"{times[row] / 1e3:.3f} | {times[row] / whole:.0%} |"
        )
    total_ops = sum(s.ops for s in stats.values()) / steps
    total_kernels = sum(s.kernels for s in stats.values()) / steps
    lines.append(f"| **all** | {total_ops:.0f} | {total_kernels:.0f} | {whole / 1e3:.3f} | 100% |")
    return "\n".join(lines)


def kernel_table(kernels: list[tuple[str, int, float]], steps: int, width: int = 90) -> str:
    lines = ["| kernel | calls | device ms |", "|---|---|---|"]
    for name, calls, us in kernels:
        short = name if len(name) <= width else name[: width - 3] + "..."
        short = short.replace("|", "\\|")
        lines.append(f"| `{short}` | {calls / steps:.0f} | {us / steps / 1e3:.3f} |")
    return "\n".join(lines)
