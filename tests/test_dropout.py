"""The dropout contract: seeded, reproducible, the right rate and scale, regenerated (not stored) for backward."""
import pytest
import torch

import lora_kernels as lk
from helpers import TOL, keep_mask, make_case, oracle, rel_err, seed_for

BACKENDS = ["triton", "torch"]


def identity_case(M, K, p):
    """W = 0, A = B = I, scaling 1: y = dropout_p(x) exactly."""
    eye = torch.eye(K)
    return dict(weight=torch.zeros(K, K), bias=None, lora_A=eye.clone(), lora_B=eye.clone(), scaling=1.0,
                dropout_p=p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_rate_and_scale(backend, p, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    x = torch.ones(400, 16)
    torch.manual_seed(0)
    y = lk.fused_lora_linear(x, **identity_case(400, 16, p))
    kept = y != 0
    assert abs(1.0 - kept.float().mean().item() - p) < 0.02
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1.0 / (1.0 - p)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_manual_seed_reproduces_a_step(backend, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    layer = lk.FusedLoraLinear(24, 16, r=4, lora_dropout=0.3, init_lora_weights=False)
    x = torch.randn(3, 8, 24)

    def step():
        layer.zero_grad()
        torch.manual_seed(42)
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    first, second = step(), step()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.manual_seed(43)
    assert not torch.equal(layer(x), first[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_and_p0_draw_no_random_numbers(backend, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    layer = lk.FusedLoraLinear(20, 12, r=4, lora_dropout=0.5, init_lora_weights=False).eval()
    x = torch.randn(6, 20)
    state = torch.get_rng_state()
    y_eval = layer(x)
    assert torch.equal(torch.get_rng_state(), state)
    no_dropout = lk.fused_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                                      dropout_p=0.0, training=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.allclose(y_eval, no_dropout, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_linear_in_x_for_a_fixed_seed(backend, monkeypatch):
    """With the mask fixed by the seed, y - b is linear in x: f(x1) + f(x2) = f(x1 + x2)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    case = make_case((13,), 28, 15, 6, torch.float32, bias=False)
    x1, x2 = torch.randn(13, 28), torch.randn(13, 28)

    def f(x):
        torch.manual_seed(5)
        return lk.fused_lora_linear(x, case["weight"], None, case["lora_A"], case["lora_B"], 2.0, dropout_p=0.4)

    assert torch.allclose(f(x1) + f(x2), f(x1 + x2), atol=1e-5)
    torch.manual_seed(6)
    other = lk.fused_lora_linear(x1 + x2, case["weight"], None, case["lora_A"], case["lora_B"], 2.0, dropout_p=0.4)
    assert not torch.allclose(other, f(x1 + x2), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_regenerates_the_forward_mask(backend, monkeypatch):
    """Random numbers drawn between forward and backward must not change the mask backward uses."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    case = make_case((4, 9), 32, 20, 8, torch.float32)
    x = case["x"].clone().requires_grad_(True)
    A = case["lora_A"].clone().requires_grad_(True)
    B = case["lora_B"].clone().requires_grad_(True)
    seed = seed_for(77)
    torch.manual_seed(77)
    y = lk.fused_lora_linear(x, case["weight"], case["bias"], A, B, case["scaling"], dropout_p=0.3)
    torch.rand(1000)  # move the generator on
    torch.manual_seed(1)
    dy = torch.randn_like(y)
    y.backward(dy)
    _, g_ref = oracle(case, keep_mask(backend, seed, x.shape, 0.3), 0.3, dy)
    for name, got in (("x", x.grad), ("lora_A", A.grad), ("lora_B", B.grad)):
        assert rel_err(got, g_ref[name]) < TOL[torch.float32], name


def test_triton_mask_independent_of_tiles():
    """The mask is a function of (seed, row * K + col) only: any sub-block of it agrees with the whole."""
    from lora_kernels.ops.dropout import dropout_mask

    seed = torch.tensor([12345], dtype=torch.int64)
    full = dropout_mask(seed, 70, 45, 0.3)
    flat = dropout_mask(seed, 1, 70 * 45, 0.3).reshape(70, 45)
    assert torch.equal(full, flat)
    assert not torch.equal(full, dropout_mask(seed + 1, 70, 45, 0.3))
