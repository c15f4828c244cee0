"""QLoRA forward/backward of every backend against the float64 oracle (reference.py) with W = bitsandbytes'
dequantization of the 4-bit weight, plus what is saved for backward, where W is dequantized, and torch.compile.

As in test_parity.py: the Triton path runs the real kernels (interpreter on CPU) in float32 and float16, with
both GEMM paths (fused: W dequantized tile by tile in registers; split: dequantized once to a buffer + torch.mm);
bfloat16 runs on the torch path here and on Triton in the GPU tests at the bottom.
"""
import pytest
import torch

import lora_kernels as lk
from helpers import TOL, assert_matches_oracle, keep_mask, make_case, oracle, rel_err, seed_for
from test_memory import saved_activation_bytes

bf = pytest.importorskip("bitsandbytes.functional")

from lora_kernels.ops.format_4bit import from_bnb  # noqa: E402

CASES = [
    # lead dims, K, N, r, quant_type, double_quant, blocksize
    ((37,), 53, 29, 5, "nf4", True, 64),        # odd everything; blocks span rows (K < blocksize, N·K odd)
    ((2, 3, 7), 40, 33, 16, "fp4", False, 32),  # leading dims, FP4, smallest blocksize
    ((9,), 36, 20, 70, "nf4", False, 256),      # r > 64
    ((19,), 130, 24, 1, "fp4", True, 128),      # r = 1, K > BLOCK_K
    ((13,), 128, 24, 8, "nf4", True, 64),       # K a multiple of blocksize: one scale per row of a W tile
    ((6,), 64, 40, 4, "fp4", False, 32),        # the same with a tile as wide as a block
]
BACKEND_DTYPES = [("triton", torch.float32, "fused"), ("triton", torch.float16, "fused"),
                  ("triton", torch.float32, "split"), ("triton", torch.float16, "split"),
                  ("torch", torch.float32, None), ("torch", torch.bfloat16, None), ("torch", torch.float16, None)]


def qlora_case(lead, K, N, r, dtype, quant_type, double_quant, blocksize, bias=True, device="cpu", seed=0):
    """make_case with W replaced by its 4-bit quantization: ("qweight" for the kernels, "weight" = bnb's
    dequantization of it for the oracle)."""
    case = make_case(lead, K, N, r, dtype, ab_dtype=torch.float32 if dtype != torch.float32 else None, bias=bias,
                     seed=seed, device=device)
    packed, qs = bf.quantize_4bit(case["weight"], blocksize=blocksize, compress_statistics=double_quant,
                                  quant_type=quant_type)
    case["qweight"] = from_bnb(packed, qs)
    case["weight"] = bf.dequantize_4bit(packed, qs)
    return case


def run(case, p, dy, manual_seed=1234):
    x = case["x"].detach().clone().requires_grad_(True)
    A = case["lora_A"].detach().clone().requires_grad_(True)
    B = case["lora_B"].detach().clone().requires_grad_(True)
    bias = None if case["bias"] is None else case["bias"].detach().clone().requires_grad_(True)
    torch.manual_seed(manual_seed)
    y = lk.fused_lora_linear(x, case["qweight"], bias, A, B, case["scaling"], dropout_p=p)
    y.backward(dy)
    return y, {"x": x.grad, "lora_A": A.grad, "lora_B": B.grad, "bias": None if bias is None else bias.grad}


