"""Shared test helpers: inputs, the float64 oracle, and the dropout mask a backend used."""
import torch

from lora_kernels.reference import draw_seed, lora_linear_reference, torch_keep_mask

# Max error relative to the oracle's largest magnitude, per activation dtype.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def make_case(lead, K, N, r, dtype, ab_dtype=None, bias=True, seed=0, device="cpu"):
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


def seed_for(manual_seed, device="cpu"):
    """The seed a forward draws right after torch.manual_seed(manual_seed)."""
    torch.manual_seed(manual_seed)
    return draw_seed(torch.device(device))


def keep_mask(backend, seed, x_shape, p, device="cpu"):
    """The keep-mask (shape x_shape) that `backend` derives from `seed`."""
    if backend == "torch":
        return torch_keep_mask(int(seed.item()), x_shape, p, device)
    from lora_kernels.ops.dropout import dropout_mask

    K = x_shape[-1]
    M = 1
    for s in x_shape[:-1]:
        M *= s
    return dropout_mask(seed, M, K, p).reshape(x_shape)


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
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
