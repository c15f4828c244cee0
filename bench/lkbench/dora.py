"""The DoRA implementations measured side by side (bench/test_bench_dora.py, bench/collect.py --dora), on a case's
tensors.

    base        the bare frozen base linear (impls.py)
    lora        ours, FusedLoraLinear on the Triton backend (impls.py's `fused`): the cost DoRA is compared with
    dora        ours, FusedDoraLinear on the Triton backend: lora_shrink + ops/dora_linear_fwd.py forward,
                the LoRA backward kernels with g·dy, ops/dora_linear_bwd_dx.py for grad_x at p > 0
    dora_torch  ours, FusedDoraLinear on the torch backend
    peft_dora   PEFT's DoRA Linear (LoraConfig(use_dora=True))

Cases (dora_cases), named "dora/<op case>": the headline op cases with PEFT's default fp32 adapters (M=8192, r=16,
bf16, p ∈ {0.1, 0} on 4096→4096, 4096→14336, 14336→4096, each shape's two dropout rates together); on a CPU the
smoke grid's dropout case. Every DoRA
implementation starts from the same magnitude m = ‖W + s·B·A‖ ⊙ u, u = 1 ± 10 % per output feature, so
g = m / ‖W + s·B·A‖ = u is not 1 and the output check below sees it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional

import torch

import lora_kernels as lk

from . import cases as C
from ._internals import linear_sharing
from .impls import Built, Skip, Tensors, _Holder, build, reference_output

DORA_IMPLS = ("base", "lora", "dora", "dora_torch", "peft_dora")
ENV = {"dora": {"LORA_KERNELS_BACKEND": "triton"}, "dora_torch": {"LORA_KERNELS_BACKEND": "torch"}}
# Forward+backward ratios in the results file: name -> (numerator field, denominator field).
DORA_RATIOS = {
    "dora_over_lora": ("dora_ms", "lora_ms"),
    "dora_over_base": ("dora_ms", "base_ms"),
    "lora_over_base": ("lora_ms", "base_ms"),
    "peft_dora_over_dora": ("peft_dora_ms", "dora_ms"),
    "dora_torch_over_dora": ("dora_torch_ms", "dora_ms"),
    "dora_saved_over_peft_dora": ("dora_saved_mb", "peft_dora_saved_mb"),
    "dora_peak_over_peft_dora": ("dora_peak_mb", "peft_dora_peak_mb"),
}


@dataclass(frozen=True)
class DoraCase(C.Case):
    @property
    def name(self) -> str:
        return "dora/" + super().name


def dora_cases(grid: Optional[str] = None, match: Optional[str] = None, require_cuda: bool = True) -> List[DoraCase]:
    """The DoRA cases of `grid` (smoke: the smoke grid's dropout case; headline and full: the headline cases with
    fp32 adapters, p = 0.1 and 0 of one shape after the other) whose name matches `match` (default
    LORA_BENCH_MATCH)."""
    grid = grid or C.default_grid()
    base = C.select("headline" if grid in ("headline", "full") else grid, match="", require_cuda=require_cuda)
    order = {s: i for i, s in enumerate(C.LLAMA_SHAPES + C.SMOKE_SHAPES)}
    # smoke: the dropout case alone (fp16, fp32 adapters), since every DoRA launch under the interpreter costs
    # a good part of a second and the p = 0 kernels have their own tests (tests/test_dora_*.py).
    cases = sorted((DoraCase(c.shape, c.M, c.r, c.dropout, c.dtype, c.adapter_dtype) for c in base
                    if c.adapter_dtype == "fp32" and (grid != "smoke" or c.dropout > 0)),
                   key=lambda c: (order[c.shape], c.dropout != 0.1))
    match = match if match is not None else os.environ.get("LORA_BENCH_MATCH")
    return [c for c in cases if re.search(match, c.name)] if match else cases


def _gain(case: C.Case, device) -> torch.Tensor:
    """u: the magnitude's departure from the norm, 1 ± 10 % per output feature, the same for every implementation."""
    g = torch.Generator().manual_seed(2)
    return (1.0 + 0.1 * torch.randn(case.N, generator=g)).to(device)


def magnitude(case: C.Case, t: Tensors) -> torch.Tensor:
    """m = ‖W + s·B·A‖ ⊙ u in float32 (the full (N, K) sum is built here once, outside any timing)."""
    s = case.lora_alpha / case.r
    n = torch.linalg.vector_norm(t.W.float() + s * (t.B.float() @ t.A.float()), dim=1)
    return n * _gain(case, n.device)


def dora_reference(case: C.Case, t: Tensors) -> torch.Tensor:
    """y without dropout in float32: g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) with g = u (m = ‖W + s·B·A‖ ⊙ u)."""
    return reference_output(case, t) * _gain(case, t.x.device)


def _ours(name: str, case: C.Case, t: Tensors, m: torch.Tensor) -> Built:
    layer = lk.FusedDoraLinear.from_linear(linear_sharing(t.W, None), r=case.r, lora_alpha=case.lora_alpha,
                                           lora_dropout=case.dropout, lora_dtype=t.A.dtype)
    with torch.no_grad():
        layer.lora_A.copy_(t.A)
        layer.lora_B.copy_(t.B)
        layer.lora_magnitude_vector.copy_(m)
    return Built(name, layer.train(), ENV[name])


def _peft(case: C.Case, t: Tensors, m: torch.Tensor) -> Built:
    try:
        import peft
    except ImportError as err:
        raise Skip(f"peft does not import ({err})") from err

    cfg = peft.LoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=case.dropout,
                          target_modules=["proj"], use_dora=True)
    model = peft.get_peft_model(_Holder(linear_sharing(t.W, None)), cfg,
                                autocast_adapter_dtype=case.adapter_dtype == "fp32")
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t.A)
        layer.lora_B["default"].weight.copy_(t.B)
        layer.lora_magnitude_vector["default"].weight.copy_(m)
    return Built("peft_dora", layer.train())


def build_dora(name: str, case: C.Case, t: Tensors) -> Built:
    """DoRA implementation `name` in training mode; Skip when it cannot run here (e.g. bf16 on the interpreter)."""
    if name == "base":
        return build("base", case, t)
    if name == "lora":
        built = build("fused", case, t)
        built.name = "lora"
        return built
    if name not in DORA_IMPLS:
        raise ValueError(f"unknown DoRA implementation {name!r}; known: {', '.join(DORA_IMPLS)}")
    m = magnitude(case, t)
    built = _peft(case, t, m) if name == "peft_dora" else _ours(name, case, t, m)
    try:
        with torch.no_grad():
            built(t.x[:1])
    except (RuntimeError, ValueError) as err:
        raise Skip(str(err)) from err
    return built


def measure_dora_case(case: DoraCase, names: List[str], timer, passes) -> dict:
    """Every implementation in `names` on one case, back to back on the same tensors (ops_bench's measure)."""
    from .impls import TOLERANCE, make_tensors
    from .memory import free
    from .ops_bench import measure_side_by_side

    t = make_tensors(case, timer.device)
    out = measure_side_by_side(case.fields(), names, lambda n: build_dora(n, case, t), t, timer, passes,
                               dora_reference(case, t), TOLERANCE[case.dtype], DORA_RATIOS,
                               unchecked=("base", "lora"))  # lora: held to LoRA's reference in the op cases
    del t
    free(timer.device)
    return out
