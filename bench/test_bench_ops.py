"""Op-level pytest-benchmark suite: every implementation × forward, backward, forward+backward.

For perf tracking (pytest-benchmark's JSON, --benchmark-compare). The results file with side-by-side
ratios is written by bench/collect.py, which times with CUDA events; here pytest-benchmark's clock
times each round with a device synchronize at its end, and the L2 flush happens in the untimed setup.
Benchmarks are grouped per case and pass, so pytest-benchmark's table compares implementations.
Rounds: LORA_BENCH_ROUNDS (default 20 on a GPU), warm-up rounds: LORA_BENCH_WARMUP (default 3).
"""
import functools
import os

import pytest
import torch
from bench.lkbench import cases as C
from bench.lkbench import impls as I
from bench.lkbench.memory import MB, peak_bytes
from bench.lkbench.ops_bench import PASSES
from lora_kernels.timing import L2_FLUSH_BYTES

CUDA = torch.cuda.is_available()
ROUNDS = int(os.environ.get("LORA_BENCH_ROUNDS", "20" if CUDA else "1"))
WARMUP = int(os.environ.get("LORA_BENCH_WARMUP", "3" if CUDA else "0"))

# Case outermost, so one case's tensors serve all its tests and are then dropped.
PARAMS = [(case, impl, p) for case in C.select() for impl in I.IMPLS for p in PASSES]


@functools.lru_cache(maxsize=1)
def _tensors(case, device):
    return I.make_tensors(case, device)


@functools.lru_cache(maxsize=1)
def _flush_buffer(device):
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if CUDA else None


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def time_built_case(benchmark, device, case, impl, pass_, t, build):
    """Build impl for case on tensors t with build(impl, case, t) (an I.Skip skips the test) and time one pass
    of it: the suites whose builders are not the op suite's (DoRA, MoE experts) run their cases through this."""
    try:
        built = build(impl, case, t)
    except I.Skip as why:
        pytest.skip(f"{impl}: {why}")
    x = t.x.detach().requires_grad_(True)
    inputs = built.grad_inputs(x)
    benchmark.group = f"{case.name} {pass_}"
    benchmark.extra_info.update(case.fields(), impl=impl, pass_=pass_)
    time_pass(benchmark, built, x, inputs, t.dy, pass_, device)


def time_pass(benchmark, built, x, inputs, dy, pass_, device):
    """Time one pass of `built` on x with pytest-benchmark: the L2 flush (and, for the backward alone, its
    forward) in the untimed setup, a device synchronize at the end of each timed round."""
    flush = _flush_buffer(device)

    def setup():
        y = built(x) if pass_ == "bwd" else None  # backward alone: its forward is not timed
        if flush is not None:
            flush.zero_()
        _sync()
        return (y,), {}

    def target(y):
        if pass_ == "fwd":
            built(x)
        elif pass_ == "bwd":
            torch.autograd.grad(y, inputs, dy)
        else:
            torch.autograd.grad(built(x), inputs, dy)
        _sync()

    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


@pytest.mark.parametrize("case,impl,pass_", PARAMS, ids=[f"{c.name}-{i}-{p}" for c, i, p in PARAMS])
def test_op(benchmark, device, case, impl, pass_):
    t = _tensors(case, device)
    try:
        built = I.build(impl, case, t)
    except I.Skip as why:
        pytest.skip(f"{impl}: {why}")
    x = t.x.detach().requires_grad_(True)
    inputs = built.grad_inputs(x)
    benchmark.group = f"{case.name} {pass_}"
    benchmark.extra_info.update(case.fields(), impl=impl, label=I.LABELS[impl], pass_=pass_)
    time_pass(benchmark, built, x, inputs, t.dy, pass_, device)
    if pass_ == "fwdbwd" and CUDA and not benchmark.disabled:
        peak = peak_bytes(lambda: torch.autograd.grad(built(x), inputs, t.dy), device)
        benchmark.extra_info["peak_mb"] = round(peak / MB, 2)
