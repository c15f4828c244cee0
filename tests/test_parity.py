"""Forward and backward of every backend against the float64 oracle (reference.py).

The Triton path runs the real kernels (under the interpreter on CPU) in float32 and float16; bfloat16
runs on the torch path here and on Triton only on a GPU (tests/test_gpu.py), because the interpreter
multiplies raw bit patterns for bfloat16 tl.dot.
"""
import pytest
import torch

import lora_kernels as lk
from helpers import TOL, assert_matches_oracle, keep_mask, make_case, oracle, rel_err, seed_for

CASES = [
    # lead dims, K, N, r
    ((37,), 53, 29, 5),         # odd everything, not multiples of any block
    ((2, 3, 7), 40, 33, 16),    # leading dims
    ((19,), 24, 70, 1),         # r = 1
    ((9,), 36, 20, 70),         # r > 64: the kernels loop over rank chunks
]
BACKEND_DTYPES = [("triton", torch.float32), ("triton", torch.float16),
                  ("torch", torch.float32), ("torch", torch.bfloat16), ("torch", torch.float16)]


def run(backend, case, p, training=True, manual_seed=1234, x=None, dy=None, monkeypatch=None):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    x = (case["x"] if x is None else x).detach().clone().requires_grad_(True)
    A = case["lora_A"].detach().clone().requires_grad_(True)
    B = case["lora_B"].detach().clone().requires_grad_(True)
    torch.manual_seed(manual_seed)
    y = lk.fused_lora_linear(x, case["weight"], case["bias"], A, B, case["scaling"], dropout_p=p, training=training)
    grads = None
    if dy is not None:
        y.backward(dy)
        grads = {"x": x.grad, "lora_A": A.grad, "lora_B": B.grad}
    return y, grads


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("lead,K,N,r", CASES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_forward_backward_match_oracle(backend, dtype, lead, K, N, r, p, monkeypatch):
    case = make_case(lead, K, N, r, dtype, bias=(r != 1))
    dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    y, grads = run(backend, case, p, dy=dy, monkeypatch=monkeypatch)
    assert y.shape == (*lead, N)
    assert_matches_oracle(backend, case, p, dy, y, grads)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_adapters_with_half_input(backend, monkeypatch):
    case = make_case((2, 13), 40, 24, 8, torch.float16, ab_dtype=torch.float32)
    dy = torch.randn(2, 13, 24, generator=torch.Generator().manual_seed(3)).half()
    y, grads = run(backend, case, 0.1, dy=dy, monkeypatch=monkeypatch)
    y_ref, g_ref = oracle(case, keep_mask(backend, seed_for(1234), case["x"].shape, 0.1), 0.1, dy)
    assert y.dtype == torch.float16
    assert grads["lora_A"].dtype == torch.float32 and grads["lora_B"].dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[torch.float16]
    for name in ("x", "lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < TOL[torch.float16], name


def _non_contiguous_inputs():
    base = torch.randn(5, 4, 2 * 31, generator=torch.Generator().manual_seed(11))
    return {
        "transposed leading dims": base[..., :31].transpose(0, 1),   # (4, 5, 31), two row groups
        "strided last dim": base[..., ::2],                           # column stride 2
        "sliced rows": base.reshape(20, 62)[::3, 5:36],               # row stride 186, offset start
    }


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", list(_non_contiguous_inputs()))
def test_non_contiguous_input(backend, kind, monkeypatch):
    x = _non_contiguous_inputs()[kind]
    assert not x.is_contiguous()
    case = make_case(x.shape[:-1], 31, 17, 6, torch.float32)
    case["x"] = x
    dy = torch.randn(*x.shape[:-1], 17, generator=torch.Generator().manual_seed(5))
    y, grads = run(backend, case, 0.2, x=x, dy=dy, monkeypatch=monkeypatch)
    y_ref, g_ref = oracle(case, keep_mask(backend, seed_for(1234), x.shape, 0.2), 0.2, dy)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert grads["x"].shape == x.shape
    for name in ("x", "lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < TOL[torch.float32], name


def test_non_contiguous_grad_output(monkeypatch):
    """dy arrives with arbitrary strides (here: a transposed view)."""
    case = make_case((6, 5), 24, 18, 4, torch.float32)
    dy = torch.randn(5, 6, 18, generator=torch.Generator().manual_seed(2)).transpose(0, 1)
    y, grads = run("triton", case, 0.0, dy=dy, monkeypatch=monkeypatch)
    _, g_ref = oracle(case, None, 0.0, dy)
    for name in ("x", "lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < TOL[torch.float32], name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rank_256(backend, monkeypatch):
    case = make_case((11,), 20, 18, 256, torch.float32)
    dy = torch.randn(11, 18, generator=torch.Generator().manual_seed(9))
    y, grads = run(backend, case, 0.0, dy=dy, monkeypatch=monkeypatch)
    y_ref, g_ref = oracle(case, None, 0.0, dy)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    for name in ("x", "lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < TOL[torch.float32], name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_frozen_input_and_frozen_adapter_grads(backend, monkeypatch):
    """Only the gradients that are needed are computed; the others stay None."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    case = make_case((10,), 24, 16, 4, torch.float32)
    A = case["lora_A"].clone().requires_grad_(True)
    B = case["lora_B"].clone()  # frozen
    y = lk.fused_lora_linear(case["x"], case["weight"], case["bias"], A, B, case["scaling"])
    dy = torch.randn_like(y)
    y.backward(dy)
    _, g_ref = oracle(case, None, 0.0, dy)
    assert B.grad is None
    assert rel_err(A.grad, g_ref["lora_A"]) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_trainable_base_weight_and_bias(backend, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    case = make_case((7,), 12, 10, 3, torch.float32)
    W = case["weight"].clone().requires_grad_(True)
    b = case["bias"].clone().requires_grad_(True)
    y = lk.fused_lora_linear(case["x"], W, b, case["lora_A"], case["lora_B"], case["scaling"])
    y.sum().backward()
    assert torch.allclose(W.grad, torch.ones(7, 10).t() @ case["x"], atol=1e-5)
    assert torch.allclose(b.grad, torch.full((10,), 7.0))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    case = make_case((0,), 12, 10, 3, torch.float32)
    x = case["x"].requires_grad_(True)
    A = case["lora_A"].requires_grad_(True)
    y = lk.fused_lora_linear(x, case["weight"], case["bias"], A, case["lora_B"], 2.0, dropout_p=0.1)
    assert y.shape == (0, 10)
    y.sum().backward()
    assert x.grad.shape == (0, 12) and torch.count_nonzero(A.grad) == 0


def test_gradcheck_torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    case = make_case((3, 4), 6, 5, 2, torch.float64)
    x = case["x"].requires_grad_(True)
    W = case["weight"].requires_grad_(True)
    b = case["bias"].requires_grad_(True)
    A = case["lora_A"].requires_grad_(True)
    B = case["lora_B"].requires_grad_(True)

    def f(x, W, b, A, B):
        torch.manual_seed(0)  # every evaluation draws the same dropout mask
        return lk.fused_lora_linear(x, W, b, A, B, 0.7, dropout_p=0.3)

    assert torch.autograd.gradcheck(f, (x, W, b, A, B))
    assert torch.autograd.gradcheck(lambda *a: lk.fused_lora_linear(*a, 0.7), (x, W, b, A, B))


def test_autocast_cpu_bfloat16(monkeypatch):
    """Under autocast the base path runs in the autocast dtype and fp32 adapters are used as they are."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    case = make_case((9,), 16, 12, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lk.fused_lora_linear(case["x"], case["weight"], case["bias"], case["lora_A"], case["lora_B"], 1.5)
    assert y.dtype == torch.bfloat16
    y_ref, _ = oracle(case)
    assert rel_err(y, y_ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_deterministic_mode_same_grads(backend, monkeypatch):
    """Under torch.use_deterministic_algorithms the Triton backward sums grad_A / grad_B per row block
    (no atomics); the result must still match the oracle, with several row blocks contributing."""
    case = make_case((3, 23), 40, 33, 16, torch.float32)
    dy = torch.randn(3, 23, 33, generator=torch.Generator().manual_seed(4))
    torch.use_deterministic_algorithms(True)
    try:
        y, grads = run(backend, case, 0.25, dy=dy, monkeypatch=monkeypatch)
        again = run(backend, case, 0.25, dy=dy, monkeypatch=monkeypatch)[1]
    finally:
        torch.use_deterministic_algorithms(False)
    _, g_ref = oracle(case, keep_mask(backend, seed_for(1234), case["x"].shape, 0.25), 0.25, dy)
    for name in ("x", "lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < TOL[torch.float32], name
        assert torch.equal(grads[name], again[name]), name
