"""The split GEMM path (torch's matmul for the base GEMM, the Triton kernel adding the LoRA term in place)
against the float64 oracle, and the per-shape choice between it and the fused path (gemm_dispatch.py)."""
import time

import pytest
import torch
import triton

import lora_kernels as lk
from lora_kernels.backends import gemm_dispatch
from helpers import TOL, gpu_tile_configs, keep_mask, make_case, oracle, rel_err, seed_for


pytestmark = pytest.mark.usefixtures("fresh_gemm_choices")


@pytest.fixture
def mm_calls(monkeypatch):
    """Counts torch.mm calls: the split path's base GEMMs, one per pass."""
    calls = []
    real_mm = torch.mm

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    return calls


def _run(case, p, dy, x=None, need_x=True, manual_seed=1234):
    x = (case["x"] if x is None else x).detach().clone().requires_grad_(need_x)
    A = case["lora_A"].detach().clone().requires_grad_(True)
    B = case["lora_B"].detach().clone().requires_grad_(True)
    torch.manual_seed(manual_seed)
    y = lk.fused_lora_linear(x, case["weight"], case["bias"], A, B, case["scaling"], dropout_p=p)
    y.backward(dy)
    return y, {"x": x.grad, "lora_A": A.grad, "lora_B": B.grad}


def _transposed(shape_tn, K, seed=11):
    """A (T, B, K) view of a contiguous (B, T, K) tensor: leading dims in two row groups."""
    T, Bt = shape_tn
    return torch.randn(Bt, T, K, generator=torch.Generator().manual_seed(seed)).transpose(0, 1)


SPLIT_CASES = [
    # lead, K, N, r, dtype, bias, p
    ((37,), 53, 29, 5, torch.float32, True, 0.25),     # odd everything, bias, dropout
    ((2, 3, 7), 40, 33, 16, torch.float16, False, 0.0),
    ((9,), 36, 20, 70, torch.float32, True, 0.1),      # r > 64: rank chunks
    ((19,), 24, 70, 1, torch.float16, True, 0.3),      # r = 1
]


