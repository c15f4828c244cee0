"""Multi-adapter LoRA (fused_multi_lora_linear): a mixed batch of several adapters against one adapter on the
same rows, forward+backward, timed interleaved with the package's one timer (lora_kernels/timing.py).

The target (GPU): 4 adapters of rank 16 mixed in one batch of M = 8192 rows, 4096→4096, bf16:
forward+backward within 1.15× of a single-adapter batch of the same M. Two row layouts:

    training  16 samples × 512 tokens, adapters round-robin per sample: nearly every row tile holds one adapter
    decode    8192 one-token samples, adapters in random order: every row tile holds all four

Without a GPU the case shrinks to a tiny one under Triton's interpreter and only proves the suite runs.
"""
import random

import pytest
import torch
from bench.lkbench import HAS_CUDA

from lora_kernels import AdapterSegments, fused_lora_linear, fused_multi_lora_linear
from lora_kernels.timing import Timer

N_ADAPTERS, RANK = 4, 16
# (M, K, N, dtype, samples) on a GPU; a tiny odd shape on CPU.
CASE = (8192, 4096, 4096, torch.bfloat16) if HAS_CUDA else (48, 40, 36, torch.float32)
LAYOUTS = {"training": 16, "decode": CASE[0]}  # number of samples (rows per sample = M / samples)
TARGET = 1.15


def _tensors(device):
    M, K, N, dtype = CASE
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    x = rnd(M, K)
    weight, bias = rnd(N, K, scale=K ** -0.5), rnd(N)
    As = [rnd(RANK, K, scale=K ** -0.5, dt=torch.float32).requires_grad_(True) for _ in range(N_ADAPTERS)]
    Bs = [rnd(N, RANK, scale=RANK ** -0.5, dt=torch.float32).requires_grad_(True) for _ in range(N_ADAPTERS)]
    return x, weight, bias, As, Bs, rnd(M, N)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixed_batch_vs_single_adapter(benchmark, device, layout):
    x, weight, bias, As, Bs, dy = _tensors(device)
    samples = LAYOUTS[layout]
    order = [i % N_ADAPTERS for i in range(samples)]
    if layout == "decode":
        random.Random(0).shuffle(order)
    segments = AdapterSegments(order)
    scalings, ps = [2.0] * N_ADAPTERS, [0.1] * N_ADAPTERS
    xs = x.view(samples, -1, x.shape[-1])
    dys = dy.view(samples, -1, dy.shape[-1])

    def single(_):
        y = fused_lora_linear(xs, weight, bias, As[0], Bs[0], 2.0, dropout_p=0.1)
        torch.autograd.grad(y, [As[0], Bs[0]], dys)

    def multi(_):
        y = fused_multi_lora_linear(xs, weight, bias, As, Bs, scalings, ps, segments)
        torch.autograd.grad(y, As + Bs, dys)

    timer = Timer(device, warmup=3 if HAS_CUDA else 1, reps=20 if HAS_CUDA else 1)
    stats = timer.compare({"single": (single, None), "multi": (multi, None)})
    ratio = stats["multi"]["median_ms"] / stats["single"]["median_ms"]
    benchmark.group = f"multi-adapter {layout}"
    benchmark.extra_info.update(M=CASE[0], K=CASE[1], N=CASE[2], dtype=str(CASE[3]), adapters=N_ADAPTERS, r=RANK,
                                layout=layout, timer=timer.method, multi_over_single=round(ratio, 3),
                                **{f"{k}_median_ms": round(v["median_ms"], 4) for k, v in stats.items()})
    benchmark.pedantic(multi, args=(None,), rounds=1, iterations=1)
    if HAS_CUDA:
        assert ratio <= TARGET, f"mixed {N_ADAPTERS}-adapter batch {ratio:.3f}× a single adapter (target {TARGET}×)"
