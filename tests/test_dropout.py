"""The dropout contract: seeded, reproducible, the right rate and scale, regenerated (not stored) for backward."""
import pytest
import torch
import triton  # imported after conftest, which picks Triton's interpreter on a machine without CUDA
import triton.language as tl

import lora_kernels as lk
from lora_kernels.ops.dropout import _dropout_mask_kernel, drop_threshold, dropout_bits, dropout_mask
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
    """The mask is a function of (seed, row, col) only: every tiling of the same (M, K) gives the same mask."""
    seed = torch.tensor([12345], dtype=torch.int64)
    M, K = 70, 45
    full = dropout_mask(seed, M, K, 0.3)
    for bm, bk in ((16, 64), (64, 16), (8, 128)):
        out = torch.empty((M, K), dtype=torch.int8)
        _dropout_mask_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](seed, out, M, K, drop_threshold(0.3),
                                                                       BLOCK_M=bm, BLOCK_K=bk)
        assert torch.equal(out.bool(), full), (bm, bk)
    assert not torch.equal(full, dropout_mask(seed + 1, M, K, 0.3))


@triton.jit
def _bits_tiled_and_direct(seed_ptr, tiled_ptr, direct_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    tiled = dropout_bits(seed, rows, col0, K, BLOCK_K)
    counters = rows.to(tl.int64)[:, None] * ((K + 3) // 4) + (cols // 4)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    lane = (cols % 4)[None, :]
    direct = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    at = rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(tiled_ptr + at, tiled.to(tl.int64), mask=ok)
    tl.store(direct_ptr + at, direct.to(tl.int64), mask=ok)


def test_triton_mask_is_the_documented_function():
    """Element (row, col) uses word col % 4 of tl.randint4x(seed, row * ceil(K / 4) + col // 4), and is kept
    when its top 24 bits reach floor(p * 2**24): checked element by element against the tiled, interleaved
    dropout_bits that the kernels use."""
    M, K = 9, 43  # K % 4 != 0: each row's last group is partly unused
    for seed_value in (7, 2**31 - 2, 2**40 + 3):
        seed = torch.tensor([seed_value], dtype=torch.int64)
        tiled, direct = torch.empty((M, K), dtype=torch.int64), torch.empty((M, K), dtype=torch.int64)
        _bits_tiled_and_direct[(triton.cdiv(M, 4), triton.cdiv(K, 32))](seed, tiled, direct, M, K, BLOCK_M=4, BLOCK_K=32)
        assert torch.equal(tiled, direct)
        assert tiled.min() >= 0 and tiled.max() < 2**32 and tiled.unique().numel() == M * K
        for p in (0.1, 0.5):
            keep = (tiled >> 8) >= drop_threshold(p)
            assert torch.equal(keep, dropout_mask(seed, M, K, p))


def test_drop_threshold_resolution():
    assert drop_threshold(0.0) == 0 and drop_threshold(0.5) == 2**23
    for p in (0.05, 0.1, 0.3, 0.999):
        assert 0 <= p - drop_threshold(p) / 2**24 < 2**-24
