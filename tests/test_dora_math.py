"""DoRA's math (backends/dora.py, functional.fused_dora_linear) against the float64 oracle of PEFT's formula
(reference.dora_linear_reference): the norm identity without B·A, outputs and gradients with and without
dropout (the torch backend's mask, regenerated from the seed), and that no (out × in) tensor is allocated."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_kernels.backends import keep_mask
from lora_kernels.backends.dora import ROW_BLOCK, dora_norm, weight_sq_norm
from lora_kernels.functional import fused_dora_linear
from lora_kernels.reference import dora_linear_reference, dora_weight_norm_reference, make_case

M_LEAD, K, N, R = (3, 5), 37, 29, 4


def _case(dtype=torch.float32, bias=True, seed=0):
    case = make_case(M_LEAD, K, N, R, dtype, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    case["magnitude"] = (torch.rand(N, generator=g) + 0.5).to(dtype)
    return case


def _oracle(case, keep=None, p=0.0, dy=None):
    t = {k: (v.detach().double().requires_grad_(k in ("x", "lora_A", "lora_B", "magnitude"))
             if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    y = dora_linear_reference(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"],
                              t["scaling"], keep_mask=keep, dropout_p=p)
    y.backward(dy.double())
    return y.detach(), {k: t[k].grad for k in ("x", "lora_A", "lora_B", "magnitude")}


def _run(case, p=0.0, training=True, seed=0):
    t = {k: (v.detach().clone().requires_grad_(k in ("x", "lora_A", "lora_B", "magnitude"))
             if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    torch.manual_seed(seed)
    y = fused_dora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"],
                          t["scaling"], dropout_p=p, training=training)
    return t, y


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


TOLS = {torch.float32: (2e-6, 5e-6), torch.float16: (2e-3, 4e-3)}
BACKENDS = [("torch", torch.float32), ("triton", torch.float32), ("triton", torch.float16)]  # triton: interpreter


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p,training", [(0.0, True), (0.3, False), (0.3, True)])
def test_dora_matches_float64_oracle(p, training, bias, backend, dtype, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    case = _case(dtype, bias=bias)
    if dtype != torch.float32:
        case["lora_A"], case["lora_B"], case["magnitude"] = (case[k].float() for k in ("lora_A", "lora_B",
                                                                                      "magnitude"))
    t, y = _run(case, p, training, seed=7)
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = None
    if p > 0 and training:
        torch.manual_seed(7)  # the forward's one draw: its seed, then the backend's mask from it
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
        keep = keep_mask(backend, seed, case["x"].shape, p)
        assert 0 < (~keep).sum() < keep.numel()
    want, grads = _oracle(case, keep, p if keep is not None else 0.0, dy)
    tol_y, tol_g = TOLS[dtype]
    assert _rel(y, want) < tol_y
    for k in ("x", "lora_A", "lora_B", "magnitude"):
        assert _rel(t[k].grad, grads[k]) < tol_g, k
    if not bias or dtype != torch.float32:
        return
    # The bias is outside g (PEFT): with dropout off, y − b scales with m.
    if keep is None:
        c2 = dict(case, magnitude=case["magnitude"] * 2)
        _, y2 = _run(c2, p, training)
        torch.testing.assert_close(y2 - case["bias"], 2 * (y - case["bias"]).detach(), rtol=1e-5, atol=1e-6)


def test_dropout_reproducible_and_fresh_per_step(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    case = _case()
    _, y1 = _run(case, 0.5, seed=3)
    _, y2 = _run(case, 0.5, seed=3)
    _, y3 = _run(case, 0.5, seed=4)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.allclose(y1, y3)


def test_dora_at_init_equals_base():
    """PEFT's init: m = ‖W‖ per row and B = 0 give g = 1, so the layer starts as its base."""
    case = _case()
    case["lora_B"] = torch.zeros_like(case["lora_B"])
    case["magnitude"] = weight_sq_norm(case["weight"]).sqrt()
    _, y = _run(case)
    torch.testing.assert_close(y, torch.nn.functional.linear(case["x"], case["weight"], case["bias"]).detach(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_identity_ill_conditioned(dtype):
    """Rows of W whose norms span 1e-4..1e4 and a near-singular spectrum; one row that the adapter nearly
    cancels. Per row, the float32 identity must sit within a few float32 ulps of ‖W_o‖² + s²‖B_o·A‖² from the
    float64 norm of the explicit matrix (the cancellation row has no better bound in any float32 method)."""
    out, inn, r, s = 2 * ROW_BLOCK + 3, 40, 6, 2.0  # > 2 row blocks: the half-precision path is chunked
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(out, inn, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inn, inn, generator=g, dtype=torch.float64))
    sv = torch.logspace(0, -6, inn, dtype=torch.float64)
    W = (u * sv) @ v.t() * torch.logspace(-4, 4, out, dtype=torch.float64)[:, None]
    A = torch.randn(r, inn, generator=g, dtype=torch.float64)
    B = torch.randn(out, r, generator=g, dtype=torch.float64) * 1e-2
    # Row 5: W_5 = −s·B_5·A + tiny, so ‖W_5 + s·B_5·A‖ ≪ ‖W_5‖.
    W[5] = -s * (B[5] @ A) + 1e-3 * torch.randn(inn, generator=g, dtype=torch.float64)
    Wd, Ad, Bd = W.to(dtype), A.float(), B.float()
    got = dora_norm(Wd, weight_sq_norm(Wd), Ad, Bd, s).double()
    want = dora_weight_norm_reference(Wd.double(), Ad.double(), Bd.double(), s)
    scale = Wd.double().pow(2).sum(1) + (s * (Bd.double() @ Ad.double())).pow(2).sum(1)
    err_sq = (got.pow(2) - want.pow(2)).abs()
    assert (err_sq <= 64 * torch.finfo(torch.float32).eps * scale).all()
    rel = (got - want).abs() / want
    assert rel[torch.arange(out) != 5].max() < 1e-5
    assert got.dtype == torch.float64 and torch.isfinite(got).all()


class AllocSpy(TorchDispatchMode):
    """The shapes of every tensor an op returns in fresh storage (views and in-place results excluded). The
    package's custom ops are opened: their own torch calls run under the spy, so what they allocate inside is
    seen (a dispatch mode otherwise sees an opaque op's outputs only)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lora_kernels":
            from torch._library.custom_ops import _maybe_get_opdef

            with self:
                return _maybe_get_opdef(func._name)._init_fn(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.shapes.append((str(func), tuple(o.shape)))
        return out

    @property
    def largest(self) -> int:
        """The element count of the largest fresh tensor seen (0 for none)."""
        return max((math.prod(shape) for _, shape in self.shapes), default=0)


def _big(shapes, out, inn):
    return [(f, s) for f, s in shapes if len(s) == 2 and set(s) == {out, inn}]


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("triton", torch.float32)])
def test_no_out_by_in_tensor_allocated(p, backend, dtype, monkeypatch):
    """Forward + backward allocate nothing of W's size (M is neither out nor in); PEFT's DoRA does (B·A)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    out, inn = 2 * ROW_BLOCK + 4, 33
    case = make_case((11,), inn, out, 3, dtype, ab_dtype=torch.float32)
    x = case["x"].requires_grad_(True)
    A, B = case["lora_A"].requires_grad_(True), case["lora_B"].requires_grad_(True)
    m = torch.rand(out).requires_grad_(True)
    with AllocSpy() as spy:
        y = fused_dora_linear(x, case["weight"], case["bias"], A, B, m, 1.5, dropout_p=p, training=True)
        y.float().square().sum().backward()
    assert spy.shapes and not _big(spy.shapes, out, inn), _big(spy.shapes, out, inn)[:3]
    assert all(t.grad is not None for t in (x, A, B, m))

    from peft.tuners.lora.dora import DoraLinearLayer

    base = torch.nn.Linear(inn, out).to(dtype)
    la, lb = torch.nn.Linear(inn, 3, bias=False), torch.nn.Linear(3, out, bias=False)
    dora = DoraLinearLayer(fan_in_fan_out=False)
    dora.update_layer(base_layer=base, lora_A=la.weight, lora_B=lb.weight, scaling=1.5)
    with AllocSpy() as spy:
        dora(x.detach().float(), lora_A=la, lora_B=lb, scaling=1.5, base_layer=base).sum().backward()
    assert _big(spy.shapes, out, inn)  # the spy sees what it looks for
