"""MoE experts (PEFT's target_parameters) measured side by side: one transformers experts module, its routing
fixed, forward + backward over the hidden states and the routing weights (they train inside a model: the router's
output).

    base   the transformers experts module without LoRA, on its `grouped_mm` experts implementation (the results
           record which function ran it: torch.nn.functional.grouped_mm, torch._grouped_mm or transformers'
           fallback loop)
    ours   lk.inject_lora(..., LoraConfig(target_parameters=[gate_up_proj, down_proj])): FusedLoraExperts, on
           whatever experts path lora_kernels takes for these tensors (recorded: `ours_backend`, what
           LORA_KERNELS_BACKEND resolves to, and `ours_functions`, the autograd Functions in its graph)
    peft   PEFT's target_parameters LoRA (lora.ParamWrapper around the same experts module); PEFT refuses
           lora_dropout there, so at p > 0 it is recorded as skipped with PEFT's own message

Shapes: the Qwen3-30B-A3B layer (E=128, top-8, H=2048, I=768: gate_up_proj (E, 2I, H), down_proj (E, H, I)) and
gpt-oss-20b (E=32, top-4, H=2880, I=2880: transposed, gate_up_proj (E, H, 2I) with gate and up interleaved in its
columns, down_proj (E, I, H), biases on both), 4096 tokens, r=16, bf16, fp32 adapters; tiny odd sizes in fp32 on
a CPU. The modules are built from their transformers config on the meta device and given the case's weights: no
download, and every implementation shares the same weight storage.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from . import HAS_CUDA
from .cases import DTYPES, GRIDS, default_grid
from .impls import Built, Skip

MOE_IMPLS = ("base", "ours", "peft")
MOE_RATIOS = {
    "ours_over_base": ("ours_ms", "base_ms"),
    "peft_over_ours": ("peft_ms", "ours_ms"),
    "peft_over_base": ("peft_ms", "base_ms"),
    "ours_peak_over_peft": ("ours_peak_mb", "peft_peak_mb"),
    "ours_saved_over_peft": ("ours_saved_mb", "peft_saved_mb"),
}
PARAMS = ("gate_up_proj", "down_proj")
TARGETS = [f"experts.{p}" for p in PARAMS]


@dataclass(frozen=True)
class MoeShape:
    name: str
    arch: str     # "qwen3_moe": (E, out, in); "gpt_oss": transposed (E, in, out), interleaved gate/up, biases
    E: int
    top_k: int
    H: int        # hidden size
    I: int        # expert intermediate size  # noqa: E741


QWEN3_30B_A3B = MoeShape("qwen3-30b-a3b", "qwen3_moe", 128, 8, 2048, 768)
GPT_OSS_20B = MoeShape("gpt-oss-20b", "gpt_oss", 32, 4, 2880, 2880)
# Not multiples of any block size; an expert or two may get no token.
SMOKE_MOE = [MoeShape("qwen3-tiny", "qwen3_moe", 6, 2, 24, 20), MoeShape("gpt-oss-tiny", "gpt_oss", 4, 2, 24, 20)]


@dataclass(frozen=True)
class MoeCase:
    shape: MoeShape
    T: int              # tokens
    r: int
    dropout: float
    dtype: str
    adapter_dtype: str

    @property
    def lora_alpha(self) -> int:
        return 2 * self.r

    @property
    def name(self) -> str:
        s = self.shape
        return (f"moe/{s.name}/T{self.T}/E{s.E}/k{s.top_k}/r{self.r}/p{self.dropout:g}/{self.dtype}/"
                f"A{self.adapter_dtype}")

    def fields(self) -> dict:
        s = self.shape
        return {"name": self.name, "shape": s.name, "arch": s.arch, "E": s.E, "top_k": s.top_k, "H": s.H, "I": s.I,
                "T": self.T, "r": self.r, "lora_alpha": self.lora_alpha, "dropout": self.dropout, "dtype": self.dtype,
                "adapter_dtype": self.adapter_dtype}


def moe_cases(grid: Optional[str] = None, match: Optional[str] = None, require_cuda: bool = True) -> List[MoeCase]:
    """smoke: the tiny Qwen3 layout at p = 0, the tiny gpt-oss one at p = 0.1, fp32; headline and full:
    Qwen3-30B-A3B then gpt-oss-20b, each at p = 0 and 0.1."""
    grid = grid or default_grid()
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r} is not one of {', '.join(GRIDS)}")
    if grid != "smoke" and require_cuda and not HAS_CUDA:
        raise RuntimeError(f"grid={grid!r} needs a CUDA GPU; on CPU use the smoke grid")
    if grid == "smoke":
        # One case per layout: Qwen3's with PEFT beside it, gpt-oss's with dropout (PEFT refusing it). Each
        # forward+backward of ours under Triton's interpreter costs about a second once the grouped kernels run.
        cases = [MoeCase(SMOKE_MOE[0], 16, 4, 0.0, "fp32", "fp32"), MoeCase(SMOKE_MOE[1], 16, 4, 0.1, "fp32", "fp32")]
    else:
        cases = [MoeCase(s, 4096, 16, p, "bf16", "fp32") for s in (QWEN3_30B_A3B, GPT_OSS_20B) for p in (0.0, 0.1)]
    match = match if match is not None else os.environ.get("LORA_BENCH_MATCH")
    return [c for c in cases if re.search(match, c.name)] if match else cases


@dataclass
class MoeTensors:
    """The shared operands of one case: every implementation computes with these exact values."""
    x: torch.Tensor                  # (T, H)
    dy: torch.Tensor                 # (T, H)
    weights: Dict[str, torch.Tensor]  # the experts module's parameters by name, frozen
    top_k_index: torch.Tensor        # (T, k)
    top_k_weights: torch.Tensor      # (T, k), x's dtype
    A: Dict[str, torch.Tensor]       # per projection, PEFT's layout (r·E, in)
    B: Dict[str, torch.Tensor]       # (out, r·E), non-zero


def _features(case: MoeCase, param: str):
    """(in, out) of one expert's projection."""
    s = case.shape
    return (s.H, 2 * s.I) if param == "gate_up_proj" else (s.I, s.H)


