"""The grouped Triton kernels of MoE experts (ops/grouped_lora_*.py, backends/triton_experts.py), under the
interpreter: against the float64 per-pair oracle with the Triton path's own dropout mask, dropout rates and the
forward/backward mask, uneven routing, top-k 1/2/8, the transposed + bias layout, launches that do not grow with
E, the backend rule, and FusedLoraExperts really running the kernels."""
import pytest
import torch

pytest.importorskip("triton")

import lora_kernels as lk  # noqa: E402
from lora_kernels import backends  # noqa: E402
from lora_kernels.backends.base import draw_seed  # noqa: E402
from lora_kernels.functional import ExpertRouting, fused_grouped_lora_linear  # noqa: E402
from lora_kernels.ops import grouped_lora_gemm, grouped_lora_grad, grouped_lora_shrink  # noqa: E402
from lora_kernels.reference import grouped_lora_reference  # noqa: E402

KERNELS = (grouped_lora_shrink._grouped_lora_shrink_kernel, grouped_lora_gemm._grouped_lora_gemm_kernel,
           grouped_lora_grad._grouped_lora_grad_kernel)


@pytest.fixture
def launches(monkeypatch):
    """Every grouped kernel launch, by kernel name (the autotuners' run, which a kernel[grid](...) call goes to)."""
    seen = []
    for kernel in KERNELS:
        name = kernel.fn.__name__.strip("_").removesuffix("_kernel")
        real = kernel.run
        monkeypatch.setattr(kernel, "run", lambda *a, _n=name, _r=real, **kw: seen.append(_n) or _r(*a, **kw))
    return seen


def _routing_idx(kind, T, k, E):
    """uneven: expert 0 gets no pair, expert 1 one, the last expert many; one: every pair to expert 2 (several
    row tiles of one expert); sentinel: uneven with two pairs routed to no local expert (id E)."""
    if kind == "one":
        return torch.full((T, k), 2, dtype=torch.long)
    idx = torch.empty(T, k, dtype=torch.long)
    for t in range(T):
        row = [E - 1] + [2 + (t + j) % (E - 2) for j in range(k - 1)] if t else [1] + [E - 1] * (k - 1)
        idx[t] = torch.tensor(row[:k])
    if kind == "sentinel":
        idx[3, 0] = idx[5, k - 1] = E
    return idx


