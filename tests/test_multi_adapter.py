"""Several adapters on one base layer in one mixed batch (fused_multi_lora_linear) against a float64
row-by-row oracle (reference.multi_lora_linear_reference), on the Triton kernels (interpreter on CPU: float32
and float16) and the torch backend (float32, bfloat16).

Contracts checked here: parity for 1, 2 and 5 adapters with different ranks, rows in any order, base-only
rows; gradients of each adapter from its own rows only; per-adapter dropout regenerated in backward;
deterministic mode; the number of kernel launches does not depend on the number of adapters; x is saved
once, with the (M, r_max) shrink; the kernels' row tiles walk the rows sorted by adapter (a stable sort, one
per forward), so a random-order batch's tiles each loop over a short run of adapters, with each logical
row's dropout mask unchanged.
"""
import pytest
import torch
import torch.nn.functional as F

from lora_kernels.functional import AdapterSegments, fused_lora_linear, fused_multi_lora_linear
from lora_kernels.reference import TOL, make_multi_case, multi_oracle, rel_err
from helpers import gpu_tile_configs, keep_mask, seed_for

BACKEND_DTYPES = [("triton", torch.float32), ("triton", torch.float16), ("torch", torch.float32),
                  ("torch", torch.bfloat16)]

CASES = {
    # name: (lead dims (batch first), K, N, ranks, per-sample adapter)
    "1-adapter": ((4, 6), 37, 29, (8,), [0, None, 0, 0]),
    "2-adapters": ((5, 7), 53, 29, (1, 8), ["a", "b", None, "a", "b"]),
    "5-adapters": ((7, 5), 40, 33, (1, 8, 70, 3, 16), [2, 0, None, 4, 1, 3, 2]),
    "decode-rows": ((6,), 24, 20, (8, 70), [1, 0, None, 1, 0, 0]),  # one row per sample: tiles span adapters
}
NAMES = ["a", "b", "c", "d", "e"]
MIXED_PS = [0.25, 0.0, 0.5, 0.1, 0.0]  # per adapter; p = 0 adapters' rows must be untouched by dropout


def segments_for(samples, n):
    if any(isinstance(s, str) for s in samples):
        return AdapterSegments.from_names(samples, NAMES[:n])
    return AdapterSegments(samples)


def row_ids(segments, M):
    return segments.row_adapter(M).tolist()


def multi_keep_mask(backend, seed, x_shape, rows, ps):
    """The keep-mask each row got: its adapter's rate on the backend's one mask (all True for base rows)."""
    K = x_shape[-1]
    keep = torch.ones(len(rows), K, dtype=torch.bool)
    for a, p in enumerate(ps):
        if p > 0:
            mask = keep_mask(backend, seed, x_shape, p).reshape(-1, K)
            sel = torch.tensor([r == a for r in rows])
            keep[sel] = mask[sel]
    return keep.reshape(x_shape)


def run(backend, case, segments, ps, monkeypatch, dy=None, training=True, manual_seed=1234, x=None):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    x = (case["x"] if x is None else x).detach().clone().requires_grad_(True)
    As = [A.detach().clone().requires_grad_(True) for A in case["lora_As"]]
    Bs = [B.detach().clone().requires_grad_(True) for B in case["lora_Bs"]]
    torch.manual_seed(manual_seed)
    y = fused_multi_lora_linear(x, case["weight"], case["bias"], As, Bs, case["scalings"], ps, segments,
                                training=training)
    grads = None
    if dy is not None:
        y.backward(dy)
        grads = {"x": x.grad, "lora_As": [A.grad for A in As], "lora_Bs": [B.grad for B in Bs]}
    return y, grads


def assert_close(y, grads, y_ref, g_ref, tol, where=""):
    assert rel_err(y, y_ref) < tol, where
    assert rel_err(grads["x"], g_ref["x"]) < tol, (where, "x")
    for name in ("lora_As", "lora_Bs"):
        for i, (got, want) in enumerate(zip(grads[name], g_ref[name])):
            assert got is not None and got.shape == want.shape, (where, name, i)
            assert rel_err(got, want) < tol, (where, name, i)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("dropout", [False, True])
