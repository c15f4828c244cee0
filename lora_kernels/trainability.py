"""Which LoRA parameters train, and counting them: PEFT's set_trainable-style switches and its parameter counts.

inject_lora decides the initial trainability; these change it later (e.g. freezing the first blocks' adapters
when new ones are added mid-training) and hand newly trainable parameters to an existing optimizer.
"""
import re
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .inject import adapter_parameters, lora_layers


def _name_matches(pattern: Union[str, Sequence[str]], name: str) -> bool:
    if isinstance(pattern, str):
        return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None
    return any(_name_matches(p, name) for p in pattern)


def set_trainable(model: nn.Module, pattern: Union[str, Sequence[str]], flag: bool = True) -> List[str]:
    """Set requires_grad of lora_A / lora_B of the LoRA layers whose name matches `pattern`; returns their names.

    pattern: a module name or suffix ("q_proj", "layers.0.self_attn.q_proj"), a regex that fullmatches the
    qualified name, or a list of those.
    """
    if not isinstance(flag, bool):
        raise ValueError(f"flag must be a bool, got {flag!r}")
    if not (isinstance(pattern, str) or (isinstance(pattern, (list, tuple)) and all(isinstance(p, str) for p in pattern))):
        raise ValueError(f"pattern must be a string or a list of strings, got {pattern!r}")
    layers = lora_layers(model)
    try:
        names = [n for n in layers if _name_matches(pattern, n)]
    except re.error as err:
        raise ValueError(f"pattern={pattern!r} is not a valid regular expression: {err}") from None
    if not names:
        raise ValueError(f"pattern={pattern!r} matches none of the {len(layers)} LoRA layers"
                         + (f", e.g. {list(layers)[:3]}" if layers else " (the model has no LoRA layer)"))
    for n in names:
        for p in adapter_parameters(layers[n]):  # every adapter the layer holds
            p.requires_grad_(flag)
    return names


def add_new_trainable_to_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, **group_options) -> List[str]:
    """Add the model's trainable parameters the optimizer does not hold yet, as one new param group.

    Existing groups and their state (e.g. Adam moments) are untouched; group_options (lr=..., weight_decay=...)
    override the optimizer's defaults for the new group. Returns the names of the parameters added.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if new:
        optimizer.add_param_group({"params": [p for _, p in new], **group_options})
    return [n for n, _ in new]


def _numel(p: torch.Tensor) -> int:
    """Weights a Parameter holds: a bitsandbytes 4-bit Params4bit packs two per byte of its storage dtype, and
    counts as the weights it stands for (as PEFT counts it)."""
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts, each shared Parameter counted once (PEFT's numbers)."""
    trainable = total = 0
    for _, p in model.named_parameters():
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts in PEFT's format."""
    trainable, total = trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
