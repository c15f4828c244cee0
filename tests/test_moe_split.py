"""The MoE experts' split GEMM path (torch's grouped_mm for the base product, ops/grouped_lora_gemm.py adding the
LoRA term and bias in place) under the interpreter: against the float64 per-pair oracle of tests/test_moe_kernels.py,
equal to the fused path, rows routed to no local expert zero, launches independent of E, the per-shape choice
(gemm_dispatch.choose with the experts' keys), the operands grouped_mm refuses, and a tiny Qwen3-MoE."""
import pytest
import torch

pytest.importorskip("triton")

import lora_kernels as lk  # noqa: E402
from lora_kernels.backends import gemm_dispatch  # noqa: E402
from lora_kernels.backends.triton_experts import TritonGroupedLoraFunction  # noqa: E402
from lora_kernels.functional import ExpertRouting, fused_grouped_lora_linear  # noqa: E402
from lora_kernels.ops.grouped_lora_gemm import grouped_mm_refusal  # noqa: E402
from test_moe_kernels import _close, _fwd_bwd, _run, launches  # noqa: E402,F401 (launches: a fixture)


pytestmark = pytest.mark.usefixtures("fresh_gemm_choices")


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """Every torch._grouped_mm call (the op torch.nn.functional.grouped_mm runs), as (a's shape, b's shape). The rows of its output past offs[-1] are filled with NaN,
    as uninitialised memory may hold (torch leaves them unwritten), so a path that does not zero them fails."""
    calls = []
    real = torch._grouped_mm

    def spy(a, b, offs=None, **kwargs):
        calls.append((tuple(a.shape), tuple(b.shape)))
        out = real(a, b, offs=offs, **kwargs)
        out[int(offs[-1]):] = float("nan")
        return out

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    return calls


def _check(y, ref, leaves, ref_leaves, routing, r=3):
    _close(y, ref.detach())
    for n in leaves:
        _close(leaves[n].grad, ref_leaves[n].grad)
    for e, n in enumerate(routing.counts):
        if n == 0:  # no rows: exactly zero gradient for the expert's A rows and B columns
            assert leaves["lora_A"].grad[e * r:(e + 1) * r].abs().max() == 0
            assert leaves["lora_B"].grad[:, e::len(routing.counts)].abs().max() == 0


@pytest.mark.parametrize("k,E,routing_kind,p,transposed,bias", [
    (2, 5, "sentinel", 0.3, False, False), (2, 5, "sentinel", 0.3, True, True),  # both layouts, dropout
    (8, 10, "uneven", 0.3, True, True),  # top-8: experts with 0, 1 and many rows
    (1, 4, "one", 0.0, False, False),    # every pair to one expert: several row tiles of it
])
def test_split_path_matches_the_float64_oracle(k, E, routing_kind, p, transposed, bias, monkeypatch, launches,
                                               grouped_mm_calls):
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")
    T = 20 if routing_kind == "one" else 9
    y, ref, leaves, ref_leaves, routing = _run(T, k, E, 24, 20, 3, p, transposed, bias, routing_kind)
    S = T * k
    # one grouped_mm forward (x·W_eᵀ, W_e viewed (E, in, out)) and one for grad_x (dy·W_e, viewed (E, out, in))
    assert grouped_mm_calls == [((S, 24), (E, 24, 20)), ((S, 20), (E, 20, 24))]
    assert launches.count("grouped_lora_gemm") == 2  # the LoRA term (and bias) still on the grouped kernel
    _check(y, ref, leaves, ref_leaves, routing)


def test_split_equals_fused_and_sentinel_rows_stay_zero(monkeypatch, grouped_mm_calls):
    outs = {}
    for gemm in ("fused", "split"):
        monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
        y, _, leaves, _, _ = _run(9, 2, 5, 24, 20, 3, 0.3, True, True, "sentinel")
        outs[gemm] = [y.detach()] + [leaves[n].grad for n in ("x", "lora_A", "lora_B")]
    assert len(grouped_mm_calls) == 2
    for fused, split in zip(outs["fused"], outs["split"]):
        torch.testing.assert_close(split, fused, rtol=1e-5, atol=1e-5)
    y = outs["split"][0]
    assert y[3, 0].abs().max() == 0 and y[5, 1].abs().max() == 0  # the two pairs routed to no local expert


def test_split_launches_do_not_grow_with_experts(monkeypatch, launches, grouped_mm_calls):
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")
    _fwd_bwd(E=4)
    small, small_mm = list(launches), len(grouped_mm_calls)
    launches.clear()
    grouped_mm_calls.clear()
    _fwd_bwd(E=16)
    assert launches == small and len(grouped_mm_calls) == small_mm == 2


def test_auto_off_cuda_takes_fused_without_measuring(monkeypatch, grouped_mm_calls):
    def no_measure(*args, **kwargs):
        raise AssertionError("auto must not measure off CUDA")

    monkeypatch.setattr(gemm_dispatch, "measure", no_measure)
    _run(9, 2, 5, 24, 20, 3, 0.3, False, False, "sentinel")
    assert grouped_mm_calls == [] and gemm_dispatch.gemm_choices() == {}