def _run(T, k, E, fin, fout, r, p, transposed, bias, routing_kind="uneven", s=1.7):
    """(ours in pair order, the float64 oracle's, grads of x / lora_A / lora_B for both), ours on float32."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    w = (rnd(E, fin, fout) if transposed else rnd(E, fout, fin)) * fin ** -0.5
    b = rnd(E, fout) if bias else None
    leaves64 = {"x": rnd(T, fin), "lora_A": rnd(r * E, fin) * fin ** -0.5, "lora_B": rnd(fout, r * E) * r ** -0.5}
    idx = _routing_idx(routing_kind, T, k, E)
    routing = ExpertRouting.from_top_k(idx, E)
    leaves = {n: t.float().requires_grad_(True) for n, t in leaves64.items()}
    torch.manual_seed(123)
    y_sorted = fused_grouped_lora_linear(leaves["x"][routing.token], w.float(), None if b is None else b.float(),
                                         leaves["lora_A"], leaves["lora_B"], routing, s, p, transposed=transposed)
    dy = torch.randn(T * k, fout, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y_sorted * dy[routing.order].float()).sum().backward()
    keep = None
    if p > 0:
        torch.manual_seed(123)
        seed = draw_seed(torch.device("cpu"))  # the seed the forward drew
        keep_sorted = backends.keep_mask("triton", seed, (T * k, fin), p)  # row i: sorted pair i
        keep = torch.empty_like(keep_sorted)
        keep[routing.order] = keep_sorted
        keep = keep.view(T, k, fin)
    ref_leaves = {n: t.clone().requires_grad_(True) for n, t in leaves64.items()}
    valid = idx < E
    ref = grouped_lora_reference(ref_leaves["x"], idx.clamp(max=E - 1), w, b, ref_leaves["lora_A"],
                                 ref_leaves["lora_B"], s, keep, p, transposed=transposed)
    ref = ref * valid[..., None]  # pairs routed to no local expert: zero output
    (ref * dy.view(T, k, fout)).sum().backward()
    y = torch.empty_like(y_sorted)
    y[routing.order] = y_sorted
    return y.view(T, k, fout), ref, leaves, ref_leaves, routing


def _close(ours, ref):
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,E,routing_kind", [(1, 5, "uneven"), (2, 5, "sentinel"), (8, 10, "uneven"),
                                              (1, 4, "one")])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("transposed,bias", [(False, False), (True, True)])
def test_triton_path_matches_the_float64_oracle(k, E, routing_kind, p, transposed, bias, launches):
    T = 20 if routing_kind == "one" else 9  # all to one expert: 20 rows, two 16-row tiles of one expert
    y, ref, leaves, ref_leaves, routing = _run(T, k, E, 24, 20, 3, p, transposed, bias, routing_kind)
    assert launches, "the Triton path did not run"
    _close(y, ref.detach())
    for n in leaves:
        _close(leaves[n].grad, ref_leaves[n].grad)
    r = 3
    for e, n in enumerate(routing.counts):
        if n == 0:  # no rows: exactly zero gradient for the expert's A rows and B columns
            assert leaves["lora_A"].grad[e * r:(e + 1) * r].abs().max() == 0
            assert leaves["lora_B"].grad[:, e::E].abs().max() == 0


def test_autotuning_reruns_leave_the_outputs_right(gpu_like_autotune):
    """Several configs benchmarked as on a GPU (tests/gpu_like_autotune.py): the grouped kernels overwrite what
    they write (no accumulation), so a benchmark's extra runs need no reset hook and the results stay the oracle's."""
    y, ref, leaves, ref_leaves, _ = _run(9, 2, 5, 24, 20, 3, 0.3, True, True, "sentinel")
    _close(y, ref.detach())
    for n in leaves:
        _close(leaves[n].grad, ref_leaves[n].grad)
    for kernel in KERNELS:
        assert len(kernel.configs) == 2 and kernel.cache, kernel.fn.__name__


def _identity_case(p, T=64, k=2, E=4, r=8, seed=7):
    """W = 0, A_e = B_e = I (in = out = r), x = 1: y is the keep-mask scaled by 1/(1-p), element for element."""
    eye = torch.eye(r)
    A = eye.repeat(E, 1)                              # (r·E, r): A_e = I
    B = eye.repeat_interleave(E, dim=1)               # (r, r·E): B_e = I (column j·E + e is e_j)
    idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)[:, :k]
    routing = ExpertRouting.from_top_k(idx, E)
    x = torch.ones(T * k, r, requires_grad=True)
    torch.manual_seed(seed)
    y = fused_grouped_lora_linear(x, torch.zeros(E, r, r), None, A, B, routing, 1.0, p)
    return x, y


def test_dropout_rate_scale_and_the_same_mask_in_backward(launches):
    p = 0.3
    x, y = _identity_case(p)
    assert launches
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    dropped = float((~kept).float().mean())
    assert abs(dropped - p) < 0.06, dropped  # 1024 elements: sd ~0.014
    y.sum().backward()
    # grad_x = s·(1·B_e·A_e)⊙mask/(1-p) = mask/(1-p): backward drew exactly the forward's mask.
    assert torch.equal(x.grad, y.detach())


def test_dropout_reproducible_per_seed_and_per_pair(launches):
    _, y1 = _identity_case(0.5, seed=3)
    _, y2 = _identity_case(0.5, seed=3)
    _, y3 = _identity_case(0.5, seed=4)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # a token's two pairs are different rows with their own masks (tokens t and pairs sorted by expert)
    assert not torch.equal(y1[0::2], y1[1::2])
    _, y0 = _identity_case(0.0)
    assert torch.equal(y0, torch.ones_like(y0))


def _fwd_bwd(E, S=24, fin=16, fout=16, r=4):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, E, (S // 2, 2), generator=g)
    routing = ExpertRouting.from_top_k(idx, E)
    x = torch.randn(S, fin, generator=g, requires_grad=True)
    A = torch.randn(r * E, fin, generator=g, requires_grad=True)
    B = torch.randn(fout, r * E, generator=g, requires_grad=True)
    torch.manual_seed(0)
    y = fused_grouped_lora_linear(x, torch.randn(E, fout, fin, generator=g), None, A, B, routing, 2.0, 0.1)
    y.sum().backward()
    return x.grad, A.grad, B.grad


def test_deterministic_mode_runs_the_pinned_gradient_config():
    free = _fwd_bwd(E=4)
    torch.use_deterministic_algorithms(True)
    try:
        pinned = _fwd_bwd(E=4)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(free, pinned):
        torch.testing.assert_close(a, b)


def test_launches_do_not_grow_with_experts(launches):
    _fwd_bwd(E=4)
    small = list(launches)
    launches.clear()
    _fwd_bwd(E=16)
    assert launches == small
    # forward: shrink, GEMM; backward: dy·B (shrink), grad_x (GEMM), grad_A, grad_B
    assert sorted(small) == sorted(["grouped_lora_shrink"] * 2 + ["grouped_lora_gemm"] * 2
                                   + ["grouped_lora_grad"] * 2)


def test_tile_table_skips_empty_experts_and_never_spans_two():
    from lora_kernels.ops.expert_tiles import expert_tiles

    tiles = expert_tiles([0, 1, 0, 33, 16], 16, "cpu")
    assert tiles.table.tolist() == [[1, 0, 1], [3, 1, 17], [3, 17, 33], [3, 33, 34], [4, 34, 50]]
    assert tiles.offsets.tolist() == [0, 0, 1, 1, 34, 50] and tiles.routed == 50
    assert tiles.hit.tolist() == [1, 3, 4]


def test_no_adapter_and_trainable_base(launches):
    """Without an adapter the base projection alone runs on the GEMM kernel; a base weight that requires grad
    stays on the torch path (the kernels compute no weight gradient) with the same result."""
    E, S, fin, fout = 4, 12, 16, 8
    g = torch.Generator().manual_seed(0)
    routing = ExpertRouting.from_top_k(torch.randint(0, E, (S, 1), generator=g), E)
    x, w, b = torch.randn(S, fin, generator=g), torch.randn(E, fout, fin, generator=g), torch.randn(E, fout, generator=g)
    y = fused_grouped_lora_linear(x, w, b, None, None, routing, 1.0)
    assert launches == ["grouped_lora_gemm"]
    ref = torch.stack([x[i] @ w[e].t() + b[e] for i, e in enumerate(routing.token.new_tensor(
        sum(([e] * n for e, n in enumerate(routing.counts)), [])))])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    launches.clear()
    wt = w.clone().requires_grad_(True)
    fused_grouped_lora_linear(x, wt, b, None, None, routing, 1.0).sum().backward()
    assert launches == [] and wt.grad is not None


def test_backend_rule_and_errors_are_the_dense_layers(monkeypatch, launches):
    E = 4
    routing = ExpertRouting.from_top_k(torch.tensor([[0], [3]]), E)
    args = (torch.zeros(E, 8, 8, dtype=torch.float64), None, torch.zeros(2 * E, 8, dtype=torch.float64),
            torch.zeros(8, 2 * E, dtype=torch.float64), routing, 1.0)
    x64 = torch.zeros(2, 8, dtype=torch.float64)
    fused_grouped_lora_linear(x64, *args)  # auto: float64 runs on torch
    assert launches == []
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    with pytest.raises(ValueError, match="float64"):
        fused_grouped_lora_linear(x64, *args)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    fused_grouped_lora_linear(x64.float(), *(a.float() if isinstance(a, torch.Tensor) else a for a in args))
    assert launches == []


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_experts_layer_runs_the_kernels_on_triton(backend, monkeypatch, launches):
    pytest.importorskip("transformers")
    from test_moe_experts import _model

    model = _model("qwen3_moe")
    lk.inject_lora(model, lk.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj"],
                                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    if backend == "torch":
        assert launches == []
    else:  # two projections: 2 launches forward and 4 backward each
        assert sorted(launches) == sorted(["grouped_lora_shrink"] * 4 + ["grouped_lora_gemm"] * 4
                                          + ["grouped_lora_grad"] * 4)
    grads = [p.grad for n, p in model.named_parameters() if "lora" in n]
    assert grads and all(g is not None for g in grads)
