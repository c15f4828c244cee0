"""lora_kernels: fused Triton kernels for LoRA training, a drop-in nn.Linear that speaks PEFT's format.

The names below are imported on first use (PEP 562), so `import lora_kernels` and the command line's `--help`
do not pay for torch, triton and transformers until something needs them.
"""
import importlib

__version__ = "0.1.0"

from . import integrations  # noqa: E402,F401  (registers what inject_lora does for transformers models; torch-free)

_HOMES = {
    "resolve_backend": ".backends",
    "AdapterSegments": ".functional", "fused_lora_linear": ".functional", "fused_multi_lora_linear": ".functional",
    "fused_dora_linear": ".functional",
    "FusedLoraLinear": ".layers", "FusedDoraLinear": ".layers",
    "LoraConfig": ".config",
    "disable_adapter": ".inject", "inject_lora": ".inject", "merge_and_unload": ".inject", "unload": ".inject",
    "add_new_trainable_to_optimizer": ".trainability", "print_trainable_parameters": ".trainability",
    "set_trainable": ".trainability", "trainable_parameters": ".trainability",
    "load_adapter": ".persistence", "save_adapter": ".persistence", "save_adapters": ".persistence",
    "batch_adapters": ".adapters", "set_adapter": ".adapters",
}

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


def __getattr__(name):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    else:
        try:  # a submodule, e.g. lora_kernels.layer after a plain `import lora_kernels`
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
