"""Reading adapters: read_adapter checks a directory on its own, load_adapter validates it against the model
(peft_type, every key, every shape, finite values) before it changes anything."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..config import LoraConfig
from ..inject import (ModulesToSaveWrapper, find_modules_to_save, find_param_targets, find_targets, inject_lora,
                      model_adapters)
from ..layers import DEFAULT_ADAPTER, FusedLoraExperts, LoraLayer, check_adapter_name, experts_layout, linear_features
from .keys import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, PathLike, _adapter_layers, _bias_keys, _saved_module_keys,
                   layer_key)

def read_adapter(path: PathLike, *, allow_nonfinite: bool = False) -> Tuple[LoraConfig, Dict[str, torch.Tensor]]:
    """Read and check a PEFT LoRA adapter directory; errors name the file (and key) at fault.

    A tensor holding NaN or inf is an error (a run that diverged and saved anyway; loaded, it turns every
    output it touches into NaN): allow_nonfinite=True reads it anyway, to inspect where it went wrong.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_adapter: {path!r} is not a directory")
    config_file = os.path.join(path, CONFIG_NAME)
    weights_file = os.path.join(path, WEIGHTS_NAME)
    for f in (config_file, weights_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"load_adapter: {f} is missing")
    try:
        with open(config_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{config_file}: JSON nested too deeply to be an adapter config") from None
    config = LoraConfig.from_peft_dict(raw, source=config_file)
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(weights_file, framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
        raise ValueError(f"{weights_file}: cannot read it as a safetensors file ({type(err).__name__}: {err})") from None
    if not allow_nonfinite:
        _check_finite(tensors, weights_file)
    return config, tensors


def _check_finite(tensors: Dict[str, torch.Tensor], weights_file: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).count_nonzero())
            if bad:
                raise ValueError(f"{weights_file}: key {key!r} holds {bad} NaN/inf value(s) of {t.numel()}; "
                                 "the adapter would make the model's outputs NaN (was it saved after training "
                                 "diverged?). Pass allow_nonfinite=True to load it anyway")


def _expected_shapes(model: nn.Module, config: LoraConfig,
                     adapter_name: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{file key: (shape the model needs, what it is for)} for loading `config` into `model` as `adapter_name`."""
    new, existing = find_targets(model, config)
    expected = {}
    for name in new + existing:
        module = model.get_submodule(name)
        held = isinstance(module, LoraLayer) and adapter_name in module.adapter_names
        r = module.adapter_spec(adapter_name).r if held else config.rank_for(name)
        in_features, out_features = linear_features(module)
        expected[f"{PREFIX}{name}.lora_A.weight"] = ((r, in_features), name)
        expected[f"{PREFIX}{name}.lora_B.weight"] = ((out_features, r), name)
        if config.use_dora:
            expected[f"{PREFIX}{name}.lora_magnitude_vector"] = ((out_features,), name)
    for name, params in find_param_targets(model, config).items():
        module = model.get_submodule(name)
        held = isinstance(module, FusedLoraExperts) and adapter_name in module.adapter_names
        if not isinstance(module, FusedLoraExperts):
            experts_layout(module, name)  # a module the experts layer cannot run: its ValueError, before any shape
        r = module.adapter_spec(adapter_name).r if held else config.rank_for(f"{name}.{params[0]}")
        params = module.params if isinstance(module, FusedLoraExperts) else params
        for i, p in enumerate(params):
            # PEFT nests one ParamWrapper per parameter, the first (registration order) innermost.
            nest = "base_layer." * (len(params) - 1 - i)
            num_experts, d1, d2 = getattr(module, p).shape
            transposed = module.transposed if isinstance(module, FusedLoraExperts) else module.is_transposed
            fin, fout = (d1, d2) if transposed else (d2, d1)
            expected[f"{PREFIX}{name}.{nest}lora_A.weight"] = ((r * num_experts, fin), f"{name}.{p}")
            expected[f"{PREFIX}{name}.{nest}lora_B.weight"] = ((fout, r * num_experts), f"{name}.{p}")
    for key, (pname, p) in _bias_keys(model, config.bias, set(new + existing)).items():
        expected[key] = (tuple(p.shape), pname)
    for key, v in _saved_module_keys(model, find_modules_to_save(model, config)).items():
        expected[key] = (tuple(v.shape), key[len(PREFIX):])
    return expected


def _check_existing(model: nn.Module, config: LoraConfig, source: str, adapter_name: str) -> None:
    """An adapter already in the model can take the file's weights only if it computes the same function."""
    _, existing = find_targets(model, config)
    for name in existing:
        layer = model.get_submodule(name)
        if getattr(layer, "use_dora", False) != config.use_dora:
            raise ValueError(f"{source}: use_dora={config.use_dora} but {name!r} already holds "
                             f"{'DoRA' if not config.use_dora else 'plain LoRA'} adapters; unload() the model first")
        if adapter_name not in layer.adapter_names:
            continue  # the layer gets the file's adapter beside its own
        spec = layer.adapter_spec(adapter_name)
        want = (config.alpha_for(name), config.lora_dropout, config.use_rslora)
        have = (spec.lora_alpha, spec.lora_dropout, spec.use_rslora)
        if want != have:
            raise ValueError(f"{source}: {name!r} already has a LoRA adapter with (lora_alpha, lora_dropout, "
                             f"use_rslora)={have}, the file says {want}; unload() the model first")


def _loaded_adapter(model: nn.Module, adapter_name: Optional[str]) -> str:
    """The adapter a load fills: the one named (new or existing), else the model's only one, else "default"."""
    if adapter_name is not None:
        return check_adapter_name(adapter_name)
    names = model_adapters(model)
    if len(names) > 1:
        raise ValueError(f"the model has several adapters {names}; pass adapter_name= to say which one to load "
                         "(a new name adds an adapter)")
    return names[0] if names else DEFAULT_ADAPTER


def load_adapter(model: nn.Module, path: PathLike, is_trainable: bool = True,
                 adapter_name: Optional[str] = None, *, allow_nonfinite: bool = False) -> nn.Module:
    """Inject the adapter described by `path` (a PEFT or save_adapter directory) into `model` and load its weights.

    adapter_name: a new name adds a named adapter beside the model's others (PEFT's load_adapter); an existing
    one takes the file's weights. Left out: the model's only adapter, or "default" on a model without one.
    Everything is validated first (peft_type, every key present and expected, every shape), so on any error
    the model is exactly as it was. is_trainable=False freezes the loaded adapter (PEFT's inference mode).
    A NaN or inf in the file is an error unless allow_nonfinite=True (see read_adapter). Returns `model`.
    """
    adapter_name = _loaded_adapter(model, adapter_name)
    config, tensors = read_adapter(path, allow_nonfinite=allow_nonfinite)
    weights_file = os.path.join(os.fspath(path), WEIGHTS_NAME)
    try:
        expected = _expected_shapes(model, config, adapter_name)
    except ValueError as err:
        raise ValueError(f"{os.path.join(os.fspath(path), CONFIG_NAME)}: {err}") from None
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{weights_file}: missing {len(missing)} key(s) the config requires, e.g. {missing[:3]}")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise ValueError(f"{weights_file}: {len(unexpected)} key(s) match nothing in the model, e.g. {unexpected[:3]}")
    for key, (shape, what) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{weights_file}: key {key!r} has shape {tuple(t.shape)} but {what!r} in the model "
                             f"needs {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{weights_file}: key {key!r} has dtype {t.dtype}; a floating-point tensor is needed")
    _check_existing(model, config, os.path.join(os.fspath(path), CONFIG_NAME), adapter_name)

    # Validated: from here on nothing depends on the file's contents being right.
    inject_lora(model, config, adapter_name=adapter_name)
    params = dict(model.named_parameters())
    layers = _adapter_layers(model, adapter_name)
    with torch.no_grad():
        for key, t in tensors.items():
            target = _model_tensor(model, key, layers, params, adapter_name)
            target.copy_(t.to(device=target.device, dtype=target.dtype))
    if not is_trainable:
        for layer in layers.values():
            layer.set_adapter_trainable(adapter_name, False)
    return model


def _model_tensor(model, key: str, layers, params, adapter_name: str) -> torch.Tensor:
    """The model tensor a file key loads into."""
    name = key[len(PREFIX):]
    hit = layer_key(name, layers)
    if hit is not None:
        return layers[hit[0]].peft_tensors(adapter_name)[hit[1]]
    if name.endswith(".base_layer.bias") and name[: -len(".base_layer.bias")] in layers:
        return layers[name[: -len(".base_layer.bias")]].bias
    if name in params:
        return params[name]
    # modules_to_save: the file names the wrapped module's own tensors; they live in its trained copy now.
    for wname, m in model.named_modules():
        if isinstance(m, ModulesToSaveWrapper) and name.startswith(wname + "."):
            return m.trained_module.state_dict(keep_vars=True)[name[len(wname) + 1:]]
    raise KeyError(key)  # unreachable after validation