def test_matches_row_by_row_oracle(backend, dtype, case_name, dropout, monkeypatch):
    lead, K, N, ranks, samples = CASES[case_name]
    n = len(ranks)
    case = make_multi_case(lead, K, N, ranks, dtype, bias=n != 2)
    segments = segments_for(samples, n)
    ps = MIXED_PS[:n] if dropout else [0.0] * n
    dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    y, grads = run(backend, case, segments, ps, monkeypatch, dy=dy)
    rows = row_ids(segments, y.numel() // N)
    mask = multi_keep_mask(backend, seed_for(1234), case["x"].shape, rows, ps) if dropout else None
    y_ref, g_ref = multi_oracle(case, rows, mask, ps, dy)
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert all(g.dtype == dtype for g in grads["lora_As"] + grads["lora_Bs"])
    assert_close(y, grads, y_ref, g_ref, TOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_adapters_half_input_tensor_scaling_and_missing_adapter(backend, monkeypatch):
    """float32 adapters with float16 x; one scaling a 0-dim tensor; adapter 1 absent from this layer (None):
    its rows get the base output."""
    lead, K, N, ranks = (4, 5), 36, 28, (8, 4, 16)
    case = make_multi_case(lead, K, N, ranks, torch.float16, ab_dtype=torch.float32)
    case["lora_As"][1] = case["lora_Bs"][1] = None
    scalings = list(case["scalings"])
    case["scalings"] = [scalings[0], scalings[1], torch.tensor(scalings[2])]
    segments = AdapterSegments([2, 1, 0, None])
    ps = [0.2, 0.0, 0.3]
    dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(3)).half()
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    x = case["x"].clone().requires_grad_(True)
    As = [None if A is None else A.clone().requires_grad_(True) for A in case["lora_As"]]
    Bs = [None if B is None else B.clone().requires_grad_(True) for B in case["lora_Bs"]]
    torch.manual_seed(1234)
    y = fused_multi_lora_linear(x, case["weight"], case["bias"], As, Bs, case["scalings"], ps, segments)
    y.backward(dy)
    rows = row_ids(segments, 20)
    case["scalings"] = scalings
    mask = multi_keep_mask(backend, seed_for(1234), x.shape, rows, ps)
    y_ref, g_ref = multi_oracle(case, rows, mask, ps, dy)
    assert y.dtype == torch.float16
    tol = TOL[torch.float16]
    assert rel_err(y, y_ref) < tol and rel_err(x.grad, g_ref["x"]) < tol
    for i in (0, 2):
        assert As[i].grad.dtype == torch.float32
        assert rel_err(As[i].grad, g_ref["lora_As"][i]) < tol, i
        assert rel_err(Bs[i].grad, g_ref["lora_Bs"][i]) < tol, i
    base = F.linear(x.detach().float(), case["weight"].float(), case["bias"].float())
    assert rel_err(y[1], base[1].double()) < tol  # the sample of the absent adapter: base output


def test_non_contiguous_input_and_grad_output(monkeypatch):
    """x a transposed view (two row groups), dy with column stride 2 (no copies): the kernels address each with its
    own layout, and the row ids follow x's logical (batch-major) rows."""
    lead, K, N, ranks = (4, 7), 36, 22, (3, 8)
    case = make_multi_case(lead, K, N, ranks, torch.float32)
    case["x"] = torch.randn(7, 4, K, generator=torch.Generator().manual_seed(8)).transpose(0, 1)
    dy = torch.randn(4, 7, 2 * N, generator=torch.Generator().manual_seed(9))[..., ::2]
    assert not case["x"].is_contiguous() and not dy.is_contiguous()
    segments = AdapterSegments([1, None, 0, 1])
    ps = [0.2, 0.3]
    y, grads = run("triton", case, segments, ps, monkeypatch, dy=dy)
    rows = row_ids(segments, 28)
    y_ref, g_ref = multi_oracle(case, rows, multi_keep_mask("triton", seed_for(1234), case["x"].shape, rows, ps),
                                ps, dy)
    assert grads["x"].shape == case["x"].shape
    assert_close(y, grads, y_ref, g_ref, TOL[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend, monkeypatch):
    case = make_multi_case((2, 0), 12, 10, (2, 3), torch.float32)
    y, grads = run(backend, case, AdapterSegments([1, 0]), [0.1, 0.0], monkeypatch,
                   dy=torch.zeros(2, 0, 10))
    assert y.shape == (2, 0, 10) and grads["x"].shape == (2, 0, 12)
    assert all(torch.count_nonzero(g) == 0 for g in grads["lora_As"] + grads["lora_Bs"])


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("torch", torch.float32),
                                           ("torch", torch.bfloat16)])