def make_moe_tensors(case: MoeCase, device, seed: int = 0) -> MoeTensors:
    torch.manual_seed(seed)
    s, dt, at = case.shape, DTYPES[case.dtype], DTYPES[case.adapter_dtype]
    weights = {}
    for p in PARAMS:
        fin, fout = _features(case, p)
        w = torch.randn(s.E, fout, fin, device=device, dtype=dt) / fin ** 0.5
        # gpt-oss stores (E, in, out); a contiguous tensor in that layout, as a loaded checkpoint has it.
        weights[p] = w.transpose(1, 2).contiguous() if s.arch == "gpt_oss" else w
        if s.arch == "gpt_oss":
            weights[f"{p}_bias"] = (0.02 * torch.randn(s.E, fout, device=device)).to(dt)
    logits = torch.randn(case.T, s.E, device=device)
    top, index = torch.topk(logits, s.top_k, dim=-1)
    A = {p: (torch.randn(case.r * s.E, _features(case, p)[0], device=device) / _features(case, p)[0] ** 0.5).to(at)
         for p in PARAMS}
    B = {p: (torch.randn(_features(case, p)[1], case.r * s.E, device=device) / case.r ** 0.5).to(at) for p in PARAMS}
    return MoeTensors(torch.randn(case.T, s.H, device=device, dtype=dt), torch.randn(case.T, s.H, device=device, dtype=dt),
                      weights, index, torch.softmax(top, dim=-1).to(dt), A, B)


def experts_module(case: MoeCase, t: MoeTensors) -> nn.Module:
    """A fresh transformers experts module (Qwen3MoeExperts or GptOssExperts) on the case's weights, set to the
    grouped_mm experts implementation."""
    import transformers

    s = case.shape
    if s.arch == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        cfg = transformers.Qwen3MoeConfig(hidden_size=s.H, moe_intermediate_size=s.I, num_experts=s.E,
                                          num_experts_per_tok=s.top_k)
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        cfg = transformers.GptOssConfig(hidden_size=s.H, intermediate_size=s.I, num_local_experts=s.E,
                                        num_experts_per_tok=s.top_k)
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        module = cls(cfg)
    for name, w in t.weights.items():
        setattr(module, name, nn.Parameter(w, requires_grad=False))
    return module


def grouped_mm_function(t: MoeTensors) -> str:
    """Which function runs transformers' grouped_mm experts implementation on these tensors."""
    from transformers.integrations import moe

    w = t.weights["gate_up_proj"]
    offs = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    if not hasattr(moe, "_can_use_grouped_mm"):  # a private helper of transformers 5: say so rather than guess
        return "grouped_mm: which torch function runs it is not known (no transformers _can_use_grouped_mm)"
    if not moe._can_use_grouped_mm(t.x, w, offs):
        return "grouped_mm: transformers' fallback (a loop over experts)"
    if hasattr(torch.nn.functional, "grouped_mm"):
        return "grouped_mm: torch.nn.functional.grouped_mm"
    return "grouped_mm: torch._grouped_mm"


class _Holder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts


class ExpertsCall(nn.Module):
    """experts(x, top_k_index, top_k_weights) as a one-argument module: the case's routing, its weights trainable
    (a Parameter here, so every implementation differentiates them)."""

    def __init__(self, experts: nn.Module, t: MoeTensors):
        super().__init__()
        self.experts = experts
        self.register_buffer("top_k_index", t.top_k_index, persistent=False)
        self.top_k_weights = nn.Parameter(t.top_k_weights.clone())

    def forward(self, x):
        return self.experts(x, self.top_k_index, self.top_k_weights)


