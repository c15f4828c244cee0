"""LoraConfig: what to inject and how, validated on construction, convertible to/from PEFT's adapter_config.json.

The field names and meanings are PEFT's (peft.LoraConfig), so an adapter_config.json written by either library
reads in the other. Only the LoRA flavour the fused kernels compute is representable: settings PEFT supports but
we do not (lora_bias, layers_to_transform, ...) are rejected by `from_peft_dict` rather than
silently ignored, because ignoring them would load a different model than the one that was trained.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .patterns import check_pattern
from .patterns import match as pattern_match

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")

# PEFT adapter_config.json keys that describe features we do not implement, with the value meaning "off".
# A file with any of them set to something else is refused (see from_peft_dict).
_PEFT_OFF_VALUES: Dict[str, tuple] = {
    "lora_bias": (False, None),
    "layers_to_transform": (None, [],),
    "layers_pattern": (None, [], ""),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, {}, []),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "alora_invocation_tokens": (None,),
}


def _check_name_list(name: str, value, allow_all_linear: bool) -> Optional[Union[str, List[str]]]:
    """Normalise target_modules / exclude_modules: None, a regex string, or a list of non-empty strings."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be an empty string")
        if value.lower() == ALL_LINEAR:
            if not allow_all_linear:
                raise ValueError(f"{name}={value!r}: 'all-linear' is only meaningful for target_modules")
            return ALL_LINEAR
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name}={value!r} is not a valid regular expression: {err}") from None
        check_pattern(value, name)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not all(isinstance(v, str) and v for v in items):
            raise ValueError(f"{name} must contain only non-empty strings, got {value!r}")
        return items
    raise ValueError(f"{name} must be None, a regex string or a list of module names, got {type(value).__name__}")


def _check_pattern(name: str, value, number_check) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict mapping a module-name pattern to a value, got {type(value).__name__}")
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} keys must be non-empty strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{name} key {key!r} is not a valid regular expression: {err}") from None
        check_pattern(rf"(.*\.)?({key})$", f"{name} key {key!r} as matched")
        number_check(f"{name}[{key!r}]", v)
    return dict(value)


