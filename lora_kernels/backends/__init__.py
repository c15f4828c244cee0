"""Backends: each registers a forward/backward pair of custom ops behind one LoraLinearFunction (base.py).

    torch   backends/torch.py    plain PyTorch, any device and dtype; the CPU default
    triton  backends/triton.py   the fused kernels of lora_kernels/ops/; CUDA tensors, or CPU under TRITON_INTERPRET=1
    cuda    backends/cuda.py     csrc/'s CUDA kernels around cuBLAS; experimental, explicit request only

LORA_KERNELS_BACKEND=auto takes Triton where its kernels compute the input correctly (CUDA tensors, or
float16/float32 on CPU under the interpreter) and torch otherwise. A backend asked for explicitly that cannot
run the input raises its reason; nothing falls back silently.
"""
from typing import Dict, Type

# No `import torch` here: importing the submodule backends/torch.py binds the name `torch` in this namespace.
from ..settings import requested_backend
from . import cuda, triton
from . import torch as torch_backend
from .base import LoraLinearFunction, MultiLoraLinearFunction, QLoraLinearFunction

_MODULES = {"triton": triton, "torch": torch_backend, "cuda": cuda}

FUNCTIONS: Dict[str, Type[LoraLinearFunction]] = {
    "triton": triton.TritonLoraLinear,
    "torch": torch_backend.TorchLoraLinear,
    "cuda": cuda.CudaLoraLinear,
}

# Several adapters in one batch (functional.fused_multi_lora_linear); the CUDA extension has no segmented kernels.
MULTI_FUNCTIONS: Dict[str, Type[MultiLoraLinearFunction]] = {
    "triton": triton.TritonMultiLoraLinear,
    "torch": torch_backend.TorchMultiLoraLinear,
}


# QLoRA (a 4-bit base): the Triton and torch backends; the CUDA extension has no 4-bit kernels.
FUNCTIONS_4BIT: Dict[str, Type[QLoraLinearFunction]] = {
    "triton": triton.TritonQLoraLinear,
    "torch": torch_backend.TorchQLoraLinear,
}


def resolve_backend(x, four_bit: bool = False) -> str:
    """The backend that will run for input `x` (four_bit: over a 4-bit base weight, where cuda, asked for
    explicitly, raises: it has no 4-bit kernels); the requested one's error when it cannot. One decision per call
    of a functional entry point."""
    name = requested_backend()
    if four_bit and name == "cuda":
        raise ValueError("LORA_KERNELS_BACKEND=cuda has no 4-bit (QLoRA) kernels; use triton, torch or auto")
    if name == "auto":
        # cuda is never auto-picked until GPU measurements show where it wins.
        return "triton" if triton.unavailable_reason(x) is None else "torch"
    reason = _MODULES[name].unavailable_reason(x)
    if reason is not None:
        raise reason
    return name


def resolve_backend_4bit(x) -> str:
    """resolve_backend for a 4-bit base weight (its name before resolve_backend's four_bit)."""
    return resolve_backend(x, four_bit=True)


def backends_4bit_for(x) -> list:
    """The backends with 4-bit kernels that can compute x here (`lora-kernels check` runs each)."""
    return [name for name in FUNCTIONS_4BIT if _MODULES[name].unavailable_reason(x) is None]


def keep_mask(backend: str, seed, shape, p: float):
    """The dropout keep-mask (bool, `shape`) that `backend` derives from `seed` (a 1-element int64 tensor, as a
    forward draws it): the oracle's mask for a run with dropout."""
    if backend == "torch":
        return torch_backend.torch_keep_mask(int(seed.item()), shape, p, seed.device)
    if backend != "triton":
        raise ValueError(f"keep_mask: no mask for backend {backend!r}")
    from ..ops.dropout import dropout_mask
    from .base import on_device

    K, M = shape[-1], 1
    for s in shape[:-1]:
        M *= s
    with on_device(seed):
        return dropout_mask(seed, M, K, p).reshape(shape)
