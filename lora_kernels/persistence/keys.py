"""PEFT's key naming and config mapping: what one adapter of the model is, under the file keys and in the
adapter_config.json fields PEFT reads and writes (the model's own names back from a file key, too)."""
from __future__ import annotations

import os
import re
from collections import Counter
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..config import LoraConfig
from ..inject import ModulesToSaveWrapper, applied_configs, check_adapter, lora_layers, model_adapters
from ..layers import FusedLoraExperts, LoraLayer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

PathLike = Union[str, os.PathLike]


# -- what the model holds, under PEFT's keys ------------------------------------------------------------

def _bias_mode(configs: List[LoraConfig]) -> str:
    modes = {c.bias for c in configs}
    return "all" if "all" in modes else ("lora_only" if "lora_only" in modes else "none")


def _bias_keys(model: nn.Module, mode: str, lora_names) -> Dict[str, Tuple[str, nn.Parameter]]:
    """{file key: (parameter name, parameter)} for the biases `mode` trains. PEFT names an adapted layer's bias
    `<path>.base_layer.bias` (its base Linear is a child there); other biases keep their own name."""
    out = {}
    if mode == "none":
        return out
    for name, p in model.named_parameters():
        if not (name == "bias" or name.endswith(".bias")):
            continue
        owner = name[: -len(".bias")] if name.endswith(".bias") else ""
        if owner in lora_names:
            out[f"{PREFIX}{owner}.base_layer.bias"] = (name, p)
        elif mode == "all":
            out[f"{PREFIX}{name}"] = (name, p)
    return out


def _saved_module_keys(model: nn.Module, names: List[str]) -> Dict[str, torch.Tensor]:
    """PEFT stores a modules_to_save copy's tensors under the module's own path (adapter name removed)."""
    out = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.trained_module
        for k, v in module.state_dict().items():
            out[f"{PREFIX}{name}.{k}"] = v
    return out


def _saved_adapter(model: nn.Module, adapter_name: Optional[str]) -> str:
    """The adapter a save writes: the one named, or the model's only one (several and no name: ValueError)."""
    names = model_adapters(model)
    if not names:
        raise ValueError(f"the model ({type(model).__name__}) has no LoRA layer to save; call inject_lora first")
    if adapter_name is None:
        if len(names) > 1:
            raise ValueError(f"the model has several adapters {names}; pass adapter_name= to say which one to save "
                             "(one directory per adapter, as PEFT), or save them all with "
                             "lora_kernels.persistence.save_adapters (a transformers model: save_pretrained)")
        return names[0]
    return check_adapter(model, adapter_name)


def _adapter_layers(model: nn.Module, adapter_name: str) -> Dict[str, LoraLayer]:
    return {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.adapter_names}


def adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's file keys (the tensors themselves, not copies)."""
    adapter_name = _saved_adapter(model, adapter_name)
    layers = _adapter_layers(model, adapter_name)
    sd: Dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for suffix, t in layer.peft_tensors(adapter_name).items():
            sd[f"{PREFIX}{name}.{suffix}"] = t
    configs = applied_configs(model, adapter_name) or applied_configs(model)
    for key, (_, p) in _bias_keys(model, _bias_mode(configs), set(layers)).items():
        sd[key] = p
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    sd.update(_saved_module_keys(model, wrapped))
    return sd


