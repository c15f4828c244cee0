"""The environment switches of the package, read at call time (tests and users may change them mid-process).

    LORA_KERNELS_BACKEND  auto | triton | torch | cuda     which backend runs fused_lora_linear
    LORA_KERNELS_GEMM     auto | fused | split             which GEMM runs the base product on the Triton backend
    TRITON_INTERPRET      1 runs the Triton kernels on CPU (Triton reads it when it is first imported)

Nothing here imports torch or triton, so every layer (ops/ included) may import it.
"""
import os

BACKENDS = ("auto", "triton", "torch", "cuda")
GEMM_CHOICES = ("auto", "fused", "split")
# The launchers' gemm= values: the Triton GEMM with the LoRA epilogue, or torch's matmul then the LoRA term in place.
GEMM_PATHS = ("fused", "split")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _choice(variable: str, allowed) -> str:
    value = os.environ.get(variable, "auto").strip().lower()
    if value not in allowed:
        raise ValueError(f"{variable}={value!r} is not one of {', '.join(allowed)}")
    return value


def requested_backend() -> str:
    return _choice("LORA_KERNELS_BACKEND", BACKENDS)


def requested_gemm() -> str:
    return _choice("LORA_KERNELS_GEMM", GEMM_CHOICES)


def check_environment() -> None:
    """ValueError naming the variable where LORA_KERNELS_BACKEND or LORA_KERNELS_GEMM holds a value we do not know
    (checked up front: the GEMM switch is read only when the Triton backend runs, so a typo would pass silently)."""
    requested_backend()
    requested_gemm()
