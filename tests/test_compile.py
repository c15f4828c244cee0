"""torch.compile(fullgraph=True) traces FusedLoraLinear and FusedDoraLinear layers without graph breaks (custom ops + fake
impls)."""
import pytest
import torch
import torch.nn as nn

import lora_kernels as lk


def _model(layer=lk.FusedLoraLinear, device="cpu", dtype=torch.float32):
    return nn.Sequential(
        layer(16, 12, r=4, lora_dropout=0.1, init_lora_weights=False, device=device, dtype=dtype),
        nn.GELU(),
        layer(12, 8, bias=False, r=2, init_lora_weights=False, device=device, dtype=dtype),
    )


def _compare(model, compiled, x, tol):
    torch._dynamo.reset()
    xs = [x.detach().clone().requires_grad_(True) for _ in range(2)]
    outs, grads = [], []
    for fn, xi in ((compiled, xs[0]), (model, xs[1])):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout seed for the compiled and the eager step
        y = fn(xi)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert torch.allclose(outs[0], outs[1], atol=tol, rtol=tol)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=tol, rtol=tol)


LAYERS = [lk.FusedLoraLinear, lk.FusedDoraLinear]   # DoRA: its norm, ‖W_o‖², forward and backward are ops too


@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_cpu(backend, layer, monkeypatch):
    """No graph break; the compiled step's outputs and gradients (DoRA's magnitude included) are the eager one's."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    model = _model(layer)
    # aot_eager runs Dynamo and AOTAutograd (where graph breaks and missing fake impls show up) without
    # spending CI time on Inductor's C++ code generation.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _compare(model, compiled, torch.randn(3, 5, 16), 1e-6)
    magnitudes = [p for n, p in model.named_parameters() if "magnitude" in n]
    assert len(magnitudes) == (2 if layer is lk.FusedDoraLinear else 0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in magnitudes)


@pytest.mark.gpu
@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fullgraph_compile_inductor_gpu(dtype, layer):
    model = _model(layer, "cuda", dtype)
    compiled = torch.compile(model, fullgraph=True)
    _compare(model, compiled, torch.randn(4, 64, 16, device="cuda", dtype=dtype), 1e-5 if dtype == torch.float32 else 2e-2)
