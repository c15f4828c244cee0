"""FusedLoraExperts: LoRA on the 3-D expert weights of a transformers MoE experts module (PEFT's target_parameters).

The layer takes the experts module's place in the model and holds its very Parameters under their own names
(`gate_up_proj`, `down_proj`, gpt-oss's `*_bias`), so base checkpoints load unchanged; the original module is
kept outside the module tree for its gate (`_apply_gate`: SwiGLU, gpt-oss's clamped GLU) and as the base
forward when the adapter is off. Routing stays the parent block's: the layer is called as the experts module
is, (hidden_states, top_k_index, top_k_weights), so router logits and their gradients are untouched.

Each targeted parameter gets PEFT's adapter tensors: `<param>_lora_A` (r·E, in) and `<param>_lora_B`
(out, r·E). In PEFT's files a module with several targeted parameters is a nest of ParamWrappers, the first
parameter (in the module's registration order) innermost: its keys carry one `base_layer.` per wrapper
around it (`experts.base_layer.lora_A.weight` for gate_up_proj, `experts.lora_A.weight` for down_proj).

Layouts (transformers' use_experts_implementation flags): gated experts with gate_up_proj / down_proj, stored
(E, out, in) (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE) or transposed (E, in, out) with biases (gpt-oss). Others
raise a ValueError naming the module and its layout.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..functional import ExpertRouting, fused_grouped_lora_linear
from .base import LoraLayer, init_lora_pair

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def experts_layout(module: nn.Module, name: str = "") -> str:
    """"(E, out, in)" or "(E, in, out) + bias" for an experts module the layer runs; else ValueError saying why."""
    flags = {f: getattr(module, f, None) for f in ("has_gate", "is_transposed", "has_bias", "has_post_expert_norm")}
    where = f"{name!r} ({type(module).__name__})"
    if flags["has_gate"] is None:
        raise ValueError(f"target_parameters: {where} is not a transformers experts module (no "
                         "use_experts_implementation layout flags); only MoE experts modules can take "
                         "target_parameters adapters")
    layout = (f"has_gate={flags['has_gate']}, is_transposed={flags['is_transposed']}, has_bias={flags['has_bias']}, "
              f"has_post_expert_norm={flags['has_post_expert_norm']}")
    if not flags["has_gate"] or flags["has_post_expert_norm"]:
        raise ValueError(f"target_parameters: {where} has an experts layout the fused experts layer does not run "
                         f"({layout}); supported: gated experts (gate_up_proj, down_proj), without a post-expert "
                         "norm, stored (E, out, in) or transposed (E, in, out) with or without biases")
    for p in EXPERT_PARAMS:
        w = getattr(module, p, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"target_parameters: {where} has no 3-D {p} ({layout})")
    return "(E, in, out)" if flags["is_transposed"] else "(E, out, in)"


def _param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, adapters, dropout_p: float = 0.0, training: bool = True):
    """What a transformers experts module of a supported layout computes, with LoRA on the projections in
    `adapters` ({"gate_up_proj" / "down_proj": (lora_A, lora_B, scaling)}, PEFT's layout); the others run
    without. The token–expert pairs are sorted once, for both projections."""
    num_experts = experts.gate_up_proj.shape[0]
    routing = ExpertRouting.from_top_k(top_k_index, num_experts)
    x = hidden_states[routing.token]
    h = _project(experts, "gate_up_proj", x, routing, adapters, dropout_p, training)
    h = experts._apply_gate(h)  # the model's own gate (SwiGLU; gpt-oss: interleaved, clamped)
    out = _project(experts, "down_proj", h, routing, adapters, dropout_p, training)
    out = out * top_k_weights.reshape(-1)[routing.order].unsqueeze(-1).to(out.dtype)
    final = torch.zeros_like(hidden_states, dtype=out.dtype).index_add_(0, routing.token, out)
    return final.to(hidden_states.dtype)


def _project(experts, param, x, routing, adapters, dropout_p, training):
    bias = getattr(experts, f"{param}_bias") if experts.has_bias else None
    A, B, scaling = adapters.get(param, (None, None, 1.0))
    return fused_grouped_lora_linear(x, getattr(experts, param), bias, A, B, routing, scaling, dropout_p,
                                     training=training, transposed=bool(experts.is_transposed))


class FusedLoraExperts(LoraLayer):
    """An MoE experts module with a LoRA per expert on the targeted 3-D weights (see the module docstring)."""

    one_adapter_reason = ("an MoE experts layer (target_parameters) holds one adapter; several adapters and "
                          "mixed-adapter batches (batch_adapters) are not supported on experts yet")

    @classmethod
    def from_base(cls, experts: nn.Module, params: Sequence[str], r: int = 8, lora_alpha: float = 16,
                  lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                  lora_dtype: Optional[torch.dtype] = None, name: str = "") -> "FusedLoraExperts":
        """The layer over `experts`, adapting `params` (a subset of gate_up_proj, down_proj)."""
        experts_layout(experts, name)
        bad = [p for p in params if p not in EXPERT_PARAMS]
        if bad or not params:
            raise ValueError(f"target_parameters: {name!r} parameters {list(bad or params)} cannot take an adapter; "
                             f"an experts module's adaptable parameters are {list(EXPERT_PARAMS)}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        object.__setattr__(layer, "_experts", experts)  # outside the module tree: names and state_dict unchanged
        for pname, p in experts.named_parameters(recurse=False):
            p.requires_grad_(False)
            setattr(layer, pname, _param(p))
        layer.register_parameter("bias", None)
        layer.fan_in_fan_out = False
        layer.transposed = bool(experts.is_transposed)
        layer.has_bias = bool(experts.has_bias)
        layer.num_experts = experts.gate_up_proj.shape[0]
        # PEFT's nesting order: the module's parameter registration order, the first one innermost.
        layer.params = tuple(p for p in (n for n, _ in experts.named_parameters(recurse=False)) if p in params)
        k = len(layer.params)
        layer.adapter_tensor_names = tuple(f"{p}_lora_{t}" for p in layer.params for t in "AB")
        layer.peft_keys = tuple("base_layer." * (k - 1 - i) + f"lora_{t}.weight"
                                for i in range(k) for t in "AB")
        w = experts.gate_up_proj
        if lora_dtype is None:
            lora_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        layer._init_adapters(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                             {"device": w.device, "dtype": lora_dtype})
        layer._merge_stash = None
        layer.train(experts.training)
        return layer

    def features(self, param: str) -> Tuple[int, int]:
        """(in_features, out_features) of one expert's projection `param`."""
        _, d1, d2 = getattr(self, param).shape
        return (d1, d2) if self.transposed else (d2, d1)

    def _adapter_shapes(self, r: int):
        shapes = []
        for p in self.params:
            fin, fout = self.features(p)
            shapes += [(r * self.num_experts, fin), (fout, r * self.num_experts)]
        return tuple(shapes)

    @torch.no_grad()
    def _init_adapter(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        tensors = self.adapter_params(adapter_name)
        for A, B in zip(tensors[0::2], tensors[1::2]):
            # PEFT initialises the (r·E, in) and (out, r·E) tensors as whole nn.Linear weights.
            init_lora_pair(A, B, init_lora_weights, self.r)

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self._batch is not None and self.adapter_enabled:
            raise ValueError(self.one_adapter_reason)
        if self.merged or not self.adapter_enabled or self.active_adapter not in self._specs:
            return self._experts.forward(hidden_states, top_k_index, top_k_weights)
        adapters = {p: (getattr(self, f"{p}_lora_A"), getattr(self, f"{p}_lora_B"), self.scaling)
                    for p in self.params}
        return experts_forward(self._experts, hidden_states, top_k_index, top_k_weights, adapters,
                               self.lora_dropout, self.training)

    # -- merge ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, param: str) -> torch.Tensor:
        """scaling·B_e·A_e for every expert in float32, in the parameter's own (E, ·, ·) layout."""
        E = self.num_experts
        A = getattr(self, f"{param}_lora_A").float().view(E, self.r, -1)
        B = getattr(self, f"{param}_lora_B").float().view(-1, self.r, E).permute(2, 0, 1)
        delta = torch.bmm(B, A) * self.scaling  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def _merge_rule(self, adapter_name: str, sign: float) -> None:
        if sign > 0:
            if self._merge_stash is None:
                # Kept until unmerge, so that unmerge gives back the weights bit for bit.
                self._merge_stash = {p: getattr(self, p).detach().clone() for p in self.params}
            for p in self.params:
                w = getattr(self, p)
                w.copy_((w.float() + self.delta_weight(p)).to(w.dtype))
        else:
            for p in self.params:
                w = getattr(self, p)
                if self._merge_stash is not None:
                    w.copy_(self._merge_stash[p])
                else:
                    w.copy_((w.float() - self.delta_weight(p)).to(w.dtype))
            self._merge_stash = None

    @torch.no_grad()
    def to_linear(self) -> nn.Module:
        """The experts module holding the merged weights (merged in place, without the unmerge copy)."""
        if not self.merged and self.adapter_enabled and self.active_adapter in self._specs:
            for p in self.params:
                w = getattr(self, p)
                w.copy_((w.float() + self.delta_weight(p)).to(w.dtype))
        self._merge_stash = None
        return self._experts

    def to_base(self) -> nn.Module:
        """The original experts module; it shares this layer's Parameters."""
        return self._experts

    def extra_repr(self) -> str:
        return (f"params={list(self.params)}, num_experts={self.num_experts}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, scaling={self.scaling:g}"
                f"{', transposed' if self.transposed else ''}{', merged' if self.merged else ''}")


def adapted_experts_params(module: nn.Module, key: str, targets: Sequence[str]) -> List[str]:
    """The parameters of `module` (qualified name `key`) that target_parameters names (PEFT's match: the
    qualified parameter name equals an entry or ends with "." + entry), in registration order."""
    hits = []
    for pname, _ in module.named_parameters(recurse=False):
        full = f"{key}.{pname}" if key else pname
        if any(full == t or full.endswith("." + t) for t in targets):
            hits.append(pname)
    return hits
