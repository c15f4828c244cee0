"""`lora-kernels check`: the fused forward and backward against the float64 oracle, on this machine.

Inputs, oracle, error measure and per-dtype tolerances are reference.py's, the ones the test suite uses,
so a machine that passes here agrees with the tests' notion of correct. The 4-bit (QLoRA) cases quantize W
with bitsandbytes and compare with the oracle on bitsandbytes' own dequantization of it, on every backend
that has 4-bit kernels and can run here, with and without dropout (the oracle takes the backend's mask).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .backends import backends_4bit_for, keep_mask, resolve_backend
from .backends.base import draw_seed
from .functional import from_bnb, fused_lora_linear
from .reference import TOL, make_case, oracle, rel_err

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

    @property
    def label(self) -> str:
        """What the case is beyond its shape: the 4-bit format and dropout (empty for the dense cases)."""
        return (f" weight=4-bit({self.quant})" if self.quant else "") + (f" dropout={self.dropout:g}"
                                                                          if self.dropout else "")

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
