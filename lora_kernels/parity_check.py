"""`lora-kernels check`: the fused forward and backward against the float64 oracle, on this machine.

Inputs, oracle, error measure and per-dtype tolerances are reference.py's, the ones the test suite uses,
so a machine that passes here agrees with the tests' notion of correct. The 4-bit (QLoRA) cases quantize W
with bitsandbytes and compare with the oracle on bitsandbytes' own dequantization of it, on every backend
that has 4-bit kernels and can run here, with and without dropout (the oracle takes the backend's mask).
The DoRA cases (fused_dora_linear, dense and 4-bit W, with and without dropout) compare y and the gradients of x,
A, B and the magnitude m with PEFT's DoRA formula in float64 (reference.dora_linear_reference).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .backends import backends_4bit_for, keep_mask, resolve_backend
from .backends.base import draw_seed
from .functional import from_bnb, fused_dora_linear, fused_lora_linear
from .reference import TOL, dora_linear_reference, make_case, oracle, rel_err

# (leading dims of x, K, N, r, bias): odd sizes, none a multiple of a block size.
SHAPES: List[Tuple[tuple, int, int, int, bool]] = [
    ((3, 17), 33, 29, 4, True),
    ((2, 40), 64, 48, 8, False),
    ((1, 31), 19, 70, 1, True),
]

# 4-bit W: (leading dims, K, N, r, bias, quant type, double quant, blocksize, dropout p). NF4 and FP4, double
# quant on and off, blocks that span rows (K not a multiple of the blocksize) and that do not, dropout on and off.
SHAPES_4BIT: List[Tuple[tuple, int, int, int, bool, str, bool, int, float]] = [
    ((2, 19), 53, 29, 4, True, "nf4", True, 64, 0.0),
    ((23,), 40, 33, 8, False, "fp4", False, 32, 0.1),
    ((3, 7), 128, 24, 2, True, "nf4", False, 128, 0.25),
    ((17,), 64, 40, 4, True, "fp4", True, 64, 0.0),
]
# DoRA: (leading dims, K, N, r, bias, 4-bit W as (quant type, double quant, blocksize) or None, dropout p).
SHAPES_DORA: List[Tuple[tuple, int, int, int, bool, Optional[tuple], float]] = [
    ((3, 11), 33, 29, 4, True, None, 0.0),
    ((2, 13), 40, 48, 8, False, None, 0.1),
    ((2, 19), 53, 29, 4, True, ("nf4", True, 64), 0.1),
    ((17,), 64, 40, 4, False, ("fp4", False, 32), 0.0),
]
DROPOUT_SEED = 1234


@dataclass
class ParityResult:
    backend: str
    device: str
    dtype: str
    lead: tuple
    K: int
    N: int
    r: int
    bias: bool
    errors: Dict[str, float]     # y, grad_x, grad_A, grad_B: max error relative to the oracle's largest magnitude
    tol: float
    quant: Optional[str] = None  # a 4-bit W: "nf4, blocksize 64, double quant"
    dropout: float = 0.0
    dora: bool = False

    @property
    def label(self) -> str:
        """What the case is beyond its shape: DoRA, the 4-bit format and dropout (empty for the dense cases)."""
        return ((" dora" if self.dora else "") + (f" weight=4-bit({self.quant})" if self.quant else "")
                + (f" dropout={self.dropout:g}" if self.dropout else ""))

    @property
    def M(self) -> int:
        return int(torch.Size(self.lead).numel())

    @property
    def ok(self) -> bool:
        return all(e < self.tol for e in self.errors.values())


def check_parity(dtypes: Sequence[str], device) -> List[ParityResult]:
    """One result per (dtype, shape) in SHAPES, without dropout, with float32 adapters (PEFT's choice for
    a half-precision base). The backend is whatever fused_lora_linear resolves for the input."""
    results = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for seed, (lead, K, N, r, bias) in enumerate(SHAPES):
            case = make_case(lead, K, N, r, dtype, ab_dtype=torch.float32, bias=bias, seed=seed, device=device)
            x, A, B = (case[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B"))
            y = fused_lora_linear(x, case["weight"], case["bias"], A, B, case["scaling"], dropout_p=0.0, training=True)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(100 + seed)).to(device, dtype)
            y.backward(dy)
            y_ref, g_ref = oracle(case, dy=dy)
            errors = {"y": rel_err(y, y_ref), "grad_x": rel_err(x.grad, g_ref["x"]),
                      "grad_A": rel_err(A.grad, g_ref["lora_A"]), "grad_B": rel_err(B.grad, g_ref["lora_B"])}
            results.append(ParityResult(resolve_backend(x), str(torch.device(device)), dtype_name, lead, K, N, r,
                                        bias, errors, TOL[dtype]))
    return results


@contextlib.contextmanager
def _backend(name: str):
    """LORA_KERNELS_BACKEND=name for the calls inside (the package reads it at call time)."""
    before = os.environ.get("LORA_KERNELS_BACKEND")
    os.environ["LORA_KERNELS_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["LORA_KERNELS_BACKEND"]
        else:
            os.environ["LORA_KERNELS_BACKEND"] = before


def check_parity_4bit(dtypes: Sequence[str], device, backends: Optional[Sequence[str]] = None) -> List[ParityResult]:
    """One result per (dtype, case in SHAPES_4BIT, backend): the fused 4-bit forward and backward against the
    float64 oracle with W = bitsandbytes' dequantization of the packed weight. backends: every backend with 4-bit
    kernels that can compute the case's input here when None. Needs bitsandbytes (ImportError otherwise)."""
    import bitsandbytes.functional as bf

    results = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for seed, (lead, K, N, r, bias, quant_type, double_quant, blocksize, p) in enumerate(SHAPES_4BIT):
            case = make_case(lead, K, N, r, dtype, ab_dtype=torch.float32, bias=bias, seed=seed, device=device)
            packed, qs = bf.quantize_4bit(case["weight"], blocksize=blocksize, compress_statistics=double_quant,
                                          quant_type=quant_type)
            case["weight"] = bf.dequantize_4bit(packed, qs)   # the oracle's W: bitsandbytes' own dequantization
            qweight = from_bnb(packed, qs)
            dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(100 + seed)).to(device, dtype)
            names = backends if backends is not None else backends_4bit_for(case["x"])
            quant = f"{quant_type}, blocksize {blocksize}" + (", double quant" if double_quant else "")
            for backend in names:
                with _backend(backend):
                    x, A, B = (case[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B"))
                    mask = None
                    if p > 0:  # the seed the forward draws after manual_seed: the oracle uses the same mask
                        torch.manual_seed(DROPOUT_SEED)
                        mask = keep_mask(backend, draw_seed(x.device), x.shape, p)
                    torch.manual_seed(DROPOUT_SEED)
                    y = fused_lora_linear(x, qweight, case["bias"], A, B, case["scaling"], dropout_p=p, training=True)
                    y.backward(dy)
                    y_ref, g_ref = oracle(case, mask=mask, p=p, dy=dy)
                    errors = {"y": rel_err(y, y_ref), "grad_x": rel_err(x.grad, g_ref["x"]),
                              "grad_A": rel_err(A.grad, g_ref["lora_A"]), "grad_B": rel_err(B.grad, g_ref["lora_B"])}
                    results.append(ParityResult(resolve_backend(x), str(torch.device(device)), dtype_name, lead, K,
                                                N, r, bias, errors, TOL[dtype], quant=quant, dropout=p))
    return results


def _quantize_case(case, quant):
    """(4-bit weight for the op, the oracle's W = bitsandbytes' dequantization of it, its description)."""
    import bitsandbytes.functional as bf

    quant_type, double_quant, blocksize = quant
    packed, qs = bf.quantize_4bit(case["weight"], blocksize=blocksize, compress_statistics=double_quant,
                                  quant_type=quant_type)
    label = f"{quant_type}, blocksize {blocksize}" + (", double quant" if double_quant else "")
    return from_bnb(packed, qs), bf.dequantize_4bit(packed, qs), label


def check_parity_dora(dtypes: Sequence[str], device, four_bit: bool = True,
                      backends_4bit: Optional[Sequence[str]] = None) -> List[ParityResult]:
    """One result per (dtype, case in SHAPES_DORA, backend): fused_dora_linear's y and gradients of x, A, B and m
    against PEFT's DoRA formula in float64. A dense W runs on the backend fused_dora_linear resolves; a 4-bit W
    (four_bit; needs bitsandbytes) on backends_4bit, or every backend with 4-bit kernels that can run here."""
    results = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for seed, (lead, K, N, r, bias, quant, p) in enumerate(SHAPES_DORA):
            if quant is not None and not four_bit:
                continue
            case = make_case(lead, K, N, r, dtype, ab_dtype=torch.float32, bias=bias, seed=seed, device=device)
            magnitude = (torch.rand(N, generator=torch.Generator().manual_seed(200 + seed)) + 0.5).to(device)
            weight, ref_weight, label = case["weight"], case["weight"], None
            names: Sequence[Optional[str]] = [None]   # None: the backend fused_dora_linear resolves
            if quant is not None:
                weight, ref_weight, label = _quantize_case(case, quant)
                names = backends_4bit if backends_4bit is not None else backends_4bit_for(case["x"])
            dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(100 + seed)).to(device, dtype)
            for name in names:
                with _backend(name) if name is not None else contextlib.nullcontext():
                    backend = name or resolve_backend(case["x"])
                    x, A, B, m = (t.clone().requires_grad_(True) for t in (case["x"], case["lora_A"],
                                                                              case["lora_B"], magnitude))
                    mask = None
                    if p > 0:  # the seed the forward draws after manual_seed: the oracle uses the same mask
                        torch.manual_seed(DROPOUT_SEED)
                        mask = keep_mask(backend, draw_seed(x.device), x.shape, p)
                    torch.manual_seed(DROPOUT_SEED)
                    y = fused_dora_linear(x, weight, case["bias"], A, B, m, case["scaling"], dropout_p=p,
                                          training=True)
                    y.backward(dy)
                ref = {k: t.detach().double().requires_grad_(True)
                       for k, t in (("x", case["x"]), ("A", case["lora_A"]), ("B", case["lora_B"]), ("m", magnitude))}
                y_ref = dora_linear_reference(ref["x"], ref_weight.double(), None if case["bias"] is None
                                              else case["bias"].double(), ref["A"], ref["B"], ref["m"],
                                              case["scaling"], keep_mask=mask, dropout_p=p)
                y_ref.backward(dy.double())
                errors = {"y": rel_err(y, y_ref.detach()), "grad_x": rel_err(x.grad, ref["x"].grad),
                          "grad_A": rel_err(A.grad, ref["A"].grad), "grad_B": rel_err(B.grad, ref["B"].grad),
                          "grad_m": rel_err(m.grad, ref["m"].grad)}
                results.append(ParityResult(backend, str(torch.device(device)), dtype_name, lead, K, N, r, bias,
                                            errors, TOL[dtype], quant=label, dropout=p, dora=True))
    return results
