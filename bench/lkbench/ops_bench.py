"""One op-level case: every implementation measured on the same tensors, in one process, back to back.

Passes:  fwd     the training-mode forward (graph recorded, tensors saved), output dropped
         bwd     backward alone: the forward runs untimed before each repetition
         fwdbwd  forward + backward, the number the targets are about
Backward is torch.autograd.grad over x and the trainable tensors (not .backward()), so no gradient
accumulation kernel is timed. The results are written as the flat fields of the results schema
(`<impl>_ms` is forward+backward) plus a per-implementation breakdown under "impls".
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from lora_kernels.timing import Timer

from . import impls as I
from ._internals import gemm_dispatch
from .cases import Case
from .memory import MB, free, peak_bytes, saved_bytes

PASSES = ("fwd", "bwd", "fwdbwd")
# Set by bench/collect.py's SIGTERM handler: a stop requested while an implementation runs is never taken for that
# implementation failing (Triton's interpreter, for one, re-raises it wrapped in its own error).
STOP_REQUESTED: List[str] = []
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


def measure_built(built: I.Built, t, timer: Timer, passes: Iterable[str], ref=None, tolerance=None,
                  case_name: str = "") -> Tuple[Dict[str, object], Optional[str]]:
    """One implementation on one case's tensors (anything with .x and .dy): its output against `ref` (eval mode),
    the passes' medians and minima, saved bytes and peak memory; (detail, the mismatch message or None)."""
    d: Dict[str, object] = {}
    error = None
    if ref is not None:
        err = I.output_error(built, t.x, ref)
        d["rel_err"] = float(f"{err:.3g}")
        if not err <= tolerance:
            error = (f"{case_name}: {built.name} output differs from the reference by {err:.3g} "
                     f"(tolerance {tolerance})")
    for p, m in _passes(built, t, timer, passes).items():
        d[f"{p}_ms"] = _r(m["median_ms"])
        d[f"{p}_min_ms"] = _r(m["min_ms"])
    x = t.x.detach().requires_grad_(True)
    nbytes, y = saved_bytes(lambda: built(x), exclude=list(built.module.parameters()))
    del y
    d["saved_mb"] = _r(nbytes / MB)
    peak = peak_bytes(lambda: torch.autograd.grad(built(x), built.grad_inputs(x), t.dy), timer.device)
    d["peak_mb"] = None if peak is None else _r(peak / MB)
    return d, error


def flat_fields(out: dict, detail: Dict[str, dict], names: Iterable[str], ratios: Dict[str, Tuple[str, str]]) -> None:
    """The results schema's flat fields: `<impl>_ms` (forward+backward), `<impl>_peak_mb`, `<impl>_saved_mb`, and
    "ratios" {name: (numerator field, denominator field)}, None where either side was not measured."""
    for name in names:
        d = detail.get(name, {})
        out[f"{name}_ms"] = d.get("fwdbwd_ms")
        out[f"{name}_peak_mb"] = d.get("peak_mb")
        out[f"{name}_saved_mb"] = d.get("saved_mb")
    out["ratios"] = {}
    for key, (num, den) in ratios.items():
        a, b = out.get(num), out.get(den)
        out["ratios"][key] = _r(a / b) if a and b else None


def measure_side_by_side(fields: dict, names: List[str], build, t, timer: Timer, passes: Iterable[str], ref,
                         tolerance: float, ratios: Dict[str, Tuple[str, str]], unchecked=("base",)) -> dict:
    """The DoRA and MoE suites' cases: build(name) -> Built (or raises I.Skip), each measured in turn on the same
    tensors t; every implementation but those in `unchecked` is held to `ref` (eval mode) within `tolerance`. One
    that raises while measured is recorded as {"failed": why} and as an error; the others are still measured."""
    passes = _check_passes(passes)
    out = dict(fields)
    detail: Dict[str, dict] = {}
    errors: List[str] = []
    for name in names:
        try:
            built = build(name)
        except I.Skip as why:
            detail[name] = {"skipped": str(why)}
            continue
        try:
            d, error = measure_built(built, t, timer, passes, None if name in unchecked else ref, tolerance,
                                     fields["name"])
        except (RuntimeError, ValueError, TypeError) as err:  # e.g. out of memory: keep the other implementations
            if STOP_REQUESTED:
                raise
            d, error = {"failed": f"{type(err).__name__}: {err}"[:500]}, f"{fields['name']}: {name} failed: {err}"
        errors += [error] if error else []
        detail[name] = d
        del built
        free(timer.device)
    flat_fields(out, detail, names, ratios)
    out["impls"] = detail
    out["errors"] = errors
    return out


def _check_passes(passes: Iterable[str]) -> List[str]:
    passes = [p for p in PASSES if p in set(passes)]
    if "fwdbwd" not in passes:
        raise ValueError("passes must include fwdbwd: the results schema's <impl>_ms fields are forward+backward")
    return passes


def measure_case(case: Case, names: List[str], timer: Timer, passes: Iterable[str] = PASSES,
                 check: bool = True) -> dict:
    """Measure `names` on `case`; a result dict with the schema's flat fields and an "impls" breakdown."""
    passes = _check_passes(passes)
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
        if name == "fused":
            gemm_dispatch.clear_gemm_choices()  # so the choices recorded below are this case's
        d, error = measure_built(built, t, timer, passes, ref if check and name != "base" else None,
                                 I.TOLERANCE[case.dtype], case.name)
        errors += [error] if error else []
        if name == "fused":
            d["gemm"] = _gemm_choices()
        detail[name] = d
        del built
        free(device)
    flat_fields(out, detail, I.IMPLS, {k: (f"{num}_ms", f"{den}_ms") for k, (num, den) in RATIOS.items()})
    out["impls"] = detail
    out["errors"] = errors
    del t, ref
    free(device)
    return out
