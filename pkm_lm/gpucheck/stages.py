"""The stages of the GPU check, in the order they run, each with its timeout, log and checks.

The speed measurements come first (what the GPU is borrowed for), then the GPU tests, the
optional stages if the budget has room for them (the reproduction headline, torch.compile
at paper width), then the real command lines of the acceptance check.
"""

from __future__ import annotations

from . import commands as c
from . import speed_verdicts as sv
from . import verdicts as v
from .stage import Stage

STAGES = [
    Stage("env", "environment", 60, "setup.log",
          "CUDA device, versions, bf16; the project's imports (missing ones from the wheelhouse)",
          c.env_groups, v.env_verdict),
    Stage("data", "data", 60, "setup.log",
          "datasets made through the real shard writer (manifest complete, checksums)",
          c.data_groups, v.data_verdict),
    Stage("profile", "profile of the memory layer", 90, "profile.log",
          "a training step and a forward under torch.profiler: device time and kernels per "
          "region (query, select, value_read, their backward, clip, optimizer, rest), top "
          "kernels (profile.md)",
          c.profile_groups, sv.profile_verdict),
    Stage("roofline", "roofline of the memory layer", 90, "roofline.log",
          "the layer's forward and training step timed beside their floor from bytes and "
          "FLOPs; PASS when each is within 1.5x of the floor beyond the spread",
          c.roofline_groups, sv.roofline_verdict),
    Stage("bench-train", "bench_train.py: paper width and dim 512", 150, "bench.log",
          "12L_1mem vs 12L_0mem (training, >= 0.75x) and vs 24L_0mem (inference, >= 1.4x) "
          "at dim 1024, bf16 and fp16; dim 512 fp32/bf16 as the first GPU run; met beyond "
          "the spread",
          c.bench_train_groups, sv.bench_train_verdict),
    Stage("bench-memory", "bench_memory.py at 8,192 tokens", 150, "bench.log",
          "the layer vs lucidrains' product-key-memory at 128^2-1024^2: faster at every size "
          "and phase beyond the spread",
          c.bench_memory_groups, sv.bench_memory_verdict),
    Stage("pytest", "pytest -m gpu", 220, "pytest.log",
          "every gpu-marked test passes (none may be missing); skips and the tests' fallback "
          "warnings are WARN",
          c.pytest_groups, v.pytest_verdict),
    Stage("repro", "reproduction headline (GPU scale)", 240, "repro.log",
          "scripts/sweep.sh headline --scale gpu writes its table; its wall time",
          c.repro_groups, sv.repro_verdict, optional=True, missing=c.repro_missing),
    Stage("compile", "bench_train.py with train.compile=true", 180, "bench.log",
          "the paper's width in bf16 with torch.compile: the same targets (compare with "
          "bench-train to choose train.compile's default)",
          c.compile_groups, sv.compile_verdict, optional=True),
    Stage("train", "real command lines", 120, "train.log",
          "finite loss, skipped steps <= 10% (fp16) / 0 (bf16), last valid ppl < 0.9 x first, "
          "memory usage > 50%; evaluate writes a test record; generate prints 2 samples",
          c.train_groups, v.train_verdict),
    Stage("paper", "12L_1mem paper-width step", 90, "paper.log",
          "the real trainer runs 12L_1mem steps; ms/step and peak GPU memory",
          c.paper_groups, v.paper_verdict),
]  # fmt: skip
