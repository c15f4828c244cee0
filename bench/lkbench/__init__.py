"""Shared pieces of the benchmark suites and scripts in bench/ (bench-only, not part of lora_kernels).

Importing this package first matters: without a GPU, Triton's kernels only run under its interpreter,
and TRITON_INTERPRET must be in the environment before triton is first imported (by lora_kernels).
"""
import os

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency of lora_kernels
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
