"""The layer-type table: which LoRA layer type wraps which base module. The one place that decides it.

inject_lora asks `can_adapt` which modules can take an adapter and `wrap` for the layer; FusedLoraLinear.from_linear
reaches `wrap` through base.py's slot (filled below). A new layer type adds its row here; the first row whose
test matches the module wins. DoRA (use_dora=True) is a column: the DoRA layer type of each base, or None where
DoRA is not supported (bases that take no adapter). Parameters rather than modules (PEFT's target_parameters: 3-D
expert weights) have the second table below: the module holding the parameters decides the layer type.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch.nn as nn

from . import base
from .base import LoraLayer
from .dense import FusedLoraLinear, is_conv1d
from .dora import FusedDoraLinear, FusedDoraLinear4bit
from .experts import FusedLoraExperts, adapted_experts_params
from .linear_4bit import FusedLoraLinear4bit


def _bnb_nn():
    """bitsandbytes.nn if it was imported (no module can be a bnb layer otherwise); never imports it."""
    return sys.modules.get("bitsandbytes.nn")


def is_bnb_4bit(module: nn.Module) -> bool:
    bnb_nn = _bnb_nn()
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


def is_bnb_8bit(module: nn.Module) -> bool:
    bnb_nn = _bnb_nn()
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear8bitLt)


def is_bnb_quantized(module: nn.Module) -> bool:
    """A bitsandbytes quantized linear (Linear4bit, Linear8bitLt). bitsandbytes is not imported for it."""
    return is_bnb_4bit(module) or is_bnb_8bit(module)


@dataclass(frozen=True)
class LayerType:
    base: str                                   # the base module, in words (errors, docs)
    matches: Callable[[nn.Module], bool]
    layer: Optional[type]                       # the LoraLayer subclass, built with its from_base(module, ...)
    refused: Optional[str] = None               # why this base takes no adapter (layer is None)
    dora: Optional[type] = None                 # the DoRA layer type (use_dora=True), None: not supported


# First match wins: bitsandbytes' linears are nn.Linear subclasses, so their rows come before nn.Linear's.
LAYER_TYPES: Tuple[LayerType, ...] = (
    LayerType("bitsandbytes Linear4bit (NF4/FP4)", is_bnb_4bit, FusedLoraLinear4bit, dora=FusedDoraLinear4bit),
    LayerType("bitsandbytes Linear8bitLt", is_bnb_8bit, None,
              refused="8-bit bitsandbytes bases (Linear8bitLt) are not supported by the kernels; only 4-bit "
                      "(Linear4bit, NF4/FP4)"),
    LayerType("torch nn.Linear", lambda m: isinstance(m, nn.Linear), FusedLoraLinear, dora=FusedDoraLinear),
    LayerType("transformers Conv1D (GPT-2)", is_conv1d, FusedLoraLinear, dora=FusedDoraLinear),
)


def layer_type_for(module: nn.Module) -> Optional[LayerType]:
    """The table's row for `module`, or None when no layer type wraps it."""
    return next((row for row in LAYER_TYPES if row.matches(module)), None)


def can_adapt(module: nn.Module) -> bool:
    """Whether the table has a row for `module` (a refused one included: wrapping it then says why not)."""
    return layer_type_for(module) is not None


def wrap(module: nn.Module, layer_class: Optional[type] = None, use_dora: bool = False, **adapter) -> LoraLayer:
    """The LoRA layer over `module`, sharing its weight and bias (adapter: r, lora_alpha, lora_dropout, use_rslora,
    init_lora_weights, lora_dtype). layer_class: build that class when it is a subclass of the row's layer type
    (FusedLoraLinear.from_linear on a subclass keeps the subclass). use_dora (or a DoRA layer_class): the row's DoRA
    layer type."""
    row = layer_type_for(module)
    if row is None:
        known = ", ".join(row.base for row in LAYER_TYPES if row.layer is not None)
        raise ValueError(f"from_linear expects a base module of the layer-type table ({known}), got "
                         f"{type(module).__name__}")
    if row.layer is None:
        raise ValueError(row.refused)
    kind = row.layer
    if use_dora or getattr(layer_class, "use_dora", False):  # FusedDoraLinear.from_linear: the row's DoRA type
        if row.dora is None:
            raise ValueError(f"use_dora=True: DoRA on a {row.base} base is not supported yet")
        kind = row.dora
    cls = layer_class if layer_class is not None and issubclass(layer_class, kind) else kind
    return cls.from_base(module, **adapter)


base._wrap_base[:] = [wrap]


# -- target_parameters: which layer type adapts the parameters of which module --------------------------------

def wrap_params(module: nn.Module, params, name: str = "", **adapter) -> LoraLayer:
    """The LoRA layer that adapts `params` of `module` (qualified name `name`, for errors): an MoE experts
    module of a layout FusedLoraExperts runs; any other module raises a ValueError naming it."""
    return FusedLoraExperts.from_base(module, params, name=name, **adapter)


def param_targets(module: nn.Module, name: str, targets) -> list:
    """The parameters of `module` that target_parameters `targets` names (PEFT's matching), registration order."""
    return adapted_experts_params(module, name, targets)
