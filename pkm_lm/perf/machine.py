"""The machine a benchmark measured on, in one line to print and record beside its numbers.

Timings mean little without the machine they came from: which CPU, how many torch threads,
how busy the (often shared) machine was at the start, and the GPU when the benchmark ran on
one. Every benchmark prints this same line, so the description is written once, here.
"""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"3.91 4.02 3.50"``."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def describe(device: str | torch.device = "cpu") -> str:
    """CPU model and cores, torch's thread count, the load average now, the GPU if ``device``
    is a CUDA device, and torch's version. Call it after ``torch.set_num_threads``."""
    line = (
        f"CPU {cpu_model()} ({os.cpu_count()} cores), {torch.get_num_threads()} threads, "
        f"load average {load_average()}"
    )
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return line + f"; torch {torch.__version__}"