@pytest.mark.parametrize("lead,K,N,r,dtype,bias,p", SPLIT_CASES)
def test_split_path_matches_oracle(lead, K, N, r, dtype, bias, p, monkeypatch, mm_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")
    case = make_case(lead, K, N, r, dtype, bias=bias)
    dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    y, grads = _run(case, p, dy)
    assert len(mm_calls) == 2  # x·Wᵀ forward and dy·W backward went to torch
    mask = keep_mask("triton", seed_for(1234), case["x"].shape, p) if p > 0 else None
    y_ref, g_ref = oracle(case, mask, p, dy)
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert rel_err(y, y_ref) < TOL[dtype]
    for name in ("x", "lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < TOL[dtype], name


def test_split_path_non_contiguous_input_and_grad(monkeypatch, mm_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")
    x = _transposed((4, 5), 31)
    assert not x.is_contiguous()
    case = make_case(x.shape[:-1], 31, 17, 6, torch.float32)
    case["x"] = x
    dy = torch.randn(5, 4, 17, generator=torch.Generator().manual_seed(5)).transpose(0, 1)
    y, grads = _run(case, 0.2, dy, x=x)
    y_ref, g_ref = oracle(case, keep_mask("triton", seed_for(1234), x.shape, 0.2), 0.2, dy)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    for name in ("x", "lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < TOL[torch.float32], name


def test_split_path_without_input_grad_runs_no_backward_gemm(monkeypatch, mm_calls):
    """When x needs no gradient there is no dy·W to place: only the forward GEMM goes to torch."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")
    case = make_case((21,), 24, 18, 4, torch.float32)
    dy = torch.randn(21, 18, generator=torch.Generator().manual_seed(3))
    _, grads = _run(case, 0.2, dy, need_x=False)
    assert len(mm_calls) == 1 and grads["x"] is None
    _, g_ref = oracle(case, keep_mask("triton", seed_for(1234), case["x"].shape, 0.2), 0.2, dy)
    for name in ("lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < TOL[torch.float32], name


def test_split_path_deterministic_mode(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")
    case = make_case((3, 23), 40, 33, 16, torch.float32)
    dy = torch.randn(3, 23, 33, generator=torch.Generator().manual_seed(4))
    torch.use_deterministic_algorithms(True)
    try:
        _, grads = _run(case, 0.25, dy)
        _, again = _run(case, 0.25, dy)
    finally:
        torch.use_deterministic_algorithms(False)
    _, g_ref = oracle(case, keep_mask("triton", seed_for(1234), case["x"].shape, 0.25), 0.25, dy)
    for name in ("x", "lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < TOL[torch.float32], name
        assert torch.equal(grads[name], again[name]), name


def test_bad_gemm_setting_is_refused(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", "cublas")
    case = make_case((4,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="LORA_KERNELS_GEMM='cublas'"):
        lk.fused_lora_linear(case["x"], case["weight"], None, case["lora_A"], case["lora_B"], 1.0)


def test_auto_takes_fused_without_measuring_off_cuda(monkeypatch, mm_calls):
    """On the CPU (interpreter) a timing says nothing about a GPU: auto runs fused and records nothing."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")

    def no_measure(*args, **kwargs):
        raise AssertionError("auto must not measure off CUDA")

    monkeypatch.setattr(gemm_dispatch, "measure", no_measure)
    case = make_case((12,), 16, 10, 4, torch.float32)
    _run(case, 0.1, torch.randn(12, 10))
    assert mm_calls == [] and gemm_dispatch.gemm_choices() == {}


def test_not_measurable_off_cuda_or_deterministic():
    assert not gemm_dispatch._measurable(torch.device("cpu"))
    torch.use_deterministic_algorithms(True)
    try:
        # Deterministic mode refuses before looking at the device, so no CUDA is needed to check it.
        assert not gemm_dispatch._measurable(torch.device("cuda"))
    finally:
        torch.use_deterministic_algorithms(False)


def _sleepy(slow_path, seconds=0.004):
    calls = []

    def run(path):
        calls.append(path)
        if path == slow_path:
            time.sleep(seconds)

    return run, calls


K1 = gemm_dispatch.GemmKey("fwd", "cpu", "float32", 64, 32, 16, 4, "")
K2 = K1._replace(pass_name="bwd", flags="grad_A")


def test_choose_measures_once_per_key_and_keeps_the_faster(monkeypatch):
    monkeypatch.setattr(gemm_dispatch, "_measurable", lambda device: True)
    cpu = torch.device("cpu")
    run, calls = _sleepy("fused")
    assert gemm_dispatch.choose(K1, cpu, run) == "split"
    per_path = gemm_dispatch.WARMUP + gemm_dispatch.REPS
    assert calls.count("fused") == per_path and calls.count("split") == per_path
    path, times = gemm_dispatch.gemm_choices()[K1]
    assert path == "split" and times["fused"] > times["split"] + 3.0  # ms: the sleep was measured

    def must_not_run(path):
        raise AssertionError("a measured key is not measured again")

    assert gemm_dispatch.choose(K1, cpu, must_not_run) == "split"
    run2, _ = _sleepy("split")
    assert gemm_dispatch.choose(K2, cpu, run2) == "fused"  # another key is measured on its own
    assert set(gemm_dispatch.gemm_choices()) == {K1, K2}

    monkeypatch.setenv("LORA_KERNELS_GEMM", "fused")  # an explicit setting beats a measured choice
    assert gemm_dispatch.choose(K1, cpu, must_not_run) == "fused"
    monkeypatch.setenv("LORA_KERNELS_GEMM", "auto")
    gemm_dispatch.clear_gemm_choices()
    run3, calls3 = _sleepy("fused")
    assert gemm_dispatch.choose(K1, cpu, run3) == "split" and calls3


def test_choose_keeps_fused_on_a_tie(monkeypatch):
    monkeypatch.setattr(gemm_dispatch, "_measurable", lambda device: True)
    monkeypatch.setattr(gemm_dispatch, "measure", lambda run, device: {"fused": 1.0, "split": 1.0})
    assert gemm_dispatch.choose(K1, torch.device("cpu"), lambda path: None) == "fused"


def test_auto_measures_both_passes_with_the_real_kernels(monkeypatch, mm_calls):
    """With measuring allowed (as on a GPU), the forward and backward keys are measured on the real operands,
    and the repeated runs leave the results intact (each run allocates its own outputs and atomics buffer)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setattr(gemm_dispatch, "_measurable", lambda device: True)
    monkeypatch.setattr(gemm_dispatch, "REPS", 1)
    monkeypatch.setattr(gemm_dispatch, "WARMUP", 1)
    case = make_case((2, 9), 20, 14, 4, torch.float16, ab_dtype=torch.float32)
    dy = torch.randn(2, 9, 14, generator=torch.Generator().manual_seed(8)).half()
    y, grads = _run(case, 0.2, dy)
    choices = gemm_dispatch.gemm_choices()
    fwd = [k for k in choices if k.pass_name == "fwd"]
    bwd = [k for k in choices if k.pass_name == "bwd"]
    assert len(fwd) == 1 and len(bwd) == 1
    assert fwd[0] == gemm_dispatch.GemmKey("fwd", "cpu", "float16", 32, 20, 14, 4, "bias")
    assert bwd[0] == gemm_dispatch.GemmKey("bwd", "cpu", "float16", 32, 20, 14, 4, "dropout,grad_A")
    assert bwd[0].describe() == "bwd float16 M<=32 20->14 r4 dropout,grad_A"
    # Per pass: one split run per warm-up and per rep while measuring, plus one if split was chosen.
    expected = sum(2 + (choices[k][0] == "split") for k in fwd + bwd)
    assert len(mm_calls) == expected
    mask = keep_mask("triton", seed_for(1234), case["x"].shape, 0.2)
    y_ref, g_ref = oracle(case, mask, 0.2, dy)
    assert rel_err(y, y_ref) < TOL[torch.float16]
    for name in ("x", "lora_A", "lora_B"):
        assert rel_err(grads[name], g_ref[name]) < TOL[torch.float16], name


def test_autotuning_leaves_every_output_intact(monkeypatch):
    """On a GPU the autotuner runs each config several times before the real launch; the split path adds to y
    and grad_x in place and grad_A / grad_B accumulate with atomics, so the autotuner must restore or zero them
    between runs. The interpreter has one config and no benchmarker, so this test gives every kernel two
    configs and a CPU stand-in for do_bench that calls the kernel three times, as a benchmark would."""
    from lora_kernels.ops.lora_dy_b import _lora_dy_b_kernel
    from lora_kernels.ops.lora_linear_bwd_dx import _lora_linear_bwd_dx_kernel
    from lora_kernels.ops.lora_linear_fwd import _lora_linear_fwd_kernel
    from lora_kernels.ops.lora_shrink import _lora_shrink_kernel

    kernels = (_lora_shrink_kernel, _lora_linear_fwd_kernel, _lora_dy_b_kernel, _lora_linear_bwd_dx_kernel)

    def bench_three_times(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        return [1.0] * len(quantiles)

    for kernel in kernels:
        cfg = kernel.configs[0]
        monkeypatch.setattr(kernel, "configs", [cfg, triton.Config(dict(cfg.kwargs), num_warps=cfg.num_warps)])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(kernel.__dict__, "do_bench", bench_three_times)  # do_bench is a cached_property
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    for gemm in ("split", "fused"):
        monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
        for kernel in kernels:
            kernel.cache.clear()
        case = make_case((23,), 40, 33, 8, torch.float32)
        dy = torch.randn(23, 33, generator=torch.Generator().manual_seed(6))
        y, grads = _run(case, 0.2, dy)
        assert all(kernel.cache for kernel in kernels)  # the autotuner did run
        y_ref, g_ref = oracle(case, keep_mask("triton", seed_for(1234), case["x"].shape, 0.2), 0.2, dy)
        assert rel_err(y, y_ref) < TOL[torch.float32], gemm
        for name in ("x", "lora_A", "lora_B"):
            assert rel_err(grads[name], g_ref[name]) < TOL[torch.float32], (gemm, name)


def test_every_gpu_tile_config_computes_the_same(monkeypatch):
    """The GPU's autotune configs (tiles up to 256 wide, much larger than these shapes) run here under the
    interpreter, one config at a time for every kernel, on both GEMM paths: the edge masks and the rank loop
    must be right for each tile shape the autotuner may pick on a GPU."""
    gpu = gpu_tile_configs(monkeypatch)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    case = make_case((70,), 72, 66, 70, torch.float16, ab_dtype=torch.float32)  # r = 70: two rank chunks
    dy = torch.randn(70, 66, generator=torch.Generator().manual_seed(2)).half()
    y_ref, g_ref = oracle(case, keep_mask("triton", seed_for(1234), case["x"].shape, 0.1), 0.1, dy)
    for i in range(max(len(c) for c in gpu.values())):
        for kernel, cfgs in gpu.items():
            monkeypatch.setattr(kernel, "configs", [cfgs[i % len(cfgs)]])
            monkeypatch.setattr(kernel, "cache", {})
        # The deterministic partial-sum buffers are sized from the configs' smallest BLOCK_M: check them too.
        for gemm, deterministic in (("fused", False), ("split", True)):
            monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
            torch.use_deterministic_algorithms(deterministic)
            try:
                y, grads = _run(case, 0.1, dy)
            finally:
                torch.use_deterministic_algorithms(False)
            for kernel in gpu:
                assert kernel.best_config is kernel.configs[0]
            where = f"config {i}, {gemm}, deterministic={deterministic}"
            assert rel_err(y, y_ref) < TOL[torch.float16], where
            for name in ("x", "lora_A", "lora_B"):
                assert rel_err(grads[name], g_ref[name]) < TOL[torch.float16], (where, name)
