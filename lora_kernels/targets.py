"""PEFT's target matching (its check_target_module_exists rules): which modules a LoraConfig adapts, which 3-D
expert parameters (target_parameters), and which modules_to_save it copies, in a model. Nothing here changes the
model; inject.py does the surgery."""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from .config import ALL_LINEAR, LoraConfig
from .layers import FusedLoraExperts, LoraLayer, can_adapt, param_targets
from .patterns import fullmatch
from .patterns import match as pattern_match


class ModulesToSaveWrapper(nn.Module):
    """A module listed in modules_to_save: a frozen original plus a trainable copy, as PEFT keeps them.

    The copy (not the original) is trained, saved and used in forward; disable_adapter / unload go back to the
    original, merge_and_unload keeps the copy.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.trained_module.requires_grad_(True)
        self.adapter_enabled = True

    def forward(self, *args, **kwargs):
        module = self.trained_module if self.adapter_enabled else self.original_module
        return module(*args, **kwargs)

    def __getattr__(self, name):
        # Code that reads attributes of the wrapped module (e.g. lm_head.weight for tying checks) keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("trained_module"), name)


# -- matching (PEFT's check_target_module_exists) -------------------------------------------------------

def _list_match(names: Sequence[str], key: str) -> bool:
    return key in names or any(key.endswith("." + n) for n in names)


def _excluded(config: LoraConfig, key: str) -> bool:
    ex = config.exclude_modules
    if ex is not None:
        if isinstance(ex, str):
            if fullmatch(ex, key):
                return True
        elif _list_match(ex, key):
            return True
    # PEFT never puts an adapter on (or inside) a module it also trains in full.
    return bool(config.modules_to_save) and any(pattern_match(rf"(^|.*\.){m}($|\..*)", key)
                                                 for m in config.modules_to_save)


def _output_head_name(model: nn.Module) -> Optional[str]:
    """The output head "all-linear" skips: what a transformers model reports as its output embeddings."""
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        head = get()
    except (AttributeError, NotImplementedError):
        return None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _wrapped_names(model: nn.Module) -> List[str]:
    """Names under which no adapter may go: the insides of modules_to_save wrappers."""
    return [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def _is_target(config: LoraConfig, key: str, all_linear: Optional[set]) -> bool:
    if _excluded(config, key):
        return False
    tm = config.target_modules
    if tm == ALL_LINEAR:
        return key in all_linear
    if isinstance(tm, str):
        return fullmatch(tm, key)  # linear time: a regex from adapter_config.json cannot hang the load
    return _list_match(tm, key)


def _is_linear(module: nn.Module) -> bool:
    """What can take an adapter: a base module of the layer-type table (layers/registry.py): nn.Linear and its
    bitsandbytes subclasses, and transformers' Conv1D (a linear layer with its weight transposed, which PEFT's
    all-linear also matches)."""
    return can_adapt(module)


def _linear_candidates(model: nn.Module, limit: int = 8) -> str:
    linears = [n for n, m in model.named_modules() if _is_linear(m)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if not leaves:
        return "the model has no nn.Linear or Conv1D module"
    more = f" (+{len(leaves) - limit} more)" if len(leaves) > limit else ""
    return f"nn.Linear/Conv1D names in the model include {leaves[:limit]}{more}, e.g. {linears[:2]}"


def _default_targets(model: nn.Module) -> List[str]:
    """PEFT's default target_modules for a transformers model type (used when target_modules is None)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
    except ImportError:
        defaults = {}
    if model_type not in defaults:
        raise ValueError(f"target_modules=None: no default targets known for {type(model).__name__} "
                         f"(model_type={model_type!r}{'' if defaults else ', peft not installed'}); "
                         f"set target_modules; {_linear_candidates(model)}")
    return list(defaults[model_type])


def find_targets(model: nn.Module, config: LoraConfig) -> Tuple[List[str], List[str]]:
    """(new, existing): qualified names of the nn.Linear modules `config` targets, and of the FusedLoraLinear
    layers it matches that already exist. Raises ValueError when it matches nothing or a non-Linear module.
    With target_parameters, target_modules may be None (no module targets) or match nothing."""
    if config.target_modules is None and config.target_parameters:
        return [], []
    if config.target_modules is None:
        config = copy.copy(config)
        config.target_modules = _default_targets(model)
    wrapped = _wrapped_names(model)
    all_linear = None
    if config.target_modules == ALL_LINEAR:
        head = _output_head_name(model)
        all_linear = {n for n, m in model.named_modules()
                      if (_is_linear(m) or isinstance(m, LoraLayer)) and n != head}
    new, existing = [], []
    for name, module in model.named_modules():
        if not name or any(name == w or name.startswith(w + ".") for w in wrapped):
            continue
        if not _is_target(config, name, all_linear):
            continue
        if isinstance(module, LoraLayer):
            existing.append(name)
        elif _is_linear(module):
            new.append(name)
        else:
            raise ValueError(f"target_modules={config.target_modules!r} matches {name!r}, a "
                             f"{type(module).__name__}; only nn.Linear and transformers Conv1D modules can take "
                             "a LoRA adapter")
    if not new and not existing and not config.target_parameters:
        raise ValueError(f"target_modules={config.target_modules!r}"
                         + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
                         + f" matched no module of {type(model).__name__}; {_linear_candidates(model)}")
    return new, existing


def find_param_targets(model: nn.Module, config: LoraConfig) -> Dict[str, List[str]]:
    """{experts module name: its parameters config.target_parameters names} (PEFT's matching), for modules that
    are not adapted yet and for FusedLoraExperts layers. ValueError when target_parameters matches nothing."""
    if not config.target_parameters:
        return {}
    out = {}
    for name, module in model.named_modules():
        params = param_targets(module, name, config.target_parameters)
        if isinstance(module, FusedLoraExperts):
            params = [p for p in module.params if any(f"{name}.{p}" == t or f"{name}.{p}".endswith("." + t)
                                                      for t in config.target_parameters)]
        if params:
            out[name] = params
    if not out:
        raise ValueError(f"target_parameters={config.target_parameters!r} matched no parameter of "
                         f"{type(model).__name__}")
    return out


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> List[str]:
    """Names of the modules config.modules_to_save designates (PEFT: the qualified name ends with the entry)."""
    if not config.modules_to_save:
        return []
    wrapped = _wrapped_names(model)
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, ModulesToSaveWrapper):
            if name and any(name.endswith(m) for m in config.modules_to_save):
                names.append(name)  # already wrapped by an earlier call: keep it as it is
            continue
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if any(name.endswith(m) for m in config.modules_to_save):
            names.append(name)
    if not names:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module of {type(model).__name__}")
    # A match inside another match (e.g. "lm_head" and "lm_head.x") would be wrapped twice; keep the outer one.
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
