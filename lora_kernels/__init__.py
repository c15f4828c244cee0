"""lora_kernels: fused Triton kernels for LoRA training, a drop-in nn.Linear that speaks PEFT's format."""
from .functional import fused_lora_linear, resolve_backend
from .layer import FusedLoraLinear

__version__ = "0.1.0"

__all__ = [
    "FusedLoraLinear",
    "fused_lora_linear",
    "resolve_backend",
]