def adapter_config(model: nn.Module, adapter_name: Optional[str] = None) -> LoraConfig:
    """One LoraConfig describing one adapter of the model, even one added by several inject_lora calls.

    target_modules lists the adapted modules by qualified name; per-module ranks / alphas that differ from the
    first config's are written as exact-name rank_pattern / alpha_pattern entries.
    """
    adapter_name = _saved_adapter(model, adapter_name)
    layers = _adapter_layers(model, adapter_name)
    specs = {n: layer.adapter_spec(adapter_name) for n, layer in layers.items()}
    configs = applied_configs(model, adapter_name) or applied_configs(model)
    for attr in ("lora_dropout", "use_rslora"):
        values = {getattr(spec, attr) for spec in specs.values()}
        if len(values) > 1:
            raise ValueError(f"the LoRA layers of adapter {adapter_name!r} have different {attr} values "
                             f"{sorted(values)}; PEFT's adapter_config.json holds one {attr} per adapter, so it "
                             "cannot be saved as one")
    dora = {bool(getattr(layer, "use_dora", False)) for layer in layers.values()}
    if len(dora) > 1:
        raise ValueError(f"the layers of adapter {adapter_name!r} mix DoRA and plain LoRA; PEFT's "
                         "adapter_config.json holds one use_dora per adapter, so it cannot be saved as one")
    fan = {layer.fan_in_fan_out for layer in layers.values()}
    if len(fan) > 1:
        raise ValueError(f"the LoRA layers have different fan_in_fan_out values {sorted(fan)}; PEFT's "
                         "adapter_config.json holds one fan_in_fan_out per adapter, so it cannot be saved as one")
    first = next(iter(specs.values()))
    r0 = configs[0].r if configs else Counter(s.r for s in specs.values()).most_common(1)[0][0]
    a0 = configs[0].lora_alpha if configs else Counter(s.lora_alpha for s in specs.values()).most_common(1)[0][0]
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    modules = sorted(n for n, layer in layers.items() if not isinstance(layer, FusedLoraExperts))
    # PEFT's target_parameters: the experts layers' adapted parameters by qualified name.
    params = sorted(f"{n}.{p}" for n, layer in layers.items() if isinstance(layer, FusedLoraExperts)
                    for p in layer.params)
    return LoraConfig(
        r=r0, lora_alpha=a0, lora_dropout=first.lora_dropout, use_rslora=first.use_rslora,
        target_modules=modules or None, target_parameters=params or None, bias=_bias_mode(configs),
        # re.escape: PEFT reads pattern keys as regexes; an escaped full name matches that module only.
        rank_pattern={re.escape(k): s.r for n, s in specs.items() if s.r != r0 for k in _pattern_names(n, layers)},
        alpha_pattern={re.escape(k): s.lora_alpha for n, s in specs.items() if s.lora_alpha != a0
                       for k in _pattern_names(n, layers)},
        modules_to_save=wrapped or None, fan_in_fan_out=fan.pop(), use_dora=dora.pop(),
    )


def _pattern_names(name: str, layers: Dict[str, LoraLayer]) -> List[str]:
    """The names a rank_pattern / alpha_pattern key must match for a layer: the module's, or (PEFT matches
    target_parameters by parameter) each adapted parameter's."""
    layer = layers[name]
    return [f"{name}.{p}" for p in layer.params] if isinstance(layer, FusedLoraExperts) else [name]


def own_name(model: nn.Module, name: str, adapter_name: str, layers: Dict[str, LoraLayer],
             wrappers: List[str], own) -> Optional[str]:
    """The model's state-dict name of the tensor an adapter file stores as `base_model.model.<name>` for adapter
    `adapter_name`, or None. layers: lora_layers(model); wrappers: the ModulesToSaveWrapper paths; own: the
    model's state-dict names."""
    hit = layer_key(name, layers)
    if hit is not None:
        path, suffix = hit
        if adapter_name not in layers[path].adapter_names:
            return None
        # The first adapter of a layer is lora_A / lora_B, further ones lora_As.<name> / lora_Bs.<name>.
        return f"{path}.{layers[path].peft_names(adapter_name)[suffix]}"
    if name.endswith(".base_layer.bias") and name[: -len(".base_layer.bias")] in layers:
        return f"{name[: -len('.base_layer.bias')]}.bias"
    if name in own:
        return name
    # modules_to_save: PEFT names the wrapped module's own tensors; ours live in the wrapper's trained copy.
    for w in wrappers:
        if name.startswith(w + "."):
            candidate = f"{w}.trained_module.{name[len(w) + 1:]}"
            if candidate in own:
                return candidate
    return None


def layer_key(name: str, layers: Dict[str, LoraLayer]) -> Optional[Tuple[str, str]]:
    """(layer path, suffix) when the file key `base_model.model.<name>` is an adapter tensor of one of `layers`
    (the suffix is one of the layer type's peft_keys, e.g. `lora_A.weight`), else None."""
    for i, c in enumerate(name):
        if c == "." and name[:i] in layers and name[i + 1:] in layers[name[:i]].peft_keys:
            return name[:i], name[i + 1:]
    return None


def own_names(model: nn.Module, adapter_name: Optional[str] = None) -> Dict[str, str]:
    """{file key: the model's own state-dict name} for every tensor of one adapter's file (adapter_state_dict)."""
    adapter_name = _saved_adapter(model, adapter_name)
    layers = lora_layers(model)
    wrappers = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    own = set(model.state_dict().keys())
    return {key: own_name(model, key[len(PREFIX):], adapter_name, layers, wrappers, own)
            for key in adapter_state_dict(model, adapter_name)}


def adapter_tensors(model: nn.Module, adapter_name: Optional[str] = None,
                    state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """One adapter's file contents: {file key: contiguous CPU copy in the tensor's own dtype} (safetensors needs
    contiguous, unshared storage). With state_dict (the model's own names, as Trainer passes a gathered one under
    DeepSpeed / FSDP, where the module's own parameters may be shards) the tensors are taken from it."""
    tensors = adapter_state_dict(model, adapter_name)
    if state_dict is not None:
        names = own_names(model, adapter_name)
        tensors = {key: state_dict.get(names[key], t) for key, t in tensors.items()}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

