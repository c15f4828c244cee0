"""save_adapter / load_adapter in PEFT's on-disk format.

A directory holds adapter_config.json (PEFT's LoraConfig fields, peft_type "LORA") and adapter_model.safetensors
with keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (plus `.base_layer.bias` for trained
biases of adapted layers, `<path>.bias` for other trained biases and `<path>.<param>` for modules_to_save), in the
tensors' own dtype. Either library reads what the other writes.

A model with several named adapters saves and loads one adapter per directory (adapter_name=), under the same
keys as a single-adapter save, which is what PEFT's save_pretrained writes for each of its adapters.
save_adapters writes all of them in PeftModel.save_pretrained's layout: "default" in the directory itself, every
other adapter in a subfolder named after it.

Saving replaces config and weights together (a crash leaves the old adapter or the new one, never a mix; see
save_adapter). Loading validates the whole directory against the model (peft_type, every key, every shape,
finite values) before it changes anything.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import Counter
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .config import LoraConfig
from .inject import (ModulesToSaveWrapper, applied_configs, check_adapter, find_modules_to_save, find_targets,
                     inject_lora, lora_layers, model_adapters)
from .layer import DEFAULT_ADAPTER, FusedLoraLinear, check_adapter_name, linear_features

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


def _adapter_layers(model: nn.Module, adapter_name: str) -> Dict[str, FusedLoraLinear]:
    return {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.adapter_names}


def adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's file keys (the tensors themselves, not copies)."""
    adapter_name = _saved_adapter(model, adapter_name)
    layers = _adapter_layers(model, adapter_name)
    sd: Dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        sd[f"{PREFIX}{name}.lora_A.weight"], sd[f"{PREFIX}{name}.lora_B.weight"] = layer.adapter_params(adapter_name)
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
    fan = {layer.fan_in_fan_out for layer in layers.values()}
    if len(fan) > 1:
        raise ValueError(f"the LoRA layers have different fan_in_fan_out values {sorted(fan)}; PEFT's "
                         "adapter_config.json holds one fan_in_fan_out per adapter, so it cannot be saved as one")
    first = next(iter(specs.values()))
    r0 = configs[0].r if configs else Counter(s.r for s in specs.values()).most_common(1)[0][0]
    a0 = configs[0].lora_alpha if configs else Counter(s.lora_alpha for s in specs.values()).most_common(1)[0][0]
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    return LoraConfig(
        r=r0, lora_alpha=a0, lora_dropout=first.lora_dropout, use_rslora=first.use_rslora,
        target_modules=sorted(layers), bias=_bias_mode(configs),
        # re.escape: PEFT reads pattern keys as regexes; an escaped full name matches that module only.
        rank_pattern={re.escape(n): s.r for n, s in specs.items() if s.r != r0},
        alpha_pattern={re.escape(n): s.lora_alpha for n, s in specs.items() if s.lora_alpha != a0},
        modules_to_save=wrapped or None, fan_in_fan_out=fan.pop(),
    )


def own_name(model: nn.Module, name: str, adapter_name: str, layers: Dict[str, FusedLoraLinear],
             wrappers: List[str], own) -> Optional[str]:
    """The model's state-dict name of the tensor an adapter file stores as `base_model.model.<name>` for adapter
    `adapter_name`, or None. layers: lora_layers(model); wrappers: the ModulesToSaveWrapper paths; own: the
    model's state-dict names."""
    for suffix, i in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
        path = name[: -len(suffix)]
        if name.endswith(suffix) and path in layers:
            layer = layers[path]
            if adapter_name not in layer.adapter_names:
                return None
            # The first adapter of a layer is lora_A / lora_B, further ones lora_As.<name> / lora_Bs.<name>.
            param = layer.adapter_params(adapter_name)[i]
            return f"{path}.{next(n for n, p in layer.named_parameters() if p is param)}"
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


# -- save -------------------------------------------------------------------------------------------------

STAGING = ".adapter-new"     # inside an existing adapter directory: the next adapter, complete, before the swap
PREVIOUS = ".adapter-old"    # the adapter being replaced, kept (hard links) until the new one is in place


