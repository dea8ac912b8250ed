"""Test-session setup shared by all test files."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is imported (its own library functions are decorated
# then), so it is set here, before any test imports it: without CUDA, Triton kernels run on CPU
# tensors in its interpreter. With CUDA it stays unset and the kernels compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
