"""The plain-PyTorch LoRA math: the CPU backend and the oracle of the tests.

    y = x·Wᵀ + b + s · (dropout_p(x)·Aᵀ)·Bᵀ

`lora_linear_reference` is the formula written out, for tests (run it in float64).
`TorchLoraLinear` is the torch backend: an autograd Function with the same memory contract as
the Triton one — it saves x and x·Aᵀ and a seed, never the mask or a dropped copy of x; the mask
is regenerated in backward from a torch.Generator seeded with the forward's seed.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# Seeds are drawn in [0, SEED_BOUND) from torch's generator of x's device.
SEED_BOUND = 2**31 - 1


def draw_seed(device: torch.device) -> torch.Tensor:
    """One int64 seed from the default generator of `device`, left on that device (no host sync)."""
    return torch.randint(0, SEED_BOUND, (1,), device=device, dtype=torch.int64)


def torch_keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The torch backend's dropout mask: a pure function of (seed, shape, device type)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


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


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _empty(like: torch.Tensor) -> torch.Tensor:
    # Custom ops return tensors, not None: an empty tensor stands for "not computed".
    return like.new_empty((0,))


@torch.library.custom_op("lora_kernels::torch_lora_fwd", mutates_args=())
def torch_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                   lora_B: torch.Tensor, scaling: float, dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """(y, xa = dropout(x)·Aᵀ in x's dtype, seed) — the torch backend's forward."""
    dt = x.dtype
    A, B = lora_A.to(dt), lora_B.to(dt)
    if dropout_p > 0.0:
        seed = draw_seed(x.device)
        keep = torch_keep_mask(int(seed.item()), x.shape, dropout_p, x.device)
        xa = F.linear(x * keep.to(dt), A) * (1.0 / (1.0 - dropout_p))
        del keep
    else:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
        xa = F.linear(x, A)
    y = F.linear(x, weight, bias) + scaling * F.linear(xa, B)
    return y, xa, seed


@torch_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty((*x.shape[:-1], lora_A.shape[0])), x.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("lora_kernels::torch_lora_bwd", mutates_args=())
def torch_lora_bwd(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor, weight: torch.Tensor,
                   lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float, need_x: bool,
                   need_a: bool, need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_A, grad_B), each empty when not needed — the torch backend's backward."""
    s, p, dt = scaling, dropout_p, x.dtype
    dy = dy.to(dt)
    A, B = lora_A.to(dt), lora_B.to(dt)
    dy2, x2, xa2 = _flat(dy), _flat(x), _flat(xa)
    keep = None
    if p > 0.0 and (need_x or need_a):
        keep = _flat(torch_keep_mask(int(seed.item()), x.shape, p, x.device)).to(dt) * (1.0 / (1.0 - p))
    dyb = dy2 @ B if (need_x or need_a) else None
    grad_x, grad_a, grad_b = _empty(x), _empty(lora_A), _empty(lora_B)
    if need_x:
        lora_dx = (dyb @ A) * s
        if keep is not None:
            lora_dx = lora_dx * keep
        grad_x = (dy2 @ weight.to(dt) + lora_dx).reshape(x.shape)
    if need_a:
        xd = x2 if keep is None else x2 * keep
        grad_a = ((dyb.t() @ xd) * s).to(lora_A.dtype)
    if need_b:
        grad_b = ((dy2.t() @ xa2) * s).to(lora_B.dtype)
    return grad_x, grad_a, grad_b


@torch_lora_bwd.register_fake
def _(dy, x, xa, seed, weight, lora_A, lora_B, scaling, dropout_p, need_x, need_a, need_b):
    return (x.new_empty(x.shape) if need_x else _empty(x), lora_A.new_empty(lora_A.shape) if need_a else _empty(lora_A),
            lora_B.new_empty(lora_B.shape) if need_b else _empty(lora_B))


def base_grads(dy, x, need_w: bool, need_b: bool, weight_dtype, bias_dtype):
    """Gradients of a trainable base W and b (plain matmuls: rare, and nothing to fuse)."""
    dy2 = _flat(dy)
    grad_w = (dy2.t() @ _flat(x).to(dy2.dtype)).to(weight_dtype) if need_w else None
    grad_b = dy2.sum(0).to(bias_dtype) if (need_b and bias_dtype is not None) else None
    return grad_w, grad_b


def lora_function(name: str, fwd_op, bwd_op, doc: str):
    """An autograd Function over a backend's (fwd_op, bwd_op) custom-op pair, with the shared contract:
    it saves x, xa and the seed (plus the parameters), and computes only the gradients that are needed."""

    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float):
        y, xa, seed = fwd_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
        ctx.save_for_backward(x, xa, seed, weight, lora_A, lora_B)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    def backward(ctx, dy):
        x, xa, seed, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bl = ctx.needs_input_grad[:5]
        with torch.autocast(x.device.type, enabled=False):  # backward may be called inside an autocast region
            grad_x, grad_a, grad_bl = bwd_op(dy, x, xa, seed, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p,
                                             need_x, need_a, need_bl)
            grad_w, grad_bias = base_grads(dy, x, need_w, need_b, weight.dtype, ctx.bias_dtype)
        # The ops return empty tensors for gradients that were not asked for; autograd wants None.
        return (grad_x if need_x else None, grad_w, grad_bias, grad_a if need_a else None,
                grad_bl if need_bl else None, None, None)

    return type(name, (torch.autograd.Function,), {"__doc__": doc, "forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


TorchLoraLinear = lora_function(
    "TorchLoraLinear", torch.ops.lora_kernels.torch_lora_fwd, torch.ops.lora_kernels.torch_lora_bwd,
    "Torch backend. Inputs must already be validated and cast by functional.fused_lora_linear.")
