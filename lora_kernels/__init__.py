"""lora_kernels: fused Triton kernels for LoRA training, a drop-in nn.Linear that speaks PEFT's format."""
from .backends import resolve_backend
from .functional import AdapterSegments, fused_dora_linear, fused_lora_linear, fused_multi_lora_linear
from .layers import FusedDoraLinear, FusedLoraLinear
from .config import LoraConfig
from .inject import disable_adapter, inject_lora, merge_and_unload, unload
from .trainability import (add_new_trainable_to_optimizer, print_trainable_parameters, set_trainable,
                           trainable_parameters)
from .persistence import load_adapter, save_adapter, save_adapters
from .adapters import batch_adapters, set_adapter
from . import integrations  # noqa: F401  (registers what inject_lora does for transformers models)

__version__ = "0.1.0"

__all__ = [
    "FusedLoraLinear",
    "FusedDoraLinear",
    "fused_lora_linear",
    "fused_dora_linear",
    "fused_multi_lora_linear",
    "AdapterSegments",
    "resolve_backend",
    "LoraConfig",
    "inject_lora",
    "trainable_parameters",
    "print_trainable_parameters",
    "merge_and_unload",
    "unload",
    "disable_adapter",
    "set_trainable",
    "add_new_trainable_to_optimizer",
    "save_adapter",
    "save_adapters",
    "load_adapter",
    "set_adapter",
    "batch_adapters",
]
