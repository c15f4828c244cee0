"""Putting FusedLoraLinear into a model and taking it out again, with PEFT's matching rules.

inject_lora replaces matching nn.Linear modules in place by LoRA layers (FusedLoraLinear, or the layer type the
table in layers/registry.py picks for the base module) that share the Linear's own weight and bias Parameters (no
copy of W), and freezes everything that is not LoRA (or a bias / modules_to_save module the config asks to train).
Calling it again adds adapters to new targets and leaves existing ones alone.
The configs applied are kept on the model (attribute `_lora_kernels_configs`) so save_adapter can describe them.

Named adapters: inject_lora(model, cfg, adapter_name="b") on a model that has adapter "a" adds "b" to the targets
cfg matches (a Linear becomes a FusedLoraLinear whose first adapter is "b"; a FusedLoraLinear gets "b" beside its
others). The model's adapters, in the order they were added, and the configs of each are kept on the model
(attribute `_lora_kernels_adapters`); that order is the adapter numbering of every mixed batch.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterable, List, Optional, Tuple

import torch.nn as nn

from .config import LoraConfig
from .hooks import after_inject, run_after_inject  # noqa: F401  (after_inject: where hooks register)
from .layers import DEFAULT_ADAPTER, FusedLoraExperts, LoraLayer, check_adapter_name, layer_type_for, wrap, wrap_params
from .targets import (ModulesToSaveWrapper, find_modules_to_save, find_param_targets,  # noqa: F401  (re-exported)
                      find_targets)

CONFIGS_ATTR = "_lora_kernels_configs"
ADAPTERS_ATTR = "_lora_kernels_adapters"  # {adapter name: [configs]}, in the order the adapters were added
ACTIVE_ATTR = "_lora_kernels_active"  # the adapter whole batches use


# -- module surgery -------------------------------------------------------------------------------------

def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_layers(model: nn.Module) -> Dict[str, LoraLayer]:
    """{qualified name: layer} for every adapter layer in the model (FusedLoraLinear and the other layer types)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def applied_configs(model: nn.Module, adapter_name: Optional[str] = None) -> List[LoraConfig]:
    """The configs inject_lora applied: all of them, or those of one adapter."""
    if adapter_name is None:
        return list(getattr(model, CONFIGS_ATTR, []))
    return list(getattr(model, ADAPTERS_ATTR, {}).get(adapter_name, []))


def model_adapters(model: nn.Module) -> List[str]:
    """The model's adapter names in the order they were added (the numbering of mixed batches)."""
    names = list(getattr(model, ADAPTERS_ATTR, {}))
    # Layers built by hand (FusedLoraLinear in a model, no inject_lora) still count.
    for layer in lora_layers(model).values():
        names += [n for n in layer.adapter_names if n not in names]
    return names


def active_adapter(model: nn.Module) -> Optional[str]:
    names = model_adapters(model)
    return getattr(model, ACTIVE_ATTR, None) or (names[0] if names else None)


def check_adapter(model: nn.Module, adapter_name) -> str:
    """adapter_name, if the model has it; else ValueError naming it and listing the model's adapters."""
    names = model_adapters(model)
    if adapter_name not in names:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model's adapters are {names}")
    return adapter_name