def test_auto_measures_the_experts_passes_and_keeps_the_faster(monkeypatch, grouped_mm_calls):
    """With measuring allowed (as on a GPU), each experts pass is measured once per key on its real operands
    (here a stand-in timer that runs both paths and calls split faster), and the choice is recorded."""
    ran = []

    def fake_measure(run, device):
        for path in ("fused", "split"):
            ran.append(path)
            run(path)
        return {"fused": 2.0, "split": 1.0}

    monkeypatch.setattr(gemm_dispatch, "_measurable", lambda device: True)
    monkeypatch.setattr(gemm_dispatch, "measure", fake_measure)
    y, ref, leaves, ref_leaves, routing = _run(9, 2, 5, 24, 20, 3, 0.3, True, True, "sentinel")
    choices = gemm_dispatch.gemm_choices()
    # 16 routed rows of 18 (two sentinels), E = 5, in 24, out 20, r 3
    fwd = gemm_dispatch.GemmKey("experts_fwd", "cpu", "float32", 16, 24, 20, 3, "bias", 5)
    bwd = gemm_dispatch.GemmKey("experts_bwd", "cpu", "float32", 16, 24, 20, 3, "dropout", 5)
    assert set(choices) == {fwd, bwd}
    assert all(path == "split" for path, _ in choices.values())
    assert fwd.describe() == "experts_fwd float32 E5 M<=16 24->20 r3 bias"
    assert ran == ["fused", "split"] * 2
    assert len(grouped_mm_calls) == 4  # one measuring run and the real one, per pass
    _check(y, ref, leaves, ref_leaves, routing)


def test_operands_grouped_mm_refuses(monkeypatch, grouped_mm_calls):
    # in = 18 float32 columns: 72-byte rows, not a multiple of 16 bytes
    monkeypatch.setattr(gemm_dispatch, "_measurable", lambda device: True)
    _run(9, 2, 5, 18, 20, 3, 0.3, False, False, "sentinel")  # auto: fused, nothing measured
    assert grouped_mm_calls == [] and gemm_dispatch.gemm_choices() == {}
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")
    with pytest.raises(ValueError, match="LORA_KERNELS_GEMM=split: torch.s grouped_mm cannot .*16-byte rows"):
        _run(9, 2, 5, 18, 20, 3, 0.3, False, False, "sentinel")
    # a dtype torch's grouped_mm does not take is named
    E = 2
    routing = ExpertRouting.from_top_k(torch.tensor([[0], [1]]), E)
    x64, w64 = torch.zeros(2, 8, dtype=torch.float64), torch.zeros(E, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        TritonGroupedLoraFunction.apply(x64, w64, None, None, None, routing, 1.0, 0.0, False)
    assert "float64" in grouped_mm_refusal(x64, w64, w64.stride(), 8)
    half = torch.zeros(2, 8, dtype=torch.float16)
    assert "one dtype" in grouped_mm_refusal(half, w64.float(), w64.stride(), 8)


def test_no_routed_rows_and_no_adapter(monkeypatch, launches, grouped_mm_calls):
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")
    E, g = 4, torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 16, generator=g), torch.randn(E, 8, 16, generator=g)
    b = torch.randn(E, 8, generator=g)
    every_pair_elsewhere = ExpertRouting.from_top_k(torch.full((3, 1), E), E)
    y = fused_grouped_lora_linear(x, w, None, torch.zeros(2 * E, 16), torch.zeros(8, 2 * E), every_pair_elsewhere,
                                  1.0)
    assert torch.equal(y, torch.zeros(3, 8)) and grouped_mm_calls == [] and launches == []  # no work at all
    launches.clear()
    routing = ExpertRouting.from_top_k(torch.tensor([[1], [3], [1]]), E)
    y = fused_grouped_lora_linear(x[routing.token], w, b, None, None, routing, 1.0)  # no adapter: grouped_mm + bias
    ref = torch.stack([x[t] @ w[e].t() + b[e] for t, e in ((0, 1), (2, 1), (1, 3))])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert len(grouped_mm_calls) == 1 and launches == ["grouped_lora_gemm"]


def test_autotuning_reruns_leave_the_split_outputs_right(monkeypatch, gpu_like_autotune, grouped_mm_calls):
    """Several configs benchmarked as on a GPU (tests/gpu_like_autotune.py): on the split path the GEMM kernel adds
    to grouped_mm's output in place, so the autotuner must put the output back after each benchmark run."""
    monkeypatch.setenv("LORA_KERNELS_GEMM", "split")
    y, ref, leaves, ref_leaves, routing = _run(9, 2, 5, 24, 20, 3, 0.3, True, True, "sentinel")
    assert len(grouped_mm_calls) == 2
    _check(y, ref, leaves, ref_leaves, routing)


def test_qwen3_moe_with_split_runs_grouped_mm_and_the_grouped_lora_kernels(monkeypatch, launches, grouped_mm_calls):
    pytest.importorskip("transformers")
    from test_moe_experts import _model

    model = _model("qwen3_moe")
    lk.inject_lora(model, lk.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, init_lora_weights=False,
                                        target_modules=["q_proj"],
                                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    results = {}
    for gemm in ("fused", "split"):
        monkeypatch.setenv("LORA_KERNELS_GEMM", gemm)
        model.zero_grad()
        launches.clear()
        torch.manual_seed(1)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[gemm] = [loss.detach()] + [p.grad.clone() for n, p in model.named_parameters() if "lora" in n]
        # two projections: 2 launches forward and 4 backward each, on either path
        assert sorted(launches) == sorted(["grouped_lora_shrink"] * 4 + ["grouped_lora_gemm"] * 4
                                          + ["grouped_lora_grad"] * 4), gemm
    assert len(grouped_mm_calls) == 4  # split: gate_up and down, forward and grad_x
    assert len(results["split"]) == 7  # the loss, 4 experts LoRA gradients and q_proj's 2
    for fused, split in zip(results["fused"], results["split"]):
        torch.testing.assert_close(split, fused, rtol=1e-4, atol=1e-5)
