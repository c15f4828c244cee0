"""The lora_kernels internals the benchmarks reach into, imported here and nowhere else in bench/.

Everything else in bench/ uses the public API (lora_kernels, lora_kernels.timing). When these modules move
inside the package, this file is the one to change.
"""
from lora_kernels import gemm_dispatch  # noqa: F401  (GEMM path choices recorded with each result)
from lora_kernels.reference import draw_seed, lora_linear_reference  # noqa: F401