def _record(model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    # Stored outside the module tree (plain attributes): bookkeeping, not state to move or save.
    object.__setattr__(model, CONFIGS_ATTR, applied_configs(model) + [config])
    adapters = dict(getattr(model, ADAPTERS_ATTR, {}))
    adapters[adapter_name] = adapters.get(adapter_name, []) + [config]
    object.__setattr__(model, ADAPTERS_ATTR, adapters)
    if getattr(model, ACTIVE_ATTR, None) is None:
        object.__setattr__(model, ACTIVE_ATTR, adapter_name)


def adapter_parameters(layer: LoraLayer, adapter_name: Optional[str] = None) -> List[nn.Parameter]:
    """The tensors (lora_A, lora_B) of one adapter of the layer, or of all of them."""
    names = layer.adapter_names if adapter_name is None else [adapter_name]
    return [p for n in names for p in layer.adapter_params(n)]


def _is_bias_name(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


def _freeze_all_but_adapters(model: nn.Module, new_layers: Iterable[Tuple[LoraLayer, str]]) -> None:
    """Freeze every non-LoRA parameter except what the applied configs train; new adapters train.

    Existing adapters keep their requires_grad (set_trainable may have frozen some on purpose).
    """
    layers = lora_layers(model)
    lora_ids = {id(p) for layer in layers.values() for p in adapter_parameters(layer)}
    configs = applied_configs(model)
    bias_modes = {c.bias for c in configs}
    lora_bias_ids = {id(layer.bias) for layer in layers.values() if layer.bias is not None}
    saved_ids = {id(p) for m in model.modules() if isinstance(m, ModulesToSaveWrapper)
                 for p in m.trained_module.parameters()}
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            continue
        train = id(p) in saved_ids
        if "all" in bias_modes and _is_bias_name(name):
            train = True
        if "lora_only" in bias_modes and id(p) in lora_bias_ids:
            train = True
        p.requires_grad_(train)
    for layer, adapter_name in new_layers:
        layer.set_adapter_trainable(adapter_name, True)


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Add the LoRA adapter `adapter_name` to the nn.Linear modules `config` targets, in place; returns `model`.

    Each target becomes a FusedLoraLinear (FusedDoraLinear with config.use_dora) sharing the Linear's weight and bias Parameters. Everything else is
    frozen except what config.bias / config.modules_to_save train. Targets that already hold `adapter_name`
    are left as they are (their trainability too); with a new adapter_name, targets that are already LoRA
    layers get the new adapter beside their others (its own rank, alpha, dropout). New adapters train; the
    active adapter (set_adapter) stays the first one added.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise ValueError(f"config must be a lora_kernels.LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    new, existing = find_targets(model, config)
    for name in existing:
        layer = model.get_submodule(name)
        if adapter_name not in layer.adapter_names and getattr(layer, "use_dora", False) != config.use_dora:
            raise ValueError(f"use_dora={config.use_dora}: {name!r} already holds "
                             f"{'DoRA' if not config.use_dora else 'plain LoRA'} adapters {layer.adapter_names}; "
                             "a layer holds DoRA adapters only or plain ones only")
    if config.use_dora:  # checked before any module changes
        for name in new:
            row = layer_type_for(model.get_submodule(name))
            if row is not None and row.layer is not None and row.dora is None:
                raise ValueError(f"use_dora=True: {name!r} is a {row.base}; DoRA on it is not supported yet")
    param_targets_ = find_param_targets(model, config)
    to_save = find_modules_to_save(model, config)
    active = active_adapter(model) or adapter_name
    new_layers = []
    wrapped = {}
    for name, params in param_targets_.items():
        module = model.get_submodule(name)
        if isinstance(module, FusedLoraExperts):
            if adapter_name not in module.adapter_names:
                module.add_adapter(adapter_name)  # raises: one adapter per experts layer
            continue
        ranks = {config.rank_for(f"{name}.{p}") for p in params}
        alphas = {config.alpha_for(f"{name}.{p}") for p in params}
        if len(ranks) > 1 or len(alphas) > 1:
            raise ValueError(f"target_parameters: the parameters {params} of {name!r} get different ranks "
                             f"{sorted(ranks)} or alphas {sorted(alphas)} from rank_pattern / alpha_pattern; one "
                             "experts layer holds one rank and alpha")
        # Built (and validated) for every experts module before the model changes.
        wrapped[name] = wrap_params(module, params, name=name, r=ranks.pop(), lora_alpha=alphas.pop(),
                                    lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                                    init_lora_weights=config.init_lora_weights)
    for name, layer in wrapped.items():
        layer.rename_first_adapter(adapter_name)
        layer.active_adapter = active
        _set_submodule(model, name, layer)
        new_layers.append((layer, adapter_name))
    for name in new:
        linear = model.get_submodule(name)
        layer = wrap(linear, r=config.rank_for(name), lora_alpha=config.alpha_for(name),
                     lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                     init_lora_weights=config.init_lora_weights, use_dora=config.use_dora)
        layer.rename_first_adapter(adapter_name)
        layer.active_adapter = active  # a layer lacking the model's active adapter computes its base output
        layer.train(linear.training)
        _set_submodule(model, name, layer)
        new_layers.append((layer, adapter_name))
    for name in existing:
        layer = model.get_submodule(name)
        if adapter_name not in layer.adapter_names:
            layer.add_adapter(adapter_name, r=config.rank_for(name), lora_alpha=config.alpha_for(name),
                              lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                              init_lora_weights=config.init_lora_weights)
            new_layers.append((layer, adapter_name))
    for name in to_save:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            _set_submodule(model, name, ModulesToSaveWrapper(module))
    config = copy.deepcopy(config)
    # PEFT's rule: the layout of the weights decides, the flag follows (it is what adapter_config.json records).
    config.fan_in_fan_out = (any(layer.fan_in_fan_out for layer, _ in new_layers) if new_layers
                             else config.fan_in_fan_out)
    _record(model, adapter_name, config)
    _freeze_all_but_adapters(model, new_layers)
    run_after_inject(model)
    return model


# -- removing adapters ----------------------------------------------------------------------------------

def _base_linear(layer: LoraLayer) -> nn.Module:
    """The base module (nn.Linear, Conv1D, bnb Linear4bit) owning the layer's (unmerged) weight and bias."""
    if layer.merged:
        layer.unmerge()
    linear = layer.to_base()
    linear.train(layer.training)
    return linear


def _strip(model: nn.Module, merge: bool) -> nn.Module:
    for name, layer in lora_layers(model).items():
        if merge:
            linear = layer.to_linear()
            linear.train(layer.training)
        else:
            linear = _base_linear(layer)
        _set_submodule(model, name, linear)
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]:
        _set_submodule(model, name, m.trained_module if merge else m.original_module)
    for attr in (CONFIGS_ATTR, ADAPTERS_ATTR, ACTIVE_ATTR):
        if hasattr(model, attr):
            object.__delattr__(model, attr)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter into its base weight (W += s·B·A; DoRA: W = g·(W + s·B·A)) and replace each LoRA layer by a plain
    nn.Linear; modules_to_save keep their trained copy. In place; returns `model`. A disabled adapter is not
    merged. With several adapters, as PEFT: the active adapter (set_adapter) is merged, the others are dropped."""
    if any(layer._batch is not None for layer in lora_layers(model).values()):
        raise RuntimeError("merge_and_unload() inside batch_adapters(): which adapter to merge is ambiguous; "
                           "leave the block and set_adapter(model, name) first")
    return _strip(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter without merging: LoRA layers become their base nn.Linear again (unmerged if they were
    merged) and modules_to_save go back to their original. In place; returns `model`."""
    return _strip(model, merge=False)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block the model computes its base output: every LoRA layer is bypassed and modules_to_save
    use their original module."""
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    states = [w.adapter_enabled for w in wrappers]
    with contextlib.ExitStack() as stack:
        for layer in lora_layers(model).values():
            stack.enter_context(layer.disable_adapter())
        for w in wrappers:
            w.adapter_enabled = False
        try:
            yield model
        finally:
            for w, s in zip(wrappers, states):
                w.adapter_enabled = s
