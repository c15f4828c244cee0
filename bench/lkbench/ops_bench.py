"""One op-level case: every implementation measured on the same tensors, in one process, back to back.

Passes:  fwd     the training-mode forward (graph recorded, tensors saved), output dropped
         bwd     backward alone: the forward runs untimed before each repetition
         fwdbwd  forward + backward, the number the targets are about
Backward is torch.autograd.grad over x and the trainable tensors (not .backward()), so no gradient
accumulation kernel is timed. The results are written as the flat fields of the results schema
(`<impl>_ms` is forward+backward) plus a per-implementation breakdown under "impls".
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
from lora_kernels.timing import Timer

from . import impls as I
from ._internals import gemm_dispatch
from .cases import Case
from .memory import MB, free, peak_bytes, saved_bytes

PASSES = ("fwd", "bwd", "fwdbwd")
# Field names in the results file: "fused" is ours on Triton (GEMM path chosen per shape), the others keep
# their implementation name.
RATIOS = {  # name: (numerator impl, denominator impl), on forward+backward medians
    "fused_over_base": ("fused", "base"),
    "peft_over_fused": ("peft", "fused"),
    "torch_over_fused": ("torch", "fused"),
    "ours_torch_over_fused": ("ours_torch", "fused"),
    "split_gemm_over_fused_gemm": ("split_gemm", "fused_gemm"),
    "hybrid_over_fused": ("hybrid", "fused"),
}


def _gemm_choices() -> Dict[str, dict]:
    """{"fwd"/"bwd": {"path", "fused_ms", "split_ms"}} as LORA_KERNELS_GEMM=auto measured them; empty where auto
    does not measure (off CUDA), or a pass the case did not run."""
    out = {}
    for key, (path, times) in gemm_dispatch.gemm_choices().items():
        out[key.pass_name] = {"key": key.describe(), "path": path, **{f"{p}_ms": _r(ms) for p, ms in times.items()}}
    return out


def _r(v, digits=4):
    return None if v is None else round(float(v), digits)


def _passes(built: I.Built, t: I.Tensors, timer: Timer, passes: Iterable[str]) -> Dict[str, dict]:
    x = t.x.detach().requires_grad_(True)
    inputs = built.grad_inputs(x)

    def fwd(_):
        built(x)

    def fwdbwd(_):
        torch.autograd.grad(built(x), inputs, t.dy)

    def forward_only():
        return built(x)

    def bwd(y):
        torch.autograd.grad(y, inputs, t.dy)

    runners = {"fwd": (fwd, None), "bwd": (bwd, forward_only), "fwdbwd": (fwdbwd, None)}
    return {p: timer.measure(*runners[p]) for p in passes}


def measure_case(case: Case, names: List[str], timer: Timer, passes: Iterable[str] = PASSES,
                 check: bool = True) -> dict:
    """Measure `names` on `case`; a result dict with the schema's flat fields and an "impls" breakdown."""
    passes = [p for p in PASSES if p in set(passes)]
    if "fwdbwd" not in passes:
        raise ValueError("passes must include fwdbwd: the results schema's <impl>_ms fields are forward+backward")
    device = timer.device
    t = I.make_tensors(case, device)
    ref = I.reference_output(case, t) if check else None
    out = dict(case.fields())
    detail: Dict[str, dict] = {}
    errors: List[str] = []
    for name in names:
        try:
            built = I.build(name, case, t)
        except I.Skip as why:
            detail[name] = {"skipped": str(why)}
            continue
        d: Dict[str, object] = {}
        if name == "fused":
            gemm_dispatch.clear_gemm_choices()  # so the choices recorded below are this case's
        if check and name != "base":
            err = I.output_error(built, t.x, ref)
            d["rel_err"] = float(f"{err:.3g}")
            if not err <= I.TOLERANCE[case.dtype]:
                errors.append(f"{case.name}: {name} output differs from the reference by {err:.3g} "
                              f"(tolerance {I.TOLERANCE[case.dtype]})")
        for p, m in _passes(built, t, timer, passes).items():
            d[f"{p}_ms"] = _r(m["median_ms"])
            d[f"{p}_min_ms"] = _r(m["min_ms"])
        if name == "fused":
            d["gemm"] = _gemm_choices()
        x = t.x.detach().requires_grad_(True)
        nbytes, y = saved_bytes(lambda: built(x), exclude=list(built.module.parameters()))
        del y
        d["saved_mb"] = _r(nbytes / MB)
        peak = peak_bytes(lambda: torch.autograd.grad(built(x), built.grad_inputs(x), t.dy), device)
        d["peak_mb"] = None if peak is None else _r(peak / MB)
        detail[name] = d
        del built, x
        free(device)
    for name in I.IMPLS:
        d = detail.get(name, {})
        out[f"{name}_ms"] = d.get("fwdbwd_ms")
        out[f"{name}_peak_mb"] = d.get("peak_mb")
        out[f"{name}_saved_mb"] = d.get("saved_mb")
    out["ratios"] = {}
    for key, (num, den) in RATIOS.items():
        a, b = out.get(f"{num}_ms"), out.get(f"{den}_ms")
        out["ratios"][key] = _r(a / b) if a and b else None
    out["impls"] = detail
    out["errors"] = errors
    del t, ref
    free(device)
    return out
