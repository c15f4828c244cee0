"""DoRA op-level pytest-benchmark suite: base linear, our LoRA, our DoRA (Triton and torch), PEFT's DoRA, each
forward, backward and forward+backward on the DoRA cases (bench/lkbench/dora.py: the headline shapes with fp32
adapters; on a CPU the smoke grid's dropout case). Timed as test_bench_ops.py times; the side-by-side ratios and
the memory are bench/collect.py --dora's."""
import functools

import pytest
from bench.lkbench import impls as I
from bench.lkbench.dora import DORA_IMPLS, build_dora, dora_cases, dora_reference
from bench.lkbench.ops_bench import PASSES
from bench.test_bench_ops import time_built_case

PARAMS = [(case, impl, p) for case in dora_cases() for impl in DORA_IMPLS for p in PASSES]


@functools.lru_cache(maxsize=1)
def _tensors(case, device):
    return I.make_tensors(case, device)


@pytest.mark.parametrize("case,impl,pass_", PARAMS, ids=[f"{c.name}-{i}-{p}" for c, i, p in PARAMS])
def test_dora_op(benchmark, device, case, impl, pass_):
    t = _tensors(case, device)
    time_built_case(benchmark, device, case, impl, pass_, t, build_dora)


def test_dora_impls_agree(device):
    """On the first case, without dropout (eval mode), ours (Triton and torch) and PEFT's DoRA give the float32
    reference's output, g = m / ‖W + s·B·A‖ ≠ 1 included."""
    case = dora_cases()[0]
    t = _tensors(case, device)
    want = dora_reference(case, t)
    for impl in ("dora", "dora_torch", "peft_dora"):
        err = I.output_error(build_dora(impl, case, t), t.x, want)
        assert err <= I.TOLERANCE[case.dtype], (impl, err)
