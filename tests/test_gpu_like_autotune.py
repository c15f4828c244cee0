"""What only a GPU used to show, caught on CPU: autotuning with several configs (tests/gpu_like_autotune.py), so
reset/restore hooks run as on a GPU; deterministic mode across processes; the device every launch runs on;
torch's TF32 switches; the autotuner's keys and copies; host-to-device copies of the segment tables.

Gradients are checked against the float64 oracle (lora_kernels/reference.py) in the cases the hooks used to get
wrong: an input that needs a gradient with a frozen adapter (is_trainable=False, blocks frozen mid-training), a
mixed batch with a frozen adapter, and a 4-bit base.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_kernels as lk
from helpers import TOL, keep_mask, make_case, oracle, rel_err, seed_for
from lora_kernels.functional import AdapterSegments, fused_multi_lora_linear
from lora_kernels.reference import make_multi_case, multi_oracle

ROOT = Path(__file__).resolve().parent.parent
P = 0.25


def _bwd_dx():
    from lora_kernels.ops.lora_linear_bwd_dx import _lora_linear_bwd_dx_kernel
    return _lora_linear_bwd_dx_kernel


def _run_single(case, weight, need, p=P, dy_seed=7):
    x = case["x"].detach().clone().requires_grad_("x" in need)
    A = case["lora_A"].detach().clone().requires_grad_("lora_A" in need)
    B = case["lora_B"].detach().clone().requires_grad_("lora_B" in need)
    torch.manual_seed(1234)
    y = lk.fused_lora_linear(x, weight, case["bias"], A, B, case["scaling"], dropout_p=p)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.dtype)
    y.backward(dy)
    return dy, {"x": x.grad, "lora_A": A.grad, "lora_B": B.grad}


def _check_single(case, dy, grads, need, p=P):
    mask = keep_mask("triton", seed_for(1234), case["x"].shape, p) if p > 0 else None
    _, want = oracle(case, mask, p, dy)
    for name in ("x", "lora_A", "lora_B"):
        if name in need:
            assert rel_err(grads[name], want[name]) < TOL[case["x"].dtype], name
        else:
            assert grads[name] is None, name


def _assert_autotuned(mode):
    """The bwd_dx autotuner benchmarked its configs and kept the stub timer's winner (so its hooks ran)."""
    kernel = _bwd_dx()
    assert len(kernel.configs) > 1 and kernel.cache
    assert all(cfg is kernel.configs[-1] for cfg in kernel.cache.values())


