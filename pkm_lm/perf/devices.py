"""Peak memory bandwidth and matmul FLOP/s of a device: a table of known GPUs, a probe that
measures what this device reaches, and overrides.

A roofline floor is only as true as the peaks it divides by. Datasheet peaks are what the
hardware can never beat; the probe's figures (a large device copy, a large matmul) are what a
kernel can reach in practice, usually 70-90% of the datasheet. Both are printed; CPUs have no
table entry and take their peaks from flags.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

import torch

from pkm_lm.errors import ConfigError


@dataclass(frozen=True)
class Peaks:
    """Bytes/s of device memory and matmul FLOP/s by input precision (dense, no sparsity)."""

    name: str
    bandwidth: float  # bytes/s
    fp32: float  # FLOP/s on CUDA cores (TF32 off)
    tf32: float
    bf16: float  # also fp16
    source: str = "datasheet"

    def flops(self, matmul: str) -> float:
        """FLOP/s of matmuls with inputs in ``matmul`` (fp32, tf32, bf16 or fp16)."""
        return {"fp32": self.fp32, "tf32": self.tf32, "bf16": self.bf16, "fp16": self.bf16}[matmul]


T = 1e12
# (pattern of torch.cuda.get_device_name, peaks): NVIDIA datasheets, dense figures, SXM parts
# unless the name says PCIe/NVL. The first pattern that matches wins.
KNOWN_GPUS: list[tuple[str, Peaks]] = [
    (r"B200", Peaks("B200", 8.0 * T, 80 * T, 1100 * T, 2250 * T)),
    (r"H200", Peaks("H200", 4.8 * T, 67 * T, 494 * T, 989 * T)),
    (r"H100.*PCIe", Peaks("H100 PCIe", 2.0 * T, 51 * T, 378 * T, 756 * T)),
    (r"H100.*NVL", Peaks("H100 NVL", 3.9 * T, 60 * T, 418 * T, 835 * T)),
    (r"H100", Peaks("H100 SXM", 3.35 * T, 67 * T, 494 * T, 989 * T)),
    (r"A100.*PCI.*40GB", Peaks("A100 PCIe 40GB", 1.555 * T, 19.5 * T, 156 * T, 312 * T)),
    (r"A100.*40GB", Peaks("A100 SXM 40GB", 1.555 * T, 19.5 * T, 156 * T, 312 * T)),
    (r"A100.*PCI", Peaks("A100 PCIe 80GB", 1.935 * T, 19.5 * T, 156 * T, 312 * T)),
    (r"A100", Peaks("A100 SXM 80GB", 2.039 * T, 19.5 * T, 156 * T, 312 * T)),
    (r"L40S", Peaks("L40S", 0.864 * T, 91.6 * T, 183 * T, 362 * T)),
    (r"\bL4\b", Peaks("L4", 0.3 * T, 30.3 * T, 60 * T, 121 * T)),
    (r"A10G?\b", Peaks("A10", 0.6 * T, 31.2 * T, 62.5 * T, 125 * T)),
    (r"RTX 4090", Peaks("RTX 4090", 1.008 * T, 82.6 * T, 82.6 * T, 165 * T)),
    (r"V100", Peaks("V100 SXM2", 0.9 * T, 15.7 * T, 15.7 * T, 125 * T)),
]


def known_peaks(device_name: str) -> Peaks | None:
    for pattern, peaks in KNOWN_GPUS:
        if re.search(pattern, device_name):
            return peaks
    return None


def device_peaks(
    device: torch.device,
    bandwidth_gbs: float | None = None,
    tflops: float | None = None,
    gpu: str | None = None,
) -> Peaks:
    """The table's peaks for a CUDA device (or for the GPU named ``gpu``, to compute floors
    without one), with ``bandwidth_gbs`` (GB/s) and ``tflops`` (every matmul precision,
    TFLOP/s) overriding them; a CPU or an unknown GPU needs both flags."""
    name = gpu or (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    peaks = known_peaks(name) if gpu or device.type == "cuda" else None
    if gpu and peaks is None:
        raise ConfigError(
            f"--gpu={gpu}: not a known GPU; one of {', '.join(p.name for _, p in KNOWN_GPUS)}"
        )
    if peaks is None:
        if bandwidth_gbs is None or tflops is None:
            raise ConfigError(
                f"no known peaks for {name!r}: give --bandwidth GB/s and --tflops TFLOP/s "
                f"(known GPUs: {', '.join(p.name for _, p in KNOWN_GPUS)})"
            )
        peaks = Peaks(name, 0.0, 0.0, 0.0, 0.0, source="flags")
    if bandwidth_gbs is not None:
        peaks = replace(peaks, bandwidth=bandwidth_gbs * 1e9, source="flags")
    if tflops is not None:
        f = tflops * T
        peaks = replace(peaks, fp32=f, tf32=f, bf16=f, source="flags")
    return peaks


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _copy_bandwidth(device: torch.device, mib: int, repeats: int) -> float:
    """Bytes/s of a device-to-device copy of ``mib`` MiB (each byte read once, written once)."""
    src = torch.empty(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), device, repeats)


def measure_peaks(device: torch.device, copy_mib: int = 1024, n: int = 8192, repeats: int = 5):
    """What this device reaches: the bandwidth of copying ``copy_mib`` MiB (read + write), and
    the FLOP/s of an n x n x n matmul in fp32 (TF32 off), TF32 and bf16. Best of ``repeats``."""
    bandwidth = _copy_bandwidth(device, copy_mib, repeats)
    flops = {}
    allow = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in (
            ("fp32", torch.float32, False),
            ("tf32", torch.float32, True),
            ("bf16", torch.bfloat16, False),
        ):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            flops[name] = 2 * n**3 / _best_seconds(lambda a=a, b=b: a @ b, device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return Peaks(name, bandwidth, flops["fp32"], flops["tf32"], flops["bf16"], source="measured")
