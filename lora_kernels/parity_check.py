"""`lora-kernels check`: the fused forward and backward against the float64 oracle, on this machine.

Inputs, oracle, error measure and per-dtype tolerances are reference.py's, the ones the test suite uses,
so a machine that passes here agrees with the tests' notion of correct.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .backends import resolve_backend
from .functional import fused_lora_linear
from .reference import TOL, make_case, oracle, rel_err

# (leading dims of x, K, N, r, bias): odd sizes, none a multiple of a block size.
SHAPES: List[Tuple[tuple, int, int, int, bool]] = [
    ((3, 17), 33, 29, 4, True),
    ((2, 40), 64, 48, 8, False),
    ((1, 31), 19, 70, 1, True),
]


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