@pytest.mark.parametrize("need,gemm", [
    (("x",), "fused"),                       # adapter loaded with is_trainable=False: grad_A's stand-in is dyB
    (("x", "lora_A"), "split"),              # B frozen: grad_B's stand-in is the saved xa
    (("x", "lora_B"), "fused"),
])
def test_frozen_adapter_grads_match_oracle(need, gemm, gpu_like_autotune, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
    case = make_case((3, 7), 24, 20, 5, torch.float32)
    dy, grads = _run_single(case, case["weight"], need)
    _check_single(case, dy, grads, need)
    _assert_autotuned(gpu_like_autotune)


@pytest.mark.parametrize("need", [("x",), ("x", "lora_A")])
def test_backward_leaves_saved_tensors_untouched(need, gpu_like_autotune, monkeypatch):
    """With B frozen, grad_B's stand-in is the saved xa: autotuning must not zero it (nor any saved tensor)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    case = make_case((3, 7), 24, 20, 5, torch.float32)
    saved = []

    def pack(t):
        saved.append((t, t.clone()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run_single(case, case["weight"], need)
    assert len(saved) >= 5  # x, xa, seed, W, A, B
    for i, (t, before) in enumerate(saved):
        assert torch.equal(t, before), i


@pytest.mark.parametrize("frozen", ["one", "all"])
def test_mixed_batch_with_a_frozen_adapter(frozen, gpu_like_autotune, monkeypatch):
    """Adapter 1 frozen (or both: only x needs a gradient); rows of both adapters and base rows in one batch."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    case = make_multi_case((4, 5), 24, 20, (4, 8), torch.float32)
    segments = AdapterSegments([1, 0, None, 1])
    ps = [0.25, 0.1]
    trainable = [frozen == "one", False]
    x = case["x"].clone().requires_grad_(True)
    As = [A.clone().requires_grad_(t) for A, t in zip(case["lora_As"], trainable)]
    Bs = [B.clone().requires_grad_(t) for B, t in zip(case["lora_Bs"], trainable)]
    torch.manual_seed(1234)
    y = fused_multi_lora_linear(x, case["weight"], case["bias"], As, Bs, case["scalings"], ps, segments)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(dy)
    rows = segments.row_adapter(20).tolist()
    mask = torch.ones(20, 24, dtype=torch.bool)
    for a, p in enumerate(ps):
        sel = torch.tensor([r == a for r in rows])
        mask[sel] = keep_mask("triton", seed_for(1234), (20, 24), p)[sel]
    _, want = multi_oracle(case, rows, mask.reshape(4, 5, 24), ps, dy)
    assert rel_err(x.grad, want["x"]) < TOL[torch.float32]
    for i, t in enumerate(trainable):
        for got, ref in ((As[i].grad, want["lora_As"][i]), (Bs[i].grad, want["lora_Bs"][i])):
            assert (got is None) if not t else rel_err(got, ref) < TOL[torch.float32], i
    _assert_autotuned(gpu_like_autotune)


@pytest.mark.parametrize("need,gemm", [(("x",), "fused"), (("x", "lora_A"), "split")])
def test_4bit_frozen_adapter_grads_match_oracle(need, gemm, gpu_like_autotune, monkeypatch):
    pytest.importorskip("bitsandbytes.functional")
    from test_qlora_parity import qlora_case

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
    case = qlora_case((13,), 64, 24, 8, torch.float32, "nf4", True, 64)
    dy, grads = _run_single(case, case["qweight"], need)
    _check_single(case, dy, grads, need)
    _assert_autotuned(gpu_like_autotune)


def test_bwd_dx_key_separates_grad_a_only_from_the_full_kernel(gpu_like_autotune, monkeypatch):
    """A layer whose input needs no gradient (the first one) runs a different kernel from the others: its own
    tuning key, not the full kernel's config."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    case = make_case((3, 7), 24, 20, 5, torch.float32)
    _run_single(case, case["weight"], ("lora_A",), p=0.0)
    _run_single(case, case["weight"], ("x", "lora_A"), p=0.0)
    assert len(_bwd_dx().cache) == 2


def _clones_of_shape(monkeypatch, shape):
    seen = []
    real = torch.Tensor.clone

    def clone(self, *args, **kwargs):
        if tuple(self.shape) == shape:
            seen.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", clone)
    return seen


@pytest.mark.parametrize("gemm,copies", [("fused", False), ("split", True)])
def test_autotuning_copies_y_only_on_the_split_path(gemm, copies, gpu_like_autotune, monkeypatch):
    """The fused kernel overwrites y: benchmarking it must not copy y (an M·N temporary per config)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
    case = make_case((21,), 24, 20, 5, torch.float32)
    seen = _clones_of_shape(monkeypatch, (21, 20))
    y = lk.fused_lora_linear(case["x"], case["weight"], case["bias"], case["lora_A"], case["lora_B"], 1.5)
    assert bool(seen) == copies
    assert rel_err(y, oracle(case)[0]) < TOL[torch.float32]


@pytest.mark.parametrize("supported", [True, False])
def test_autotune_results_are_cached_across_processes_where_triton_can(supported, monkeypatch):
    """configs.autotune asks for Triton's on-disk tuning cache (cache_results, Triton >= 3.4) where it exists."""
    import triton

    from lora_kernels.ops import configs

    got = {}

    def new(configs, key, pre_hook=None, post_hook=None, cache_results=False):
        got.update(cache_results=cache_results)

    def old(configs, key, pre_hook=None, post_hook=None):
        got.update(cache_results=None)

    monkeypatch.setattr(triton, "autotune", new if supported else old)
    configs.autotune(configs=[], key=["M"])
    assert got == {"cache_results": True if supported else None}


# Deterministic mode: one pinned config, slots of fixed row blocks, the same bits in any process.

_DETERMINISTIC_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "tests")
import gpu_like_autotune
gpu_like_autotune.enable(sys.argv[1])  # each process's "timer" prefers a different config
import lora_kernels as lk
from lora_kernels.functional import AdapterSegments, fused_multi_lora_linear
from lora_kernels.reference import make_case, make_multi_case
torch.use_deterministic_algorithms(True)
out = {}
c = make_case((4, 16), 24, 20, 8, torch.float32, seed=5)
x, A, B = (c[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B"))
torch.manual_seed(0)
y = lk.fused_lora_linear(x, c["weight"], c["bias"], A, B, 1.5, dropout_p=0.1)
y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
out.update(x=x.grad, A=A.grad, B=B.grad)
m = make_multi_case((4, 16), 24, 20, (4, 8), torch.float32, seed=6)
As = [t.clone().requires_grad_(True) for t in m["lora_As"]]
Bs = [t.clone().requires_grad_(True) for t in m["lora_Bs"]]
torch.manual_seed(0)
y = fused_multi_lora_linear(m["x"], m["weight"], m["bias"], As, Bs, m["scalings"], [0.1, 0.0],
                            AdapterSegments([1, 0, None, 1]))
y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
out.update(A0=As[0].grad, A1=As[1].grad, B0=Bs[0].grad, B1=Bs[1].grad)
torch.save(out, sys.argv[2])
"""


def test_deterministic_mode_bitwise_equal_across_processes(tmp_path):
    """Two processes whose autotuners would pick different tiles (different BLOCK_M: a different grouping of
    the partial sums) give the same bits: deterministic mode never asks the autotuner."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), LORA_KERNELS_BACKEND="triton")
    procs = [subprocess.Popen([sys.executable, "-c", _DETERMINISTIC_SCRIPT, winner, str(tmp_path / winner)],
                              cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for winner in ("first", "last")]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    first, last = (torch.load(tmp_path / w) for w in ("first", "last"))
    for name in first:
        assert torch.equal(first[name], last[name]), name


def test_deterministic_waves_bound_the_partials(monkeypatch):
    """With 2 slots, 96 rows in 16-row blocks run as 3 launches adding to the same 2 slots: right gradients,
    partial buffers of 2 slots whatever M is."""
    from lora_kernels.ops import configs
    from lora_kernels.ops.lora_dy_b import _lora_dy_b_kernel

    monkeypatch.setattr(configs, "DETERMINISTIC_SLOTS", 2)
    assert configs.row_waves(96, 16, True) == (2, [(0, 32), (32, 64), (64, 96)])
    assert configs.row_waves(10**6, 64, True)[0] == 2
    assert configs.row_waves(96, 16, False) == (1, [(0, 96)])
    launches = []
    for kernel, partial in ((_lora_dy_b_kernel, 4), (_bwd_dx(), 7)):  # positions of grad_b_ptr / grad_a_ptr
        def spy(*args, _real=kernel.fn.run, _partial=partial, **kwargs):
            launches.append(args[_partial].shape[0])
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernel.fn, "run", spy)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    case = make_case((6, 16), 24, 20, 5, torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        dy, grads = _run_single(case, case["weight"], ("x", "lora_A", "lora_B"))
    finally:
        torch.use_deterministic_algorithms(False)
    _check_single(case, dy, grads, ("x", "lora_A", "lora_B"))
    assert launches == [2] * 6  # dy_b: 3 waves, then bwd_dx: 3 waves, each with a 2-slot partial buffer

    # Several adapters: a wave's slots hold every adapter's partial; adapters absent from a row block add nothing.
    m = make_multi_case((4, 16), 24, 20, (4, 8), torch.float32)
    segments = AdapterSegments([1, None, 0, 1])
    x = m["x"].clone().requires_grad_(True)
    As = [t.clone().requires_grad_(True) for t in m["lora_As"]]
    Bs = [t.clone().requires_grad_(True) for t in m["lora_Bs"]]
    torch.use_deterministic_algorithms(True)
    try:
        y = fused_multi_lora_linear(x, m["weight"], m["bias"], As, Bs, m["scalings"], [0.0, 0.0], segments)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
        y.backward(dy)
    finally:
        torch.use_deterministic_algorithms(False)
    _, want = multi_oracle(m, segments.row_adapter(64).tolist(), None, [0.0, 0.0], dy)
    assert rel_err(x.grad, want["x"]) < TOL[torch.float32]
    for got, ref in zip([t.grad for t in As + Bs], want["lora_As"] + want["lora_Bs"]):
        assert rel_err(got, ref) < TOL[torch.float32]


# Every launch on x's device (a model split over GPUs).

def _jit_kernels():
    import gpu_like_autotune  # noqa: F401  (imports every ops module)
    import importlib
    import pkgutil

    import lora_kernels.ops as ops
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    found = []
    for info in pkgutil.iter_modules(ops.__path__):
        for obj in vars(importlib.import_module(f"lora_kernels.ops.{info.name}")).values():
            obj = obj.fn if isinstance(obj, Autotuner) else obj
            if isinstance(obj, KernelInterface) and obj not in found:
                found.append(obj)
    return found


def test_every_launch_runs_under_x_device(monkeypatch):
    """A spy stands in for the current-device switch (torch.cuda.device on a GPU): every Triton launch of the
    forward and backward (dense fused and split, deterministic, several adapters, 4-bit, MoE experts, the
    oracle's mask) happens inside it, switched to x's device."""
    import contextlib

    from lora_kernels.backends import base

    current = []

    @contextlib.contextmanager
    def switch(t):
        current.append(t.device)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(base, "on_device", switch)
    seen = []
    for fn in _jit_kernels():
        def spy(*args, _real=fn.run, **kwargs):
            seen.append(current[-1] if current else None)
            return _real(*args, **kwargs)
        monkeypatch.setattr(fn, "run", spy)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    case = make_case((9,), 64, 24, 4, torch.float32)
    for gemm in ("fused", "split"):
        monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
        _run_single(case, case["weight"], ("x", "lora_A", "lora_B"))
    torch.use_deterministic_algorithms(True)
    try:
        _run_single(case, case["weight"], ("x", "lora_A", "lora_B"))
    finally:
        torch.use_deterministic_algorithms(False)
    m = make_multi_case((3, 3), 24, 20, (4, 8), torch.float32)
    x = m["x"].clone().requires_grad_(True)
    fused_multi_lora_linear(x, m["weight"], None, m["lora_As"], m["lora_Bs"], m["scalings"], [0.1, 0.0],
                            AdapterSegments([1, 0, None])).sum().backward()
    from test_qlora_parity import qlora_case

    q = qlora_case((9,), 64, 24, 4, torch.float32, "nf4", True, 64)
    _run_single(q, q["qweight"], ("x", "lora_A"))
    from lora_kernels.backends import keep_mask as backend_mask

    backend_mask("triton", seed_for(0), (4, 8), 0.5)
    n = len(seen)
    # DoRA over the 4-bit W, with dropout: the norm's A·Wᵀ GEMM, the forward, the two-MMA grad_x, the LoRA passes.
    from lora_kernels.functional import fused_dora_linear

    t = {k: q[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B")}
    fused_dora_linear(t["x"], q["qweight"], q["bias"], t["lora_A"], t["lora_B"], torch.ones(24), 2.0,
                      dropout_p=0.1).sum().backward()
    assert len(seen) >= n + 5
    from lora_kernels.functional import ExpertRouting, fused_grouped_lora_linear

    routing = ExpertRouting.from_top_k(torch.tensor([[0, 2], [2, 1]]), 3)  # MoE experts: the grouped kernels
    xe = torch.randn(4, 16, requires_grad=True)
    fused_grouped_lora_linear(xe, torch.randn(3, 8, 16), None, torch.randn(6, 16, requires_grad=True),
                              torch.randn(8, 6, requires_grad=True), routing, 1.0, 0.1).sum().backward()
    assert len(seen) > 26 and seen == [torch.device("cpu")] * len(seen)


def test_cuda_extension_bindings_switch_to_their_tensors_device():
    """The CUDA backend's kernels launch from csrc/bindings.cpp: each binding that launches holds a CUDAGuard on
    its tensors' device before it does (the backend's torch ops follow their tensors by themselves)."""
    import re

    source = (ROOT / "csrc" / "bindings.cpp").read_text()
    bindings = re.findall(r"^at::Tensor (\w+)\(.*?^}", source, flags=re.S | re.M)
    bodies = re.findall(r"^at::Tensor \w+\(.*?^}", source, flags=re.S | re.M)
    launching = [(name, body) for name, body in zip(bindings, bodies) if "launch_" in body]
    assert len(launching) >= 4
    for name, body in launching:
        assert "CUDAGuard" in body and body.index("CUDAGuard") < body.index("launch_"), name


@pytest.mark.gpu
def test_layer_on_second_gpu_while_first_is_current(monkeypatch):
    """device_map="auto" splits a model over GPUs in one process: a layer on cuda:1 while cuda:0 is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    torch.cuda.set_device(0)
    case = make_case((4, 33), 96, 80, 8, torch.float16, device="cuda:1")
    for need in (("x",), ("x", "lora_A", "lora_B")):
        for gemm in ("fused", "split"):
            monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
            dy, grads = _run_single(case, case["weight"], need, p=0.0)  # no dropout: the oracle's mask is CPU's
            torch.cuda.synchronize(1)
            assert torch.cuda.current_device() == 0
            _check_single({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()},
                          dy.cpu(), {k: (None if v is None else v.cpu()) for k, v in grads.items()}, need, p=0.0)


# torch's TF32 switches (float32 activations).

@pytest.fixture
def restore_tf32():
    matmul = torch.backends.cuda.matmul
    saved = (getattr(matmul, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None))
    legacy = matmul.allow_tf32 if saved[0] in (None, "none") else None
    yield
    if saved[1] is not None:
        torch.backends.fp32_precision = saved[1]
    if saved[0] is not None:
        matmul.fp32_precision = saved[0]
    if legacy is not None:
        matmul.allow_tf32 = legacy


def test_tf32_follows_torchs_new_and_legacy_switches(restore_tf32):
    from lora_kernels.backends.triton import dot_precision

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only allow_tf32")
    matmul.fp32_precision = "tf32"      # torch's newer API: reading allow_tf32 now raises
    assert dot_precision(torch.float32) == "tf32"
    matmul.fp32_precision = "ieee"
    assert dot_precision(torch.float32) == "ieee"
    assert dot_precision(torch.float16) == "tf32"  # half inputs: TF32 is moot
    matmul.fp32_precision = "none"      # nothing set for matmul: the global new switch decides
    torch.backends.fp32_precision = "tf32"
    assert dot_precision(torch.float32) == "tf32"
    torch.backends.fp32_precision = "none"
    matmul.allow_tf32 = True            # the legacy API
    assert dot_precision(torch.float32) == "tf32"
    matmul.allow_tf32 = False
    assert dot_precision(torch.float32) == "ieee"


# Host-to-device copies of the segment tables.

def test_row_tables_are_copied_from_pinned_memory_without_blocking(monkeypatch):
    from lora_kernels import adapter_segments
    from lora_kernels.ops import transfer

    copies = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: copies.append("pinned") or self)
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and str(args[0]).startswith("cuda"):  # no GPU here: record the copy, keep the tensor
            copies.append(("to", str(args[0]), kwargs.get("non_blocking")))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    kept = []
    transfer.host_to_device(torch.arange(3), torch.device("cuda:1"), kept)
    assert copies == ["pinned", ("to", "cuda:1", True)] and len(kept) == 1
    calls = []
    real = adapter_segments.host_to_device
    monkeypatch.setattr(adapter_segments, "host_to_device", lambda t, d, keep: calls.append(str(d)) or real(t, d, keep))
    segments = AdapterSegments([1, 0, None])
    segments.row_adapter(6, "cpu")
    segments.row_order(6, "cpu")
    assert calls == ["cpu", "cpu"]


def test_segment_constants_inside_a_graph_capture_are_filled_not_cached(monkeypatch):
    from lora_kernels.ops import segments

    monkeypatch.setattr(segments, "_CONSTANTS", {})
    rows = torch.zeros(4, dtype=torch.int32)
    monkeypatch.setattr(segments, "capturing", lambda device: True)
    monkeypatch.setattr(segments, "host_to_device", lambda *a: pytest.fail("host copy inside a capture"))
    table = segments.adapter_table(rows, rows, [4, 8], [0.5, 2.0], [0.0, 0.5])
    assert not segments._CONSTANTS
    assert table.rank.tolist() == [4, 8] and table.scaling.tolist() == [0.5, 2.0]
    assert table.keep_scale.tolist() == [1.0, 2.0] and table.threshold[0] == 0 and table.threshold[1] > 0
    monkeypatch.undo()
    monkeypatch.setattr(segments, "_CONSTANTS", {})
    eager = segments.adapter_table(rows, rows, [4, 8], [0.5, 2.0], [0.0, 0.5])  # the warm-up step before capture
    monkeypatch.setattr(segments, "capturing", lambda device: True)
    again = segments.adapter_table(rows, rows, [4, 8], [0.5, 2.0], [0.0, 0.5])
    assert again.rank is eager.rank and torch.equal(again.threshold, table.threshold)