# The rules on LoRA hyper-parameters, here once for LoraConfig and FusedLoraLinear (which takes them as arguments).
def check_rank(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def check_alpha(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")


def check_dropout(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")


def is_init_choice(v) -> bool:
    """PEFT's init_lora_weights values that the layer implements (`is`: 1 and 0 are not True and False here)."""
    return v is True or v is False or v == "gaussian"


def check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights) -> None:
    check_rank("r", r)
    check_alpha("lora_alpha", lora_alpha)
    check_dropout("lora_dropout", lora_dropout)
    if not is_init_choice(init_lora_weights):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")


@dataclass
class LoraConfig:
    """Which nn.Linear modules get a LoRA adapter and with what hyper-parameters (PEFT's semantics).

    target_modules: None (PEFT's default targets for the model type, e.g. q_proj and v_proj for Llama), a
    list (a module matches if its qualified name equals an entry or ends with "." + entry),
    regex string (must fullmatch the qualified name), or "all-linear" (every nn.Linear but the output head).
    rank_pattern / alpha_pattern: {pattern: value}; a module takes the value of the first pattern p for which
    re.match(rf"(.*\\.)?({p})$", name) succeeds (PEFT's get_pattern_key), else r / lora_alpha.
    bias: "none" | "all" (every bias in the model trains) | "lora_only" (biases of the adapted layers train).
    modules_to_save: names (suffix match) of extra modules trained in full, kept as a trainable copy beside the
    frozen original, as PEFT does.
    target_parameters: PEFT's, for MoE experts: parameter names ("mlp.experts.gate_up_proj"; a parameter matches
    if its qualified name equals an entry or ends with "." + entry); the experts modules holding them get a LoRA
    per expert (layers/experts.py). Usable with or without target_modules.
    fan_in_fan_out: whether the targets store their weight (in, out), as transformers' Conv1D (GPT-2) does.
    As in PEFT, the targets' type decides: inject_lora records True when it wraps Conv1D layers.
    use_dora: DoRA (weight-decomposed LoRA, PEFT's use_dora): each target also learns a magnitude per output
    feature (layers/dora.py); nn.Linear, Conv1D and bitsandbytes Linear4bit targets (not MoE experts).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[str, List[str]]] = None
    exclude_modules: Optional[Union[str, List[str]]] = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    modules_to_save: Optional[List[str]] = None
    fan_in_fan_out: bool = False
    target_parameters: Optional[List[str]] = None
    use_dora: bool = False

    def __post_init__(self):
        check_lora_args(self.r, self.lora_alpha, self.lora_dropout, self.init_lora_weights)
        self.target_modules = _check_name_list("target_modules", self.target_modules, allow_all_linear=True)
        # None is allowed, as in PEFT: inject_lora then takes PEFT's default targets for the model's type.
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must name at least one module (a list, a regex or 'all-linear'), "
                             "got an empty list")
        self.exclude_modules = _check_name_list("exclude_modules", self.exclude_modules, allow_all_linear=False)
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"fan_in_fan_out must be a bool, got {self.fan_in_fan_out!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be a bool, got {self.use_dora!r}")
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, check_rank)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, check_alpha)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(
                    isinstance(m, str) and m for m in self.modules_to_save):
                raise ValueError(f"modules_to_save must be None or a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save) or None
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(
                    isinstance(p, str) and p for p in self.target_parameters):
                raise ValueError("target_parameters must be None or a list of parameter names (e.g. "
                                 f"'mlp.experts.gate_up_proj'), got {self.target_parameters!r}")
            self.target_parameters = list(self.target_parameters) or None
        if self.use_dora and self.target_parameters:
            raise ValueError(f"use_dora=True with target_parameters={self.target_parameters!r}: DoRA on MoE experts "
                             "is not supported (PEFT's ParamWrapper refuses it too)")

    # -- per-module values (PEFT's get_pattern_key) ------------------------------------------------
    @staticmethod
    def _pattern_value(patterns: Dict[str, Any], name: str, default):
        for key, value in patterns.items():
            if pattern_match(rf"(.*\.)?({key})$", name):  # bounded time: the key may come from a file
                return value
        return default

    def rank_for(self, name: str) -> int:
        return self._pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return self._pattern_value(self.alpha_pattern, name, self.lora_alpha)

    # -- PEFT adapter_config.json -------------------------------------------------------------------
    def to_peft_dict(self) -> Dict[str, Any]:
        """The dict PEFT's LoraConfig.from_pretrained / PeftModel.from_pretrained read from adapter_config.json."""
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": copy.copy(self.target_modules),
            "exclude_modules": copy.copy(self.exclude_modules),
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "init_lora_weights": self.init_lora_weights,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": copy.copy(self.modules_to_save),
            "fan_in_fan_out": self.fan_in_fan_out,
            "target_parameters": copy.copy(self.target_parameters),
            "use_dora": self.use_dora,
            "lora_bias": False,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def from_peft_dict(cls, d: Dict[str, Any], source: str = "adapter config") -> "LoraConfig":
        """Build from a PEFT adapter_config.json dict; `source` (a file name) is named in every error."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        peft_type = d.get("peft_type")
        if peft_type != "LORA":
            raise ValueError(f"{source}: peft_type is {peft_type!r}; only 'LORA' adapters can be loaded")
        for key, off_values in _PEFT_OFF_VALUES.items():
            if key in d and d[key] not in off_values:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by lora_kernels "
                                 f"(only plain LoRA on nn.Linear is)")
        init = d.get("init_lora_weights", True)
        if not is_init_choice(init):
            # PEFT has data-dependent inits (pissa, olora, loftq, ...); the saved weights are what count once
            # trained, so loading them is fine: the init only matters before the copy.
            init = True
        kwargs = {}
        for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
                    "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out", "use_dora",
                    "target_parameters"):
            if key in d and d[key] is not None:
                kwargs[key] = d[key]
        try:
            return cls(init_lora_weights=init, **kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
