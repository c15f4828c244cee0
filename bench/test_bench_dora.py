"""DoRA op-level pytest-benchmark suite: base linear, our LoRA, our DoRA (Triton and torch), PEFT's DoRA, each
forward, backward and forward+backward on the grid's cases (tiny shapes on CPU). Timed as test_bench_ops.py
times; not yet in bench/collect.py's results file or the GPU stages."""
import functools

import pytest
import torch
from bench.lkbench import cases as C
from bench.lkbench import impls as I
from bench.lkbench.dora import DORA_IMPLS, build_dora
from bench.lkbench.ops_bench import PASSES
from bench.test_bench_ops import time_pass

PARAMS = [(case, impl, p) for case in C.select() for impl in DORA_IMPLS for p in PASSES]


@functools.lru_cache(maxsize=1)
def _tensors(case, device):
    return I.make_tensors(case, device)


@pytest.mark.parametrize("case,impl,pass_", PARAMS, ids=[f"{c.name}-{i}-{p}" for c, i, p in PARAMS])
def test_dora_op(benchmark, device, case, impl, pass_):
    t = _tensors(case, device)
    try:
        built = build_dora(impl, case, t)
    except I.Skip as why:
        pytest.skip(f"{impl}: {why}")
    x = t.x.detach().requires_grad_(True)
    inputs = built.grad_inputs(x)

    benchmark.group = f"dora {case.name} {pass_}"
    benchmark.extra_info.update(case.fields(), impl=impl, pass_=pass_)
    time_pass(benchmark, built, x, inputs, t.dy, pass_, device)


def test_dora_impls_agree(device):
    """On the first fp32 case without dropout, ours (Triton and torch) and PEFT's DoRA give the same output."""
    case = next((c for c in C.select() if c.dtype == "fp32" and c.dropout == 0.0), None)
    if case is None:
        pytest.skip("no fp32 case without dropout in this grid")
    t = _tensors(case, device)
    with torch.no_grad():
        want = build_dora("peft_dora", case, t)(t.x).float()
        for impl in ("dora", "dora_torch"):
            got = build_dora(impl, case, t)(t.x).float()
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), impl
