"""End-to-end pytest-benchmark suite: one training step of a Llama-style model, ours vs PEFT.

Presets: LORA_BENCH_E2E, comma-separated names from bench/lkbench/e2e.py (default llama-2048 on a GPU,
smoke without one). extra_info carries tokens per step and, on a GPU, the peak memory.
"""
import os

import pytest
import torch
from bench.lkbench import e2e as E
from bench.lkbench.memory import MB, free

CUDA = torch.cuda.is_available()
PRESETS = [p for p in os.environ.get("LORA_BENCH_E2E", "llama-2048" if CUDA else "smoke").split(",") if p]
ROUNDS = int(os.environ.get("LORA_BENCH_E2E_ROUNDS", "10" if CUDA else "1"))
WARMUP = int(os.environ.get("LORA_BENCH_E2E_WARMUP", "3" if CUDA else "0"))


@pytest.mark.parametrize("impl", E.E2E_IMPLS)
@pytest.mark.parametrize("preset", PRESETS)
def test_train_step(benchmark, device, preset, impl):
    p = E.PRESETS[preset]
    step, info = E.prepare(impl, p, device)

    def target():
        step()
        if CUDA:
            torch.cuda.synchronize()

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"e2e/{preset}"
    benchmark.extra_info.update(info, preset=preset, tokens_per_step=p.tokens_per_step)
    benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    if CUDA:
        benchmark.extra_info["peak_mb"] = round(torch.cuda.max_memory_allocated() / MB, 1)
    del step
    free(device)
