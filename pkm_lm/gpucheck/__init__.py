"""The GPU acceptance check (``scripts/gpu_check.sh``, ``make gpu-check``): stages of real
command lines, benchmarks and GPU tests, each judged PASS / WARN / FAIL / SKIP, into one report.
Standard library only until its env stage has installed the project's imports."""