def test_base_rows_base_output_and_no_gradient(backend, dtype, monkeypatch):
    """Rows with no adapter give x·Wᵀ + b; a gradient arriving only on those rows reaches no adapter."""
    lead, K, N, ranks = (5, 6), 40, 24, (1, 8, 70)
    case = make_multi_case(lead, K, N, ranks, dtype)
    samples = [None, 0, 2, None, 1]
    segments = AdapterSegments(samples)
    dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(5)).to(dtype)
    base_rows = torch.tensor([s is None for s in samples])
    dy[~base_rows] = 0
    y, grads = run(backend, case, segments, [0.3, 0.2, 0.1], monkeypatch, dy=dy)
    base = F.linear(case["x"].double(), case["weight"].double(), case["bias"].double())
    assert rel_err(y[base_rows], base[base_rows]) < TOL[dtype]
    for g in grads["lora_As"] + grads["lora_Bs"]:
        assert torch.count_nonzero(g) == 0
    want_dx = dy.double() @ case["weight"].double()
    assert rel_err(grads["x"], want_dx) < TOL[dtype]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_one_adapter_on_every_row_is_fused_lora_linear(backend, monkeypatch):
    """One adapter on all rows is the single-adapter layer, dropout mask included (same seed, same mask)."""
    case = make_multi_case((3, 8), 44, 30, (6,), torch.float32)
    dy = torch.randn(3, 8, 30, generator=torch.Generator().manual_seed(2))
    y, grads = run(backend, case, AdapterSegments([0, 0, 0]), [0.3], monkeypatch, dy=dy)
    x = case["x"].clone().requires_grad_(True)
    A = case["lora_As"][0].clone().requires_grad_(True)
    B = case["lora_Bs"][0].clone().requires_grad_(True)
    torch.manual_seed(1234)
    y1 = fused_lora_linear(x, case["weight"], case["bias"], A, B, case["scalings"][0], dropout_p=0.3)
    y1.backward(dy)
    tol = TOL[torch.float32]
    assert rel_err(y, y1.double()) < tol
    for got, want in ((grads["x"], x.grad), (grads["lora_As"][0], A.grad), (grads["lora_Bs"][0], B.grad)):
        assert rel_err(got, want.double()) < tol


