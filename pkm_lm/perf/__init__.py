"""Measuring speed: the machine line, JSON-lines records, device peaks, the memory layer's
roofline floor and its profile by region. Benchmarks in ``scripts/`` and ``pkm_lm.gpucheck``
use these; nothing here is needed to train."""
