"""Bad input gets a ValueError that names the argument, raised before any kernel launch."""
import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels.backends import FUNCTIONS


def args(**over):
    base = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_A=torch.randn(2, 8),
                lora_B=torch.randn(6, 2), scaling=2.0, dropout_p=0.1)
    base.update(over)
    return base


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        lk.FusedLoraLinear(8, 4, r=r)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, "0.1"])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match="lora_dropout must be a number in \\[0, 1\\)"):
        lk.FusedLoraLinear(8, 4, lora_dropout=p)
    with pytest.raises(ValueError, match="dropout_p must be a number in \\[0, 1\\)"):
        lk.fused_lora_linear(**args(dropout_p=p))


def test_bad_layer_sizes_and_init():
    with pytest.raises(ValueError, match="in_features"):
        lk.FusedLoraLinear(0, 4)
    with pytest.raises(ValueError, match="init_lora_weights"):
        lk.FusedLoraLinear(8, 4, init_lora_weights="olora")
    with pytest.raises(ValueError, match="nn.Linear"):
        lk.FusedLoraLinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mismatched_last_dim_names_both_sizes(backend, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    launched = []
    for fn in FUNCTIONS.values():
        monkeypatch.setattr(fn, "apply", lambda *a: launched.append(a))
    layer = lk.FusedLoraLinear(8, 4, r=2)
    with pytest.raises(ValueError, match=r"last dimension is 7 but weight has in_features=8"):
        layer(torch.randn(3, 7))
    assert launched == []


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_input(dtype):
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        lk.fused_lora_linear(**args(x=torch.zeros(4, 8).to(dtype)))


@pytest.mark.parametrize("over,message", [
    (dict(lora_A=torch.randn(2, 9)), r"lora_A must have shape \(r, 8\)"),
    (dict(lora_B=torch.randn(6, 3)), r"lora_B must have shape \(6, 2\)"),
    (dict(bias=torch.randn(5)), r"bias must be None or a tensor of shape \(6,\)"),
    (dict(weight=torch.randn(6, 8, 1)), "weight must be 2-D"),
    (dict(scaling=float("nan")), "scaling must be a finite number"),
    (dict(scaling=torch.ones(2)), r"0-dim floating-point tensor, got a tensor of shape \(2,\)"),
    (dict(scaling=True), "scaling must be a finite number"),
    (dict(x=torch.randn(4, 8, dtype=torch.float16)), "x has dtype torch.float16 but weight has torch.float32"),
])
def test_bad_arguments(over, message):
    with pytest.raises(ValueError, match=message):
        lk.fused_lora_linear(**args(**over))


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cublas")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND='cublas'"):
        lk.fused_lora_linear(**args())


def test_explicit_backend_never_falls_back(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    with pytest.raises(ValueError, match="Triton backend supports float16, bfloat16 and float32"):
        lk.fused_lora_linear(**{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args().items()})
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        lk.fused_lora_linear(**args())


def test_auto_backend_choice(monkeypatch):
    x = torch.randn(2, 2)
    assert lk.resolve_backend(x) == "triton"  # CPU under TRITON_INTERPRET=1 (tests/conftest.py)
    assert lk.resolve_backend(x.double()) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert lk.resolve_backend(x) == "torch"


def test_bfloat16_on_cpu_never_runs_the_interpreter(monkeypatch):
    """Triton's interpreter computes bfloat16 tl.dot wrongly (garbage, not rounding): auto takes the torch
    backend for bf16 on CPU, and an explicit triton request says why it cannot."""
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert lk.resolve_backend(x) == "torch"
    assert lk.resolve_backend(x.half()) == "triton"
    bf16 = {k: (v.bfloat16() if isinstance(v, torch.Tensor) else v) for k, v in args(dropout_p=0.0).items()}
    want = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in bf16.items()}
    y = lk.fused_lora_linear(**bf16)
    assert torch.allclose(y.double(), lk.fused_lora_linear(**want), atol=5e-2, rtol=5e-2)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    with pytest.raises(ValueError, match="interpreter.*bfloat16"):
        lk.fused_lora_linear(**bf16)


def test_cuda_backend_without_extension_raises(monkeypatch):
    from lora_kernels.backends.cuda import extension_available

    if extension_available():
        pytest.skip("the CUDA extension is built here")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not built"):
        lk.fused_lora_linear(**args())
