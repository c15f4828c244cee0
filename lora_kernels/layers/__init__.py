"""LoRA layer types over one shared piece of adapter bookkeeping.

    base.py         LoraLayer: adapters by name, active adapter, mixed batches, merge/unmerge/disable, trainability
    dense.py        FusedLoraLinear over an nn.Linear or a transformers Conv1D
    linear_4bit.py  FusedLoraLinear4bit over a bitsandbytes Linear4bit (QLoRA)
    dora.py         FusedDoraLinear: DoRA (PEFT's use_dora) over an nn.Linear or a Conv1D; FusedDoraLinear4bit over a
                    bitsandbytes Linear4bit
    experts.py      FusedLoraExperts over a transformers MoE experts module (3-D weights, PEFT's target_parameters)
    registry.py     the layer-type table: which layer type wraps which base module
"""
from .base import DEFAULT_ADAPTER, AdapterSpec, LoraLayer, check_adapter_name
from .dense import FusedLoraLinear, is_conv1d, linear_features, linear_sharing
from .dora import FusedDoraLinear, FusedDoraLinear4bit
from .experts import FusedLoraExperts, experts_layout
from .linear_4bit import FusedLoraLinear4bit
from .registry import LAYER_TYPES, can_adapt, is_bnb_quantized, layer_type_for, param_targets, wrap, wrap_params

__all__ = ["DEFAULT_ADAPTER", "AdapterSpec", "LoraLayer", "check_adapter_name", "FusedLoraLinear", "is_conv1d",
           "linear_features", "linear_sharing", "FusedDoraLinear", "FusedDoraLinear4bit", "FusedLoraLinear4bit",
           "LAYER_TYPES", "can_adapt",
           "is_bnb_quantized", "layer_type_for", "wrap", "FusedLoraExperts", "experts_layout", "param_targets",
           "wrap_params"]
