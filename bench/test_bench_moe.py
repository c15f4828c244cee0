"""MoE-experts pytest-benchmark suite: transformers' experts module without LoRA (grouped_mm), ours (inject_lora with
target_parameters), PEFT's target_parameters, each forward, backward and forward+backward on the MoE cases
(bench/lkbench/moe.py: the Qwen3-30B-A3B and gpt-oss-20b layers at p = 0 and 0.1; tiny ones on a CPU). PEFT
refuses lora_dropout on target_parameters, so its p = 0.1 tests are not generated; without a GPU, only the
forward+backward pass. Timed as test_bench_ops.py times; the side-by-side ratios and the memory are
bench/collect.py --moe's."""
import functools

import pytest
import torch
from bench.lkbench import impls as I
from bench.lkbench.moe import MOE_IMPLS, build_moe, make_moe_tensors, moe_cases, moe_reference
from bench.lkbench.ops_bench import PASSES
from bench.test_bench_ops import time_built_case

# Without a GPU the grouped kernels run under Triton's interpreter (about a second per forward+backward): the
# forward+backward pass alone there.
PARAMS = [(case, impl, p) for case in moe_cases() for impl in MOE_IMPLS
          for p in (PASSES if torch.cuda.is_available() else ("fwdbwd",)) if not (impl == "peft" and case.dropout > 0)]


@functools.lru_cache(maxsize=1)
def _tensors(case, device):
    return make_moe_tensors(case, device)


@pytest.mark.parametrize("case,impl,pass_", PARAMS, ids=[f"{c.name}-{i}-{p}" for c, i, p in PARAMS])
def test_moe_experts(benchmark, device, case, impl, pass_):
    t = _tensors(case, device)
    time_built_case(benchmark, device, case, impl, pass_, t, build_moe)


@pytest.mark.parametrize("case", [c for c in moe_cases() if c.dropout == 0], ids=lambda c: c.name)
def test_moe_impls_agree(device, case):
    """Without dropout (eval mode), ours and PEFT give the float32 expert-by-expert reference's output."""
    t = _tensors(case, device)
    want = moe_reference(case, t)
    for impl in ("ours", "peft"):
        err = I.output_error(build_moe(impl, case, t), t.x, want)
        assert err <= I.TOLERANCE[case.dtype], (impl, err)