def identity_adapters(K, ps):
    """W = 0, every A = B = I, scaling 1: row m's output is dropout_{p_a}(x[m]) exactly (0 for base rows)."""
    n = len(ps)
    return dict(weight=torch.zeros(K, K), bias=None, lora_As=[torch.eye(K) for _ in range(n)],
                lora_Bs=[torch.eye(K) for _ in range(n)], scalings=[1.0] * n, dropout_ps=ps)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dropout_rate_scale_and_untouched_rows_per_adapter(backend, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    T, K = 40, 16
    samples = [0, 1, None, 2, 1]
    ps = [0.5, 0.0, 0.1]
    x = torch.ones(len(samples), T, K)
    torch.manual_seed(0)
    y = fused_multi_lora_linear(x, segments=AdapterSegments(samples), **identity_adapters(K, ps))
    for b, a in enumerate(samples):
        if a is None:
            assert torch.count_nonzero(y[b]) == 0
            continue
        kept = y[b] != 0
        assert abs(1.0 - kept.float().mean().item() - ps[a]) < 0.05, (b, a)
        assert torch.allclose(y[b][kept], torch.full_like(y[b][kept], 1.0 / (1.0 - ps[a]))), (b, a)
    assert torch.equal(y[1], x[1]) and torch.equal(y[4], x[4])  # p = 0: untouched, exactly
    state = torch.get_rng_state()
    fused_multi_lora_linear(x, segments=AdapterSegments(samples), training=False, **identity_adapters(K, ps))
    assert torch.equal(torch.get_rng_state(), state)  # eval: no dropout, no random draw


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_regenerates_each_adapters_mask(backend, monkeypatch):
    """Random numbers drawn between forward and backward do not change the masks backward uses."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    lead, K, N, ranks = (4, 6), 32, 20, (4, 8)
    case = make_multi_case(lead, K, N, ranks, torch.float32)
    segments = AdapterSegments([1, 0, None, 1])
    ps = [0.4, 0.2]
    x = case["x"].clone().requires_grad_(True)
    As = [A.clone().requires_grad_(True) for A in case["lora_As"]]
    Bs = [B.clone().requires_grad_(True) for B in case["lora_Bs"]]
    seed = seed_for(77)
    torch.manual_seed(77)
    y = fused_multi_lora_linear(x, case["weight"], case["bias"], As, Bs, case["scalings"], ps, segments)
    torch.rand(1000)
    torch.manual_seed(1)
    dy = torch.randn_like(y)
    y.backward(dy)
    rows = row_ids(segments, 24)
    y_ref, g_ref = multi_oracle(case, rows, multi_keep_mask(backend, seed, x.shape, rows, ps), ps, dy)
    grads = {"x": x.grad, "lora_As": [A.grad for A in As], "lora_Bs": [B.grad for B in Bs]}
    assert_close(y.detach(), grads, y_ref, g_ref, TOL[torch.float32])


def spy_launch_flag(monkeypatch, flag):
    """{kernel name: [value of constexpr `flag` at each launch]} for the two gradient kernels (spied on the jit
    function: deterministic mode launches it directly, with its pinned config)."""
    from lora_kernels.ops.lora_dy_b import _lora_dy_b_kernel
    from lora_kernels.ops.lora_linear_bwd_dx import _lora_linear_bwd_dx_kernel

    seen = {}
    for kernel, name in ((_lora_dy_b_kernel, "_lora_dy_b_kernel"),
                         (_lora_linear_bwd_dx_kernel, "_lora_linear_bwd_dx_kernel")):
        def spy(*args, _run=kernel.fn.run, _name=name, **kwargs):
            seen.setdefault(_name, []).append(kwargs[flag])
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel.fn, "run", spy)
    return seen


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_deterministic_mode_bitwise_repeatable(backend, monkeypatch):
    """Under torch.use_deterministic_algorithms the Triton backward writes per-row-block partials of every
    adapter's grad_A / grad_B (no atomics) summed in a fixed order: equal bit for bit, and right."""
    lead, K, N, ranks = (6, 7), 40, 33, (1, 8, 70)
    case = make_multi_case(lead, K, N, ranks, torch.float32)
    segments = AdapterSegments([2, 0, None, 1, 2, 0])
    ps = [0.25, 0.0, 0.1]
    dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(4))
    # The interpreter runs atomics in a fixed order, so bitwise equality alone cannot fail on CPU: also check
    # that both gradient kernels were launched in their partial-sum (no-atomics) mode.
    modes = spy_launch_flag(monkeypatch, "DETERMINISTIC")
    torch.use_deterministic_algorithms(True)
    try:
        y, grads = run(backend, case, segments, ps, monkeypatch, dy=dy)
        _, again = run(backend, case, segments, ps, monkeypatch, dy=dy)
    finally:
        torch.use_deterministic_algorithms(False)
    if backend == "triton":
        assert modes == {"_lora_dy_b_kernel": [True, True], "_lora_linear_bwd_dx_kernel": [True, True]}
    rows = row_ids(segments, 42)
    y_ref, g_ref = multi_oracle(case, rows, multi_keep_mask(backend, seed_for(1234), case["x"].shape, rows, ps),
                                ps, dy)
    assert_close(y, grads, y_ref, g_ref, TOL[torch.float32])
    assert torch.equal(grads["x"], again["x"])
    for name in ("lora_As", "lora_Bs"):
        for got, rerun in zip(grads[name], again[name]):
            assert torch.equal(got, rerun), name


