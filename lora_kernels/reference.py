"""The oracle: the LoRA linear written out in plain PyTorch, and how close a backend must come to it.

    y = x·Wᵀ + b + s · (dropout_p(x)·Aᵀ)·Bᵀ

`lora_linear_reference` is the formula (run it on float64 copies); `oracle` gives its output and gradients
for a case from `make_case`; `rel_err` and `TOL` are the comparison the tests and `lora-kernels check` use.
"""
from typing import Optional

import torch
import torch.nn.functional as F

def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, keep_mask: Optional[torch.Tensor] = None,
                          dropout_p: float = 0.0):
    """The formula, in the dtype of its inputs (tests pass float64 copies).

    keep_mask: bool tensor of x's shape, True where x is kept; None means no dropout.
    """
    dropped = x if keep_mask is None else x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropped, lora_A), lora_B)


# Max error relative to the oracle's largest magnitude, per activation dtype.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def make_case(lead, K, N, r, dtype, ab_dtype=None, bias=True, seed=0, device="cpu"):
    """Random inputs of fused_lora_linear for x of shape (*lead, K), scaled so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    ab_dtype = ab_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    return {
        "x": rnd(*lead, K),
        "weight": rnd(N, K, scale=K ** -0.5),
        "bias": rnd(N) if bias else None,
        "lora_A": rnd(r, K, scale=K ** -0.5, dt=ab_dtype),
        "lora_B": rnd(N, r, scale=r ** -0.5, dt=ab_dtype),
        "scaling": 1.5,
    }


def oracle(case, mask=None, p=0.0, dy=None):
    """float64 y and, if dy is given, grads of x, lora_A, lora_B."""
    t = {k: (v.detach().double() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    for k in ("x", "lora_A", "lora_B"):
        t[k].requires_grad_(True)
    y = lora_linear_reference(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scaling"],
                              keep_mask=mask, dropout_p=p)
    if dy is None:
        return y.detach(), None
    y.backward(dy.double())
    return y.detach(), {k: t[k].grad for k in ("x", "lora_A", "lora_B")}


def rel_err(got, want):
    """Max error of `got` against the float64 `want`, relative to want's largest magnitude (floor 1)."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


# Several adapters in one batch (functional.fused_multi_lora_linear), written row by row.

def multi_lora_linear_reference(x, weight, bias, lora_As, lora_Bs, scalings, row_adapter, keep_mask=None,
                                dropout_ps=None):
    """y[m] = x[m]·Wᵀ + b + s_a·(dropout_{p_a}(x[m])·A_aᵀ)·B_aᵀ with a = row_adapter[m]; -1 (or an adapter
    given as None) adds nothing. keep_mask: bool, x's shape, True where kept; None means no dropout."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    keep2 = None if keep_mask is None else keep_mask.reshape(-1, K)
    rows = []
    for m, a in enumerate(int(a) for a in row_adapter):
        y_m = F.linear(x2[m], weight, bias)
        if a >= 0 and lora_As[a] is not None:
            x_m = x2[m] if keep2 is None else x2[m] * keep2[m].to(x.dtype) / (1.0 - dropout_ps[a])
            y_m = y_m + scalings[a] * F.linear(F.linear(x_m, lora_As[a]), lora_Bs[a])
        rows.append(y_m)
    return torch.stack(rows).reshape(*x.shape[:-1], N)


def make_multi_case(lead, K, N, ranks, dtype, ab_dtype=None, bias=True, seed=0):
    """Random inputs of fused_multi_lora_linear: x (*lead, K), one (A, B, scaling) per rank in `ranks`."""
    g = torch.Generator().manual_seed(seed)
    ab_dtype = ab_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    return {
        "x": rnd(*lead, K),
        "weight": rnd(N, K, scale=K ** -0.5),
        "bias": rnd(N) if bias else None,
        "lora_As": [rnd(r, K, scale=K ** -0.5, dt=ab_dtype) for r in ranks],
        "lora_Bs": [rnd(N, r, scale=r ** -0.5, dt=ab_dtype) for r in ranks],
        "scalings": [0.5 + 0.25 * i for i in range(len(ranks))],  # distinct per adapter
    }


def multi_oracle(case, row_adapter, mask=None, dropout_ps=None, dy=None):
    """float64 y and, if dy is given, grads {"x": ..., "lora_As": [...], "lora_Bs": [...]}."""
    def d(t):
        return None if t is None else t.detach().double().requires_grad_(True)

    x, As, Bs = d(case["x"]), [d(A) for A in case["lora_As"]], [d(B) for B in case["lora_Bs"]]
    bias = None if case["bias"] is None else case["bias"].double()
    y = multi_lora_linear_reference(x, case["weight"].double(), bias, As, Bs, case["scalings"], row_adapter, mask,
                                    dropout_ps)
    if dy is None:
        return y.detach(), None
    y.backward(dy.double())
    zeros = lambda t: None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t))  # noqa: E731
    return y.detach(), {"x": x.grad, "lora_As": [zeros(A) for A in As], "lora_Bs": [zeros(B) for B in Bs]}


def grouped_lora_reference(x, top_k_index, weight, bias, lora_A, lora_B, scaling, keep_mask=None,
                           dropout_p: float = 0.0, transposed: bool = False):
    """One MoE expert projection pair by pair, in the dtype of its inputs (tests pass float64 copies): for token
    t and slot j routed to expert e, row (t, j) of the (T, k, out) result is the LoRA linear of x[t] with expert
    e's W_e, b_e, A_e (rows e·r…e·r+r-1 of lora_A) and B_e (columns e, E+e, … of lora_B: PEFT's layout).

    keep_mask: (T, k, in) bool, the pair's own dropout mask; None means no dropout.
    """
    E = weight.shape[0]
    r = lora_A.shape[0] // E
    T, k = top_k_index.shape
    out = []
    for t in range(T):
        row = []
        for j in range(k):
            e = int(top_k_index[t, j])
            w = weight[e].t() if transposed else weight[e]
            A = lora_A[e * r:(e + 1) * r]
            B = lora_B[:, e::E]
            keep = None if keep_mask is None else keep_mask[t, j]
            b = None if bias is None else bias[e]
            row.append(lora_linear_reference(x[t], w, b, A, B, scaling, keep, dropout_p))
        out.append(torch.stack(row))
    return torch.stack(out)


# DoRA (PEFT's use_dora=True), written out the way PEFT does it: ΔW = B·A built, the norm of W + s·ΔW per row.

def dora_weight_norm_reference(weight, lora_A, lora_B, scaling):
    """‖W_o + s·B_o·A‖ per output row, from the full (out, in) matrix (the oracle may build it)."""
    return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dora_linear_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling,
                          keep_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0):
    """PEFT's DoRA forward in the dtype of its inputs: g = m / n with n detached, then
    y = x·Wᵀ + b + (g − 1)·(xd·Wᵀ) + g·s·(xd·Aᵀ)·Bᵀ with dropout (keep_mask given), else g·(x·Wᵀ + s·x·Aᵀ·Bᵀ) + b."""
    g = magnitude / dora_weight_norm_reference(weight, lora_A, lora_B, scaling).detach()
    if keep_mask is None:
        y = g * (F.linear(x, weight) + scaling * F.linear(F.linear(x, lora_A), lora_B))
        return y if bias is None else y + bias
    xd = x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    return (F.linear(x, weight, bias) + (g - 1) * F.linear(xd, weight)
            + g * scaling * F.linear(F.linear(xd, lora_A), lora_B))