def _write_files(directory: str, config_dict: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Write both files into `directory` (a fresh staging folder), flushed to disk."""
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _stage(parent: str, name: str, config_dict: dict, tensors: Dict[str, torch.Tensor]) -> str:
    """A new folder parent/name holding the complete adapter. os.mkdir applies the umask (mkdtemp would make
    it 0700, and a renamed-in adapter folder would keep that)."""
    staging = os.path.join(parent, name)
    shutil.rmtree(staging, ignore_errors=True)  # a crashed save's leftover
    os.mkdir(staging)
    try:
        _write_files(staging, config_dict, tensors)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def _replace_in(path: str, config_dict: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Replace the adapter files in the existing directory `path` (which may hold other things: a run's
    checkpoints and metrics) so that adapter_config.json never sits beside the other adapter's weights.

    The config marks a complete adapter: it is removed before the weights change and put back after. A crash
    at any point leaves at `path` the old adapter, the new one, or weights without a config (load_adapter
    then says the config is missing); from the moment the old config is gone until the end, the complete
    old adapter is in path/.adapter-old.
    """
    config, weights = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    staging = _stage(path, STAGING, config_dict, tensors)
    previous = os.path.join(path, PREVIOUS)
    if os.path.isfile(config) and os.path.isfile(weights):
        # A complete old adapter: keep it aside. (Without one, a crashed earlier save may have left the
        # only complete old adapter in .adapter-old: leave that alone.)
        shutil.rmtree(previous, ignore_errors=True)
        os.mkdir(previous)
        _link_or_copy(weights, os.path.join(previous, WEIGHTS_NAME))
        _link_or_copy(config, os.path.join(previous, CONFIG_NAME))
        os.unlink(config)
    elif os.path.isfile(config):
        os.unlink(config)  # a config without weights describes nothing
    os.replace(os.path.join(staging, WEIGHTS_NAME), weights)
    os.replace(os.path.join(staging, CONFIG_NAME), config)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(previous, ignore_errors=True)


def save_adapter(model: nn.Module, path: PathLike, *, adapter_name: Optional[str] = None,
                 base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None) -> None:
    """Write one adapter of the model to directory `path` in PEFT's format (PeftModel.from_pretrained reads it).

    adapter_name: which adapter; may be left out when the model has one. The keys are those of a
    single-adapter save (`base_model.model.<module>.lora_A.weight`), whatever the adapter's name.

    base_model_name_or_path and task_type (e.g. "CAUSAL_LM") go into adapter_config.json as PEFT writes them;
    the base path defaults to a transformers model's own `name_or_path`, when it has one.
    Config and weights are replaced together, never one without the other: a new directory is built as a
    sibling and renamed into place; in an existing directory see _replace_in. Folders get the umask's mode.
    """
    _save_one(model, path, adapter_name, base_model_name_or_path, task_type, None)


def _save_one(model: nn.Module, path: PathLike, adapter_name: Optional[str], base_model_name_or_path: Optional[str],
              task_type: Optional[str], state_dict: Optional[Dict[str, torch.Tensor]]) -> None:
    path = os.fspath(path)
    if not path:  # "" would put the staging folder in the working directory's parent
        raise ValueError("save_adapter: path is empty; give the folder to write the adapter to")
    config_dict = adapter_config(model, adapter_name).to_peft_dict()
    config_dict["base_model_name_or_path"] = base_model_name_or_path or getattr(model, "name_or_path", None) or None
    config_dict["task_type"] = task_type
    tensors = adapter_tensors(model, adapter_name, state_dict)
    if os.path.isdir(path):
        _replace_in(path, config_dict, tensors)
        return
    if os.path.exists(path):
        raise ValueError(f"save_adapter: {path!r} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = _stage(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp", config_dict, tensors)
    try:
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def adapter_folder(directory: PathLike, adapter_name: str) -> str:
    """Where PeftModel.save_pretrained puts an adapter: "default" in `directory` itself, any other adapter in
    the subfolder `directory/<adapter_name>` (also when the model has no "default" adapter, or only one adapter)."""
    directory = os.fspath(directory)
    return directory if adapter_name == DEFAULT_ADAPTER else os.path.join(directory, check_adapter_name(adapter_name))


def save_adapters(model: nn.Module, directory: PathLike, *, base_model_name_or_path: Optional[str] = None,
                  task_type: Optional[str] = None,
                  state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, str]:
    """Write every adapter of the model in the layout of PEFT's save_pretrained (adapter_folder): the adapter
    "default" at `directory`, each other one in `directory/<name>`, each folder in save_adapter's format and
    replaced as save_adapter replaces one. PeftModel.from_pretrained(base, directory) reads "default";
    peft_model.load_adapter(directory/<name>, adapter_name=<name>) each other one. state_dict: take the tensors
    from it, by the model's own names (see adapter_tensors). Returns {adapter name: folder}."""
    names = model_adapters(model)
    if not names:
        raise ValueError(f"the model ({type(model).__name__}) has no LoRA layer to save; call inject_lora first")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    folders = {name: adapter_folder(directory, name) for name in names}
    for name, folder in folders.items():
        _save_one(model, folder, name, base_model_name_or_path, task_type, state_dict)
    return folders


# -- load -------------------------------------------------------------------------------------------------

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
        held = isinstance(module, FusedLoraLinear) and adapter_name in module.adapter_names
        r = module.adapter_spec(adapter_name).r if held else config.rank_for(name)
        in_features, out_features = linear_features(module)
        expected[f"{PREFIX}{name}.lora_A.weight"] = ((r, in_features), name)
        expected[f"{PREFIX}{name}.lora_B.weight"] = ((out_features, r), name)
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
            for p in layer.adapter_params(adapter_name):
                p.requires_grad_(False)
    return model


def _model_tensor(model, key: str, layers, params, adapter_name: str) -> torch.Tensor:
    """The model tensor a file key loads into."""
    name = key[len(PREFIX):]
    for suffix, i in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
        if name.endswith(suffix) and name[: -len(suffix)] in layers:
            return layers[name[: -len(suffix)]].adapter_params(adapter_name)[i]
    if name.endswith(".base_layer.bias") and name[: -len(".base_layer.bias")] in layers:
        return layers[name[: -len(".base_layer.bias")]].bias
    if name in params:
        return params[name]
    # modules_to_save: the file names the wrapped module's own tensors; they live in its trained copy now.
    for wname, m in model.named_modules():
        if isinstance(m, ModulesToSaveWrapper) and name.startswith(wname + "."):
            return m.trained_module.state_dict(keep_vars=True)[name[len(wname) + 1:]]
    raise KeyError(key)  # unreachable after validation