@pytest.mark.parametrize("backend,dtype,gemm", BACKEND_DTYPES)
@pytest.mark.parametrize("lead,K,N,r,quant_type,double_quant,blocksize", CASES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_qlora_matches_oracle(backend, dtype, gemm, lead, K, N, r, quant_type, double_quant, blocksize, p,
                              monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    if gemm is not None:
        monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
    case = qlora_case(lead, K, N, r, dtype, quant_type, double_quant, blocksize)
    dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    y, grads = run(case, p, dy)
    assert y.shape == (*lead, N)
    assert_matches_oracle(backend, case, p, dy, y, grads)
    tol = TOL[dtype]
    assert rel_err(grads["bias"], dy.double().reshape(-1, N).sum(0)) < tol


def test_params4bit_is_accepted_and_cuda_backend_refuses(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    w = bnb.nn.Params4bit(torch.randn(24, 40), requires_grad=False, quant_type="nf4")._quantize("cpu")
    x, A, B = torch.randn(3, 40), torch.randn(4, 40), torch.randn(24, 4)
    y = lk.fused_lora_linear(x, w, None, A, B, 0.5)
    want = x @ bf.dequantize_4bit(w.data, w.quant_state).t() + 0.5 * (x @ A.t()) @ B.t()
    assert rel_err(y, want.double()) < TOL[torch.float32]
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="no 4-bit"):
        lk.fused_lora_linear(x, w, None, A, B, 0.5)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    with pytest.raises(ValueError, match="x's last dimension is 41"):
        lk.fused_lora_linear(torch.randn(3, 41), w, None, torch.randn(4, 41), B, 0.5)


@pytest.mark.parametrize("as_params4bit", [True, False], ids=["Params4bit", "QuantizedWeight"])
def test_multi_adapter_refuses_a_4bit_base(as_params4bit):
    """Several adapters in one batch over a 4-bit base are not implemented: a clear ValueError, never a wrong y."""
    from lora_kernels.functional import AdapterSegments, fused_multi_lora_linear

    bnb = pytest.importorskip("bitsandbytes")
    w = bnb.nn.Params4bit(torch.randn(24, 40), requires_grad=False, quant_type="nf4")._quantize("cpu")
    weight = w if as_params4bit else from_bnb(w)
    x = torch.randn(2, 3, 40)
    As, Bs = [torch.randn(4, 40), torch.randn(2, 40)], [torch.randn(24, 4), torch.randn(24, 2)]
    segments = AdapterSegments([0, 1])
    with pytest.raises(ValueError, match=r"fused_multi_lora_linear does not support a 4-bit \(QLoRA\) base"):
        fused_multi_lora_linear(x, weight, None, As, Bs, [0.5, 1.0], [0.0, 0.0], segments)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_saved_for_backward_is_x_and_shrink_only(backend, monkeypatch):
    """Saved: x, the (M, r) shrink, the seed and the 4-bit weight's own tensors; never a dequantized W."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    case = qlora_case((2, 30), 48, 40, 4, torch.float32, "nf4", True, 64)
    qw = case["qweight"]
    x = case["x"].clone().requires_grad_(True)
    A, B = case["lora_A"].clone().requires_grad_(True), case["lora_B"].clone().requires_grad_(True)
    params = [A, B, case["bias"]] + [t for t in qw.tensors() if t is not None]
    _, _, storages = saved_activation_bytes(
        lambda t: lk.fused_lora_linear(t, qw, case["bias"], A, B, 2.0, dropout_p=0.1), params, x)
    x_bytes = x.numel() * x.element_size()
    assert storages.pop(x.untyped_storage().data_ptr()) == x_bytes
    assert sorted(storages.values()) == [8, 60 * 4 * 4], storages   # the seed and xa (M = 60, r = 4)


def test_fused_path_never_materialises_w(monkeypatch):
    """The fused Triton path dequantizes in registers only: both W-sized dequantizations are forbidden here."""
    import lora_kernels.backends.torch as torch_backend
    import lora_kernels.ops.lora_linear_bwd_dx as bwd_dx
    import lora_kernels.ops.lora_linear_fwd as fwd

    case = qlora_case((11,), 40, 24, 4, torch.float32, "nf4", True, 64)

    def forbidden(*args, **kwargs):
        raise AssertionError("W was dequantized to a buffer on the fused path")

    for module in (fwd, bwd_dx):
        monkeypatch.setattr(module, "dequantize_4bit", forbidden)
    monkeypatch.setattr(torch_backend, "dequantize", forbidden)
    monkeypatch.setattr(bf, "dequantize_4bit", forbidden)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", "fused")
    run(case, 0.1, torch.randn(11, 24))
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")   # the spy itself can fail
    with pytest.raises(AssertionError, match="dequantized to a buffer"):
        run(case, 0.1, torch.randn(11, 24))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile(backend, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    case = qlora_case((3, 5), 16, 12, 4, torch.float32, "fp4", True, 64)
    qw = case["qweight"]
    A, B = case["lora_A"].clone().requires_grad_(True), case["lora_B"].clone().requires_grad_(True)

    def step(x):
        return lk.fused_lora_linear(x, qw, case["bias"], A, B, 1.5, dropout_p=0.1)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        x = case["x"].clone().requires_grad_(True)
        A.grad = B.grad = None
        torch.manual_seed(0)
        y = fn(x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad, A.grad.clone(), B.grad.clone()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gemm", ["fused", "split"])
@pytest.mark.parametrize("lead,K,N,r,quant_type,double_quant,blocksize", CASES + [((2, 129), 257, 191, 16, "nf4",
                                                                                   True, 64)])
def test_qlora_matches_oracle_on_gpu(dtype, gemm, lead, K, N, r, quant_type, double_quant, blocksize, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
    case = qlora_case(lead, K, N, r, dtype, quant_type, double_quant, blocksize, device="cuda")
    dy = torch.randn(*lead, N, device="cuda", dtype=dtype)
    y, grads = run(case, 0.1, dy)
    y_ref, g_ref = oracle(case, keep_mask("triton", seed_for(1234, "cuda"), case["x"].shape, 0.1, "cuda"), 0.1, dy)
    tol = TOL[dtype] * (3 if dtype != torch.float32 else 10)
    assert rel_err(y, y_ref) < tol
    for name in ("x", "lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequant_bit_exact_on_gpu(quant_type, double_quant, dtype):
    """Against bnb's CUDA kernel, signs of zeros included (the FMA-contraction guard of ops/dequant_4bit.py)."""
    from lora_kernels.ops.dequant_4bit import dequantize_4bit

    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for blocksize in (32, 64, 128, 256, 4096):
        w = torch.randn(257, 4100, device="cuda", dtype=dtype)
        packed, qs = bf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
        want = bf.dequantize_4bit(packed, qs)
        got = dequantize_4bit(from_bnb(packed, qs), dtype)
        assert torch.equal(got.view(bits), want.view(bits)), blocksize