@pytest.fixture
def launches(monkeypatch):
    """Counts calls of the four Triton launchers (the backend imports them from their modules at call time)."""
    import lora_kernels.ops.lora_dy_b as dy_b
    import lora_kernels.ops.lora_linear_bwd_dx as bwd_dx
    import lora_kernels.ops.lora_linear_fwd as fwd
    import lora_kernels.ops.lora_shrink as shrink

    calls = []
    for module, name in ((shrink, "lora_shrink"), (fwd, "lora_linear_fwd"), (dy_b, "lora_dy_b"),
                         (bwd_dx, "lora_linear_bwd_dx")):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def test_kernel_launches_do_not_grow_with_adapters(launches, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_GEMM", "fused")
    for ranks, samples in (((8,), [0, 0, None, 0, 0]), ((8, 1), [1, 0, None, 1, 0]),
                           ((8, 1, 3, 16, 2), [4, 0, 3, 1, 2])):
        n = len(ranks)
        case = make_multi_case((5, 4), 20, 18, ranks, torch.float32)
        launches.clear()
        dy = torch.randn(5, 4, 18, generator=torch.Generator().manual_seed(1))
        run("triton", case, AdapterSegments(samples), [0.1] * n, monkeypatch, dy=dy)
        assert sorted(launches) == ["lora_dy_b", "lora_linear_bwd_dx", "lora_linear_fwd", "lora_shrink"], n


class OpCounter:
    """Counts the aten / custom ops a layer's forward + backward dispatches (views and metadata excluded: they
    launch nothing). Ops inside the custom ops are not seen: the launcher spy above counts those."""

    NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "unsqueeze", "squeeze",
                 "expand", "alias", "detach", "as_strided", "reshape", "_reshape_alias", "split", "split_with_sizes",
                 "unbind", "narrow", "empty", "new_empty", "empty_like", "lift_fresh", "_to_copy", "to",
                 "promote_types"}  # host-side dtype arithmetic

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name not in OpCounter.NO_KERNEL:
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_layer_ops_do_not_grow_with_adapters(backend, monkeypatch):
    """Everything a layer dispatches in forward + backward (stacking glue, custom ops, casts) is the same for 2
    and for 5 adapters of different ranks: no per-adapter work outside the kernels either."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    monkeypatch.setenv("LORA_KERNELS_GEMM", "fused")
    seen = []
    for ranks, samples in (((8, 1), [1, 0, None, 1, 0]), ((8, 1, 3, 16, 2), [4, 0, 3, 1, 2])):
        case = make_multi_case((5, 4), 20, 18, ranks, torch.float32)
        params = [t.clone().requires_grad_(True) for t in case["lora_As"] + case["lora_Bs"]]
        n = len(ranks)
        counter = OpCounter()
        with counter.mode:
            y = fused_multi_lora_linear(case["x"], case["weight"], case["bias"], params[:n], params[n:],
                                        case["scalings"], [0.1] * n, AdapterSegments(samples))
            torch.autograd.grad(y, params, torch.ones_like(y))
        seen.append(counter.counts)
    assert seen[0] == seen[1], seen


def saved_storages(fn):
    """{storage data_ptr: (nbytes, shape of the first tensor saved from it)} of everything saved for backward."""
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("triton", torch.float16),
                                           ("torch", torch.bfloat16)])
def test_saves_x_once_and_the_shrink(backend, dtype, monkeypatch):
    """Two layers (q and v) read one x with 3 adapters and dropout: saved are x (once), per layer the (M, r_max)
    shrink, a seed, the (M,) row ids and row order (one tensor each, shared by both layers) and the stacked
    adapters — nothing else of x's size, no mask, no per-adapter copy."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    lead, K, N, ranks = (4, 16), 48, 40, (2, 8, 5)
    segments = AdapterSegments([0, 2, None, 1])
    cases = [make_multi_case(lead, K, N, ranks, dtype, seed=s) for s in (0, 1)]
    x = cases[0]["x"].clone().requires_grad_(True)
    params = [[A.clone().requires_grad_(True) for A in c["lora_As"]] + [B.clone().requires_grad_(True)
                                                                         for B in c["lora_Bs"]] for c in cases]

    def two_layers():
        return [fused_multi_lora_linear(x, c["weight"], c["bias"], p[:3], p[3:], c["scalings"], [0.1, 0.2, 0.0],
                                        segments) for c, p in zip(cases, params)]

    saved, _ = saved_storages(two_layers)
    for c in cases:
        for t in (c["weight"], c["bias"]):
            saved.pop(t.untyped_storage().data_ptr(), None)
    M, r_max = 64, 8
    x_bytes = x.numel() * x.element_size()
    big = {ptr: v for ptr, v in saved.items() if v[0] >= x_bytes // 2}
    assert big == {x.untyped_storage().data_ptr(): (x_bytes, tuple(x.shape))}
    shapes = sorted(shape for _, shape in saved.values())
    xa_shape = (M, r_max)
    assert shapes.count(xa_shape) == 2  # one shrink per layer
    assert shapes.count((M,)) == 2      # the row ids and the row order: one tensor each for both layers
    assert shapes.count((3, r_max, K)) == 2 and shapes.count((3, N, r_max)) == 2  # the stacked adapters
    assert shapes.count((1,)) == 2      # the seeds
    assert len(saved) == 1 + 2 + 2 + 4 + 2


def test_bad_segments_and_adapter_lists_are_refused(monkeypatch):
    case = make_multi_case((3, 4), 12, 10, (2, 3), torch.float32)

    def call(segments, x=None, **over):
        args = dict(lora_As=case["lora_As"], lora_Bs=case["lora_Bs"], scalings=case["scalings"],
                    dropout_ps=[0.0, 0.0])
        args.update(over)
        return fused_multi_lora_linear(case["x"] if x is None else x, case["weight"], case["bias"],
                                       segments=segments, **args)

    with pytest.raises(ValueError, match=r"adapter index 4 .* 2 adapters"):
        call(AdapterSegments([0, 4, None]))
    with pytest.raises(ValueError, match=r"3 samples .* 10 rows"):
        call(AdapterSegments([0, 1, None]), x=torch.randn(10, 12))
    with pytest.raises(ValueError, match=r"2 samples .* 3 in its batch dim"):
        call(AdapterSegments([0, 1]))
    with pytest.raises(ValueError, match=r"unknown adapter 'c'.*\['a', 'b'\]"):
        AdapterSegments.from_names(["a", "c"], ["a", "b"])
    with pytest.raises(ValueError, match=r"1 lora_Bs"):
        call(AdapterSegments([0, 1, 0]), lora_Bs=case["lora_Bs"][:1])
    with pytest.raises(ValueError, match=r"adapter 1: lora_B must have shape"):
        call(AdapterSegments([0, 1, 0]), lora_Bs=[case["lora_Bs"][0], case["lora_Bs"][0]])
    with pytest.raises(ValueError, match=r"adapter 0: dropout_p"):
        call(AdapterSegments([0, 1, 0]), dropout_ps=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"sample_adapters\[1\]"):
        AdapterSegments([0, -2])


def test_row_ids_computed_once_per_layer_set():
    """Layers that see the same rows and hold the same adapters share one row-id tensor; the id map follows
    each layer's own numbering (adapters it lacks give base rows)."""
    segments = AdapterSegments([2, 0, None, 1])
    assert segments.row_adapter(8) is segments.row_adapter(8)
    assert segments.row_adapter(8).tolist() == [2, 2, 0, 0, -1, -1, 1, 1]
    assert segments.row_adapter(4, slots=(0, -1, 1)).tolist() == [1, 0, -1, -1]


def test_row_order_is_a_stable_sort_by_adapter_shared_by_every_layer():
    """Base rows first, then each adapter's rows in batch order; one tensor per row count, whatever a layer's
    slots (they keep the model's order, so the sorted rows are runs of slots for every layer)."""
    segments = AdapterSegments([2, 0, None, 1, 0])
    order = segments.row_order(10)
    assert order.dtype == torch.int32 and order.tolist() == [4, 5, 2, 3, 8, 9, 6, 7, 0, 1]
    assert segments.row_order(10) is order and segments.row_order(5).tolist() == [2, 1, 4, 3, 0]
    for slots in (None, (0, -1, 1), (-1, 0, -1)):
        ids = segments.row_adapter(10, slots=slots)[order.long()].tolist()
        runs = [a for i, a in enumerate(ids) if a >= 0 and (i == 0 or ids[i - 1] != a)]
        assert len(runs) == len(set(runs)), (slots, ids)  # each adapter's rows in one run (base rows: one or more)


def record_tile_spans(monkeypatch):
    """{kernel module: set of (first, last) adapter ids of the row tiles it ran}, read from the real kernels under
    the interpreter (they look tile_adapters up in their module's globals at run time)."""
    import lora_kernels.ops.lora_dy_b as dy_b
    import lora_kernels.ops.lora_linear_bwd_dx as bwd_dx
    import lora_kernels.ops.lora_linear_fwd as fwd
    import lora_kernels.ops.lora_shrink as shrink

    spans = {}
    for module in (shrink, fwd, dy_b, bwd_dx):
        def spy(aid_ptr, rm, row_ok, _real=module.tile_adapters, _name=module.__name__.rsplit(".", 1)[1]):
            aid, first, last = _real(aid_ptr, rm, row_ok)
            spans.setdefault(_name, set()).add((first.handle.data.item(), last.handle.data.item()))
            return aid, first, last

        monkeypatch.setattr(module, "tile_adapters", spy)
    return spans


def expected_spans(ids, block_m):
    """[(first, last) adapter id of each block_m-row tile] of rows with adapter `ids` (-1: base) in tile order."""
    spans = []
    for i in range(0, len(ids), block_m):
        used = [a for a in ids[i:i + block_m] if a >= 0]
        spans.append((min(used), max(used)) if used else (2**31 - 1, -1))
    return spans


def loop_count(spans):
    """Adapter-loop iterations of tiles with these spans (range(first, last + 1), empty for base-only tiles)."""
    return sum(max(0, last - first + 1) for first, last in spans)


def test_tiles_of_a_random_order_decode_batch_span_a_run_of_adapters(monkeypatch):
    """48 one-token samples, 4 adapters and base rows in random order: in batch order every 16-row tile holds
    (nearly) every adapter; the kernels' tiles walk the sorted rows, so each spans one or two adapters."""
    import random

    samples = [None, 0, 1, 2, 3] * 9 + [1, 2, 3]
    random.Random(3).shuffle(samples)
    segments = AdapterSegments(samples)
    case = make_multi_case((48,), 24, 20, (8, 2, 16, 4), torch.float32)
    ids = segments.row_adapter(48).tolist()
    block_m = 16  # the interpreter's one config (ops/configs.py)
    in_batch_order, sorted_order = expected_spans(ids, block_m), expected_spans(sorted(ids), block_m)
    # The batch is one that needs the sort: batch-order tiles each loop over all four adapters.
    assert loop_count(in_batch_order) == 4 * len(in_batch_order) and loop_count(sorted_order) <= 3 + 4 - 1
    spans = record_tile_spans(monkeypatch)
    dy = torch.randn(48, 20, generator=torch.Generator().manual_seed(1))
    run("triton", case, segments, [0.1, 0.0, 0.2, 0.0], monkeypatch, dy=dy)
    assert spans == {name: set(sorted_order) for name in ("lora_shrink", "lora_linear_fwd", "lora_dy_b",
                                                          "lora_linear_bwd_dx")}


def test_sorted_tiles_keep_each_logical_rows_dropout_mask_bit_for_bit(monkeypatch):
    """With W = 0 and A = B = I every output is exact: y = dropout_{p_a}(x) and grad_x = dropout_{p_a}(dy) per
    logical row, bit for bit the Philox mask of that row, and the same as walking the rows in batch order (the
    kernels before the sort): every M-indexed tensor is read and written at its logical row."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    T, K = 3, 24
    samples = [2, None, 0, 1, 2, 0, None, 1, 1, 0, 2, None]
    ps = [0.25, 0.0, 0.5]
    x = torch.randn(len(samples), T, K, generator=torch.Generator().manual_seed(4))
    dy = torch.randn(len(samples), T, K, generator=torch.Generator().manual_seed(5))
    batch_order = AdapterSegments(samples)
    monkeypatch.setattr(batch_order, "row_order", lambda M, device: torch.arange(M, dtype=torch.int32, device=device))
    results = []
    for segments in (AdapterSegments(samples), batch_order):
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(1234)
        y = fused_multi_lora_linear(xg, segments=segments, **identity_adapters(K, ps))
        y.backward(dy)
        results.append((y.detach(), xg.grad))
    rows = row_ids(AdapterSegments(samples), len(samples) * T)
    keep = multi_keep_mask("triton", seed_for(1234), x.shape, rows, ps)
    scale = torch.tensor([1.0 / (1.0 - ps[a]) if a >= 0 else 0.0 for a in rows]).view(len(samples), T, 1)
    lora_rows = torch.tensor([a >= 0 for a in rows]).view(len(samples), T, 1)
    want_y = torch.where(keep & lora_rows, x * scale, 0.0)
    want_dx = torch.where(keep & lora_rows, dy * scale, 0.0)
    for y, dx in results:
        assert torch.equal(y, want_y) and torch.equal(dx, want_dx)


def test_fullgraph_compile_traces_the_custom_ops(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    case = make_multi_case((3, 5), 16, 12, (2, 4), torch.float32)
    segments = AdapterSegments([1, None, 0])

    def f(x, A0, A1, B0, B1):
        return fused_multi_lora_linear(x, case["weight"], case["bias"], [A0, A1], [B0, B1], case["scalings"],
                                       [0.1, 0.0], segments)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        ins = [t.clone().requires_grad_(True) for t in [case["x"]] + case["lora_As"] + case["lora_Bs"]]
        torch.manual_seed(0)
        y = fn(*ins)
        y.square().sum().backward()
        results.append([y.detach()] + [t.grad for t in ins])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


def test_compiled_layer_does_not_recompile_for_new_adapter_mixes(monkeypatch):
    """The per-sample ids reach the graph as a tensor: a new mix of the same adapters reuses the graph."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    case = make_multi_case((3, 5), 16, 12, (2, 4), torch.float32)

    def f(x, segments):
        return fused_multi_lora_linear(x, case["weight"], case["bias"], case["lora_As"], case["lora_Bs"],
                                       case["scalings"], [0.0, 0.0], segments)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for mix in ([1, None, 0], [0, 1, 1], [None, 0, 1], [1, 1, 0]):
        segments = AdapterSegments(mix)
        assert torch.allclose(compiled(case["x"], segments), f(case["x"], segments), atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_every_gpu_tile_config_and_both_gemm_paths(monkeypatch):
    """The GPU's autotune configs (row tiles up to 256: one tile spans every sample here, so the adapter loop
    runs for all of them) under the interpreter, one config at a time for each kernel, alternating the fused
    path with atomics and the split path with deterministic partials (sized from the smallest BLOCK_M)."""
    gpu = gpu_tile_configs(monkeypatch)
    lead, K, N, ranks = (6, 11), 40, 36, (1, 70, 8)  # r_max = 70: two rank chunks for adapter 1 only
    case = make_multi_case(lead, K, N, ranks, torch.float16, ab_dtype=torch.float32)
    segments = AdapterSegments([1, 0, None, 2, 1, 2])
    ps = [0.1, 0.2, 0.0]
    dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(2)).half()
    rows = row_ids(segments, 66)
    y_ref, g_ref = multi_oracle(case, rows, multi_keep_mask("triton", seed_for(1234), case["x"].shape, rows, ps),
                                ps, dy)
    for i in range(max(len(c) for c in gpu.values())):
        for kernel, cfgs in gpu.items():
            monkeypatch.setattr(kernel, "configs", [cfgs[i % len(cfgs)]])
            monkeypatch.setattr(kernel, "cache", {})
        gemm, deterministic = ("fused", False) if i % 2 == 0 else ("split", True)
        monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
        torch.use_deterministic_algorithms(deterministic)
        try:
            y, grads = run("triton", case, segments, ps, monkeypatch, dy=dy)
        finally:
            torch.use_deterministic_algorithms(False)
        assert_close(y, grads, y_ref, g_ref, TOL[torch.float16], f"config {i}, {gemm}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_oracle(dtype, monkeypatch):
    lead, K, N, ranks = (8, 96), 256, 192, (1, 8, 70, 16)
    case = make_multi_case(lead, K, N, ranks, dtype)
    case = {k: (v.cuda() if isinstance(v, torch.Tensor) else [t.cuda() for t in v] if k.startswith("lora") else v)
            for k, v in case.items()}
    segments = AdapterSegments([3, 0, None, 2, 1, 1, None, 0])
    dy = torch.randn(*lead, N, device="cuda", dtype=dtype)
    y, grads = run("triton", case, segments, [0.0] * 4, monkeypatch, dy=dy)
    rows = segments.row_adapter(8 * 96).tolist()
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v] if k.startswith("lora") else v)
           for k, v in case.items()}
    y_ref, g_ref = multi_oracle(cpu, rows, None, None, dy.cpu())
    grads = {"x": grads["x"].cpu(), "lora_As": [g.cpu() for g in grads["lora_As"]],
             "lora_Bs": [g.cpu() for g in grads["lora_Bs"]]}
    assert_close(y.cpu(), grads, y_ref, g_ref, TOL[dtype])
