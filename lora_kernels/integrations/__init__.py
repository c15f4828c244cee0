"""Shims for Hugging Face libraries, importable as lora_kernels.integrations.{peft,transformers}.

Each submodule imports its library lazily on import of that submodule only, so `import lora_kernels` never
needs peft or transformers.

This package owns what a transformers model gets from inject_lora: the adapter-only Trainer checkpoints
(transformers.py), registered below in hooks.py's import-free registry: lora_kernels/__init__.py imports this
package at `import lora_kernels` without importing torch, and the injector never imports upwards.
"""
import sys

from ..hooks import after_inject


@after_inject
def _transformers_checkpoints(model) -> None:
    """A transformers PreTrainedModel saves adapter-only checkpoints under Trainer and resumes from them
    (transformers.py). Only a model whose transformers module is already loaded can be one, so plain torch users
    never import transformers here."""
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is not None and isinstance(model, modeling.PreTrainedModel):
        from .transformers import enable_adapter_checkpoints

        enable_adapter_checkpoints(model)
