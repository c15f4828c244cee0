"""Shared test helpers: the dropout mask a backend used; inputs, oracle and tolerances come from reference.py."""
import torch

from lora_kernels.backends.base import draw_seed
from lora_kernels.backends.torch import torch_keep_mask
from lora_kernels.reference import TOL, make_case, oracle, rel_err  # noqa: F401


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
