"""transformers integration: one-call LoRA for any PreTrainedModel and adapter checkpoints from Trainer.

    model = apply_fused_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainer = Trainer(model=model, args=..., callbacks=[AdapterCheckpointCallback()])

Gradient checkpointing needs nothing special: the dropout seed is drawn from torch's RNG at forward, and
torch.utils.checkpoint restores the RNG state before recomputing, so the recomputed forward regenerates the very
same mask. model.generate works as on the base model (eval mode: no dropout).
"""
from __future__ import annotations

import os
from typing import Optional

import torch.nn as nn
from transformers import PreTrainedModel, TrainerCallback

from ..config import LoraConfig
from ..inject import inject_lora
from ..persistence import save_adapter
from ..training.distributed import unwrap


def apply_fused_lora(model: PreTrainedModel, config: Optional[LoraConfig] = None, **config_kwargs) -> PreTrainedModel:
    """Inject fused LoRA into a transformers model in place and return it.

    Pass a LoraConfig, or its fields as keyword arguments (apply_fused_lora(model, r=8, target_modules=[...])).
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__} "
                         "(use lora_kernels.inject_lora for a plain nn.Module)")
    if config is not None and config_kwargs:
        raise ValueError(f"pass either config or keyword arguments, not both (got config and {sorted(config_kwargs)})")
    if config is None:
        config = LoraConfig(**config_kwargs)
    return inject_lora(model, config)


class AdapterCheckpointCallback(TrainerCallback):
    """Writes the adapter (PEFT format, via save_adapter) into every checkpoint-<step> directory Trainer saves,
    and into `output_dir` at the end of training, so each checkpoint is loadable with load_adapter or
    PeftModel.from_pretrained."""

    def on_save(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
        if state.is_world_process_zero and model is not None:
            directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_adapter(unwrap(model), directory)
        return control

    def on_train_end(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
        if state.is_world_process_zero and model is not None:
            save_adapter(unwrap(model), args.output_dir)
        return control
