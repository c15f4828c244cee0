"""The import path of FusedLoraLinear4bit before the layers/ package (lora_kernels.layers.linear_4bit): a re-export."""
from .layers.linear_4bit import MERGE_WARNING, FusedLoraLinear4bit  # noqa: F401
