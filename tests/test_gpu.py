"""GPU-only checks of the Triton path: bfloat16 (the interpreter cannot run bf16 tl.dot), Llama-sized
shapes, autocast, and the determinism of the dropout mask on device. Skipped without CUDA."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.backends import gemm_dispatch
from helpers import TOL, keep_mask, make_case, oracle, rel_err, seed_for

pytestmark = pytest.mark.gpu


def _run(case, p, dy, manual_seed=1234):
    x = case["x"].clone().requires_grad_(True)
    A = case["lora_A"].clone().requires_grad_(True)
    B = case["lora_B"].clone().requires_grad_(True)
    torch.manual_seed(manual_seed)
    y = lk.fused_lora_linear(x, case["weight"], case["bias"], A, B, case["scaling"], dropout_p=p)
    y.backward(dy)
    return y, {"x": x.grad, "lora_A": A.grad, "lora_B": B.grad}


@pytest.mark.parametrize("dtype,ab_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                            (torch.float16, torch.float32), (torch.float32, torch.float32)])
@pytest.mark.parametrize("lead,K,N,r", [((37,), 53, 29, 5), ((2, 129), 257, 191, 16), ((3, 5), 96, 80, 200)])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("gemm", ["fused", "split"])
def test_triton_matches_oracle_on_gpu(dtype, ab_dtype, lead, K, N, r, p, gemm, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
    case = make_case(lead, K, N, r, dtype, ab_dtype=ab_dtype, device="cuda")
    dy = torch.randn(*lead, N, device="cuda", dtype=dtype)
    y, grads = _run(case, p, dy)
    mask = keep_mask("triton", seed_for(1234, "cuda"), case["x"].shape, p, "cuda") if p > 0 else None
    y_ref, g_ref = oracle(case, mask, p, dy)
    # TF32 is off by default for matmuls, so float32 runs at IEEE precision (input_precision="ieee").
    tol = TOL[dtype] * (3 if dtype != torch.float32 else 10)
    assert rel_err(y, y_ref) < tol
    for name in grads:
        assert rel_err(grads[name], g_ref[name]) < tol, name


def _assert_matches_fp32_oracle(case, p, dy, y, grads, manual_seed=1234):
    """The oracle in float32 on device (float64 at these sizes is slow), with the mask the run used."""
    mask = keep_mask("triton", seed_for(manual_seed, "cuda"), case["x"].shape, p, "cuda") if p > 0 else None
    c32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    y_ref, g_ref = oracle(c32, mask, p, dy.float())
    assert rel_err(y, y_ref) < 2e-2
    for name in grads:
        assert rel_err(grads[name], g_ref[name]) < 3e-2, name


@pytest.mark.smoke
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("gemm", ["fused", "split"])
def test_llama_shapes_bf16(K, N, gemm, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
    M, r = 2048, 16
    case = make_case((M,), K, N, r, torch.bfloat16, ab_dtype=torch.float32, device="cuda")
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    y, grads = _run(case, 0.1, dy)
    _assert_matches_fp32_oracle(case, 0.1, dy, y, grads)


def test_autocast_bf16_on_gpu():
    layer = lk.FusedLoraLinear(256, 192, r=8, init_lora_weights=False, device="cuda")  # fp32 params
    x = torch.randn(4, 33, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    ref = lk.FusedLoraLinear(256, 192, r=8, device="cuda")
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert rel_err(y, ref.eval()(x).double()) < 3e-2


def test_same_seed_same_step_on_gpu(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    layer = lk.FusedLoraLinear(512, 384, r=16, lora_dropout=0.1, init_lora_weights=False, device="cuda",
                               dtype=torch.bfloat16)
    x = torch.randn(8, 128, 512, device="cuda", dtype=torch.bfloat16)
    results = []
    for _ in range(2):
        layer.zero_grad()
        torch.manual_seed(3)
        y = layer(x)
        y.float().square().sum().backward()
        results.append((y, layer.lora_B.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    # grad_B is summed with float32 atomics across row blocks: equal up to summation order.
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


def test_deterministic_mode_bitwise_on_gpu(monkeypatch):
    """With torch.use_deterministic_algorithms(True), grad_A and grad_B are summed without atomics."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    layer = lk.FusedLoraLinear(1024, 768, r=16, lora_dropout=0.1, init_lora_weights=False, device="cuda",
                               dtype=torch.bfloat16)
    x = torch.randn(8, 256, 1024, device="cuda", dtype=torch.bfloat16)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            layer.zero_grad()
            torch.manual_seed(3)
            layer(x).float().square().sum().backward()
            grads.append((layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.smoke
def test_auto_gemm_measures_each_pass_once_on_gpu(monkeypatch):
    """auto times fused against split (cuBLAS + the in-place LoRA pass) on the first call of a shape, keeps
    the faster, and the chosen path's results match the oracle."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.delenv("LORA_KERNELS_GEMM", raising=False)
    gemm_dispatch.clear_gemm_choices()
    M, K, N, r = 1024, 2048, 1536, 16
    case = make_case((M,), K, N, r, torch.bfloat16, ab_dtype=torch.float32, device="cuda")
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    y, grads = _run(case, 0.1, dy)
    choices = gemm_dispatch.gemm_choices()
    assert sorted(k.pass_name for k in choices) == ["bwd", "fwd"]
    for path, times in choices.values():
        assert path in ("fused", "split") and times[path] == min(times.values()) > 0
    _assert_matches_fp32_oracle(case, 0.1, dy, y, grads)
    y2, _ = _run(case, 0.1, dy)  # same keys: nothing re-measured, the same path gives the same y
    assert gemm_dispatch.gemm_choices() == choices and torch.equal(y, y2)
    gemm_dispatch.clear_gemm_choices()


@pytest.mark.smoke
def test_no_gemm_measuring_while_capturing_a_cuda_graph():
    graph, seen = torch.cuda.CUDAGraph(), []
    buf = torch.zeros(4, device="cuda")
    with torch.cuda.graph(graph):
        seen.append(gemm_dispatch._measurable(torch.device("cuda")))
        buf.add_(1)
    assert seen == [False]
    assert gemm_dispatch._measurable(torch.device("cuda"))
