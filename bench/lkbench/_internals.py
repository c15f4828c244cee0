"""The lora_kernels internals the benchmarks reach into, imported here and nowhere else in bench/.

Everything else in bench/ uses the public API (lora_kernels, lora_kernels.timing). When these modules move
inside the package, this file is the one to change.
"""
from lora_kernels.backends import gemm_dispatch  # noqa: F401  (GEMM path choices recorded with each result)
from lora_kernels.backends.base import draw_seed  # noqa: F401
from lora_kernels.backends.triton import dot_precision  # noqa: F401
from lora_kernels.layers import linear_sharing  # noqa: F401
from lora_kernels.reference import lora_linear_reference  # noqa: F401
