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


def gpu_tile_configs(monkeypatch):
    """{kernel: the autotune configs a GPU would try} for the four LoRA kernels, with the interpreter's
    single small config switched off, so a test can force each GPU tile shape onto the kernels."""
    from lora_kernels.ops import configs as C
    from lora_kernels.ops.lora_dy_b import _lora_dy_b_kernel
    from lora_kernels.ops.lora_linear_bwd_dx import _lora_linear_bwd_dx_kernel
    from lora_kernels.ops.lora_linear_fwd import _lora_linear_fwd_kernel
    from lora_kernels.ops.lora_shrink import _lora_shrink_kernel

    monkeypatch.setattr(C, "interpreting", lambda: False)
    return {
        _lora_shrink_kernel: C.rowblock_configs("BLOCK_K"),
        _lora_dy_b_kernel: C.rowblock_configs("BLOCK_N"),
        _lora_linear_fwd_kernel: C.gemm_configs(out_block="BLOCK_N", reduce_block="BLOCK_K"),
        _lora_linear_bwd_dx_kernel: C.gemm_configs(out_block="BLOCK_K", reduce_block="BLOCK_N"),
    }


def assert_matches_oracle(backend, case, p, dy, y, grads):
    """y and the grads of x, lora_A, lora_B of a run with manual seed 1234 against the float64 oracle (with the
    mask `backend` drew), within TOL of the input's dtype, each in its own tensor's dtype and shape."""
    dtype = case["x"].dtype
    mask = keep_mask(backend, seed_for(1234), case["x"].shape, p) if p > 0 else None
    y_ref, g_ref = oracle(case, mask, p, dy)
    assert y.dtype == dtype and y.shape == y_ref.shape
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    for name in ("x", "lora_A", "lora_B"):
        assert grads[name].dtype == case[name].dtype
        assert rel_err(grads[name], g_ref[name]) < tol, name


def one_line_error(err: str, command: str = "finetune") -> str:
    """The stderr of a CLI user error: exactly one line `lora-kernels <cmd>: error: ...`, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lora-kernels {command}: error: "), err
    return lines[0]


def finished_run(tmp_path_factory, name: str, flags):
    """A finished `lora-kernels finetune` run (torch backend) in a fresh temporary folder: the module fixture the
    CLI safety tests copy from instead of training again."""
    import pytest

    from lora_kernels.cli import main

    out = tmp_path_factory.mktemp(name) / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_KERNELS_BACKEND", "torch")
    try:
        assert main(["finetune", "--output-dir", str(out), *flags]) == 0
    finally:
        mp.undo()
    return out


def copy_run(run, tmp_path):
    """A copy of `run` at tmp_path/run, for a test that changes or breaks it."""
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def set_checkpointing(model, enable=True, **kwargs):
    """Turns a transformers model's activation checkpointing on or off under the installed version's name:
    `activation_checkpointing_*` from 5.23 (where `gradient_checkpointing_*` warns that it goes in v6), and
    `gradient_checkpointing_*` before (the GPU image's 5.17 has only that)."""
    new = hasattr(model, "activation_checkpointing_enable")
    if not enable:
        return (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    if new:
        return model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
