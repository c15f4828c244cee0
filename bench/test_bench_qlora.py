"""QLoRA benchmark cases: one 4-bit LoRA layer, forward and forward+backward, side by side.

    qlora        ours, FusedLoraLinear4bit on the Triton backend, GEMM path chosen per shape (LORA_KERNELS_GEMM=auto)
    qlora_fused  ours, W dequantized tile by tile inside the Triton GEMMs (LORA_KERNELS_GEMM=fused)
    qlora_split  ours, W dequantized once to a buffer by our kernel, cuBLAS GEMM, LoRA term added in place (split)
    peft_qlora   PEFT's lora.bnb.Linear4bit over bitsandbytes' Linear4bit (bnb dequantizes W, cuBLAS, unfused LoRA)
    dense        ours, FusedLoraLinear over the same W in the activation dtype (the ≤ 1.25× target's reference)

Cases: on a GPU the target shapes — NF4 with double quantization, M=8192, 4096→4096 and 4096→14336, r=16, p=0.1,
bf16 activations, fp32 adapters; without one a tiny smoke case under the Triton interpreter. The targets
(GPU, not measured here): qlora fwd+bwd ≥ 1.5× faster than peft_qlora, ≤ 1.25× the time of dense.
Rounds: LORA_BENCH_ROUNDS (default 20 on a GPU), warm-up rounds: LORA_BENCH_WARMUP (default 3).
"""
import functools
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
ROUNDS = int(os.environ.get("LORA_BENCH_ROUNDS", "20" if CUDA else "1"))
WARMUP = int(os.environ.get("LORA_BENCH_WARMUP", "3" if CUDA else "0"))

bnb = pytest.importorskip("bitsandbytes")

import lora_kernels as lk  # noqa: E402
from bench.lkbench.impls import lora_env  # noqa: E402

# (name, M, K, N, r, p, dtype)
CASES = ([("q_proj", 8192, 4096, 4096, 16, 0.1, torch.bfloat16),
          ("up_proj", 8192, 4096, 14336, 16, 0.1, torch.bfloat16)]
         if CUDA else [("tiny", 37, 48, 40, 4, 0.1, torch.float32)])
IMPLS = {
    "qlora": {"LORA_KERNELS_BACKEND": "triton"},
    "qlora_fused": {"LORA_KERNELS_BACKEND": "triton", "LORA_KERNELS_GEMM": "fused"},
    "qlora_split": {"LORA_KERNELS_BACKEND": "triton", "LORA_KERNELS_GEMM": "split"},
    "peft_qlora": None,
    "dense": {"LORA_KERNELS_BACKEND": "triton"},
}


@functools.lru_cache(maxsize=1)
def _layers(case, device):
    """All implementations of one case over the same 4-bit W (dense: its dequantization) and adapter weights."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    name, M, K, N, r, p, dtype = case
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    base.weight = bnb.nn.Params4bit((torch.randn(N, K) / K ** 0.5).to(dtype), requires_grad=False,
                                    quant_type="nf4", compress_statistics=True)
    base = base.to(device)
    ours = lk.FusedLoraLinear.from_linear(base, r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False)
    peft_layer = PeftLinear4bit(base, "default", config=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p), r=r,
                                lora_alpha=2 * r, lora_dropout=p)
    peft_layer.lora_A["default"].weight.data.copy_(ours.lora_A)
    peft_layer.lora_B["default"].weight.data.copy_(ours.lora_B)
    w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
    dense = lk.FusedLoraLinear(K, N, bias=False, r=r, lora_alpha=2 * r, lora_dropout=p, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.lora_A.data = ours.lora_A.detach().clone()
        dense.lora_B.data = ours.lora_B.detach().clone()
    x = torch.randn(M, K, device=device, dtype=dtype)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    return {"qlora": ours, "qlora_fused": ours, "qlora_split": ours, "peft_qlora": peft_layer.train(),
            "dense": dense}, x, dy


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_qlora_layer(benchmark, device, case, impl, pass_):
    pytest.importorskip("peft")
    layers, x, dy = _layers(case, device)
    layer = layers[impl]
    x = x.detach().requires_grad_(True)
    inputs = [x] + [p for p in layer.parameters() if p.requires_grad]

    def target():
        with lora_env(IMPLS[impl]):
            y = layer(x)
            if pass_ == "fwdbwd":
                torch.autograd.grad(y, inputs, dy)
        _sync()

    benchmark.group = f"qlora {case[0]} {pass_}"
    benchmark.extra_info.update(impl=impl, M=case[1], K=case[2], N=case[3], r=case[4], dropout=case[5],
                                dtype=str(case[6]).replace("torch.", ""), quant="nf4+double_quant", pass_=pass_)
    benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    if CUDA and pass_ == "fwdbwd" and not benchmark.disabled:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        target()
        benchmark.extra_info["peak_mb"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 2)