def _ours(case: MoeCase, t: MoeTensors) -> Built:
    import lora_kernels as lk

    holder = _Holder(experts_module(case, t))
    lk.inject_lora(holder, lk.LoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=case.dropout,
                                         target_parameters=TARGETS))
    layer = holder.experts
    with torch.no_grad():
        for p in PARAMS:
            getattr(layer, f"{p}_lora_A").copy_(t.A[p])
            getattr(layer, f"{p}_lora_B").copy_(t.B[p])
    return Built("ours", ExpertsCall(layer, t))


def _peft(case: MoeCase, t: MoeTensors) -> Built:
    try:
        import peft
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError as err:
        raise Skip(f"peft does not import ({err})") from err
    try:
        cfg = peft.LoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=case.dropout,
                              target_parameters=TARGETS)
        model = peft.get_peft_model(_Holder(experts_module(case, t)), cfg,
                                    autocast_adapter_dtype=case.adapter_dtype == "fp32")
    except ValueError as err:
        raise Skip(f"PEFT refuses this case: {err}") from err
    wrapper = layer = model.base_model.model.experts
    with torch.no_grad():
        while isinstance(layer, ParamWrapper):  # one wrapper per targeted parameter, nested
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if A.dtype != t.A[layer.parameter_name].dtype:
                raise RuntimeError(f"PEFT built {A.dtype} adapters, the case asks for {t.A[layer.parameter_name].dtype}")
            A.copy_(t.A[layer.parameter_name])
            B.copy_(t.B[layer.parameter_name])
            layer = layer.base_layer
    return Built("peft", ExpertsCall(wrapper, t))


def build_moe(name: str, case: MoeCase, t: MoeTensors) -> Built:
    """Implementation `name` in training mode; raises Skip if it cannot run here."""
    if name == "base":
        built = Built("base", ExpertsCall(experts_module(case, t), t))
    elif name == "ours":
        built = _ours(case, t)
    elif name == "peft":
        built = _peft(case, t)
    else:
        raise ValueError(f"unknown MoE implementation {name!r}; known: {', '.join(MOE_IMPLS)}")
    built.module.train()
    return built


def moe_reference(case: MoeCase, t: MoeTensors) -> torch.Tensor:
    """The experts' output with the adapters and without dropout, in float32, expert by expert: A_e is rows
    e·r…e·r+r-1 of lora_A, B_e columns e, E+e, … of lora_B (PEFT's layout); the gate is the module's own."""
    gate = experts_module(case, t)._apply_gate
    s = case.lora_alpha / case.r
    E = case.shape.E
    x = t.x.float()
    out = torch.zeros_like(x)
    flat = t.top_k_index.reshape(-1)
    for e in range(E):
        pairs = (flat == e).nonzero().squeeze(1)
        if not len(pairs):
            continue
        tokens = pairs // case.shape.top_k
        h = x[tokens]
        for p in PARAMS:
            w = t.weights[p][e].float()
            w = w.t() if case.shape.arch == "gpt_oss" else w    # (out, in)
            A, B = t.A[p][e * case.r:(e + 1) * case.r].float(), t.B[p][:, e::E].float()
            h = h @ w.t() + s * (h @ A.t()) @ B.t()
            if f"{p}_bias" in t.weights:
                h = h + t.weights[f"{p}_bias"][e].float()
            if p == "gate_up_proj":
                h = gate(h)
        out.index_add_(0, tokens, h * t.top_k_weights.reshape(-1)[pairs].float().unsqueeze(1))
    return out


def autograd_functions(built: Built, x: torch.Tensor) -> List[str]:
    """The custom autograd Functions in one training forward's graph (torch's own nodes, named <Op>Backward<N>,
    left out): which experts path lora_kernels took, whatever its dispatch chose."""
    with torch.enable_grad():
        y = built(x.detach().requires_grad_(True))
    seen, todo, names = set(), [y.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if not name[-1].isdigit() and name != "AccumulateGrad":
            names.add(name.removesuffix("Backward"))
        todo += [n for n, _ in node.next_functions]
    return sorted(names)


def measure_moe_case(case: MoeCase, names: List[str], timer, passes) -> dict:
    """Every implementation in `names` on one case, back to back on the same tensors (ops_bench's measure)."""
    import lora_kernels as lk
    from lora_kernels.backends import gemm_dispatch

    from .impls import TOLERANCE
    from .memory import free
    from .ops_bench import measure_side_by_side

    t = make_moe_tensors(case, timer.device)
    gemm_dispatch.clear_gemm_choices()  # so the choices recorded below are this case's
    fields = dict(case.fields(), experts_implementation=grouped_mm_function(t), ours_backend=lk.resolve_backend(t.x),
                  ours_functions=autograd_functions(build_moe("ours", case, t), t.x))
    out = measure_side_by_side(fields, names, lambda n: build_moe(n, case, t), t, timer, passes,
                               moe_reference(case, t), TOLERANCE[case.dtype], MOE_RATIOS)
    # LORA_KERNELS_GEMM=auto's fused / split choice per experts pass (measured on CUDA only: empty elsewhere)
    out["ours_gemm"] = {k.describe(): path for k, (path, _) in gemm_dispatch.gemm_choices().items() if k.experts}
    del t
    free(timer.device)
    return out
