"""scaling as a 0-dim tensor (PEFT's compiled hotswap keeps it so): same results as a float, no recompile
when its value changes, and PEFT's hotswap workflow on fused layers gives PEFT's outputs."""
import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from helpers import TOL, make_case, rel_err


def _run(case, scaling, p, dy):
    x, A, B = (case[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B"))
    torch.manual_seed(7)  # same dropout seed for both runs
    y = lk.fused_lora_linear(x, case["weight"], case["bias"], A, B, scaling, dropout_p=p, training=True)
    y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_tensor_scaling_equals_float_scaling(backend, p, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    case = make_case((3, 7), 24, 20, 4, torch.float32, seed=2)
    dy = torch.randn(3, 7, 20, generator=torch.Generator().manual_seed(1))
    want = _run(case, 1.5, p, dy)
    got = _run(case, torch.tensor(1.5), p, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w.double()) <= TOL[torch.float32]


def test_half_precision_adapters_with_tensor_scaling():
    case = make_case((5,), 16, 12, 4, torch.float32, ab_dtype=torch.bfloat16, seed=4)
    dy = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    want = _run(case, 0.75, 0.0, dy)
    got = _run(case, torch.tensor(0.75, dtype=torch.float64), 0.0, dy)
    assert got[3].dtype == torch.bfloat16  # grad_B in lora_B's own dtype
    for g, w in zip(got, want):
        assert rel_err(g, w.double()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_layer_follows_a_changed_scaling_without_recompiling(backend, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    torch._dynamo.reset()
    case = make_case((2, 5), 16, 12, 4, torch.float32, seed=6)
    scaling = torch.tensor(2.0)

    def f(x):
        return lk.fused_lora_linear(x, case["weight"], case["bias"], case["lora_A"], case["lora_B"], scaling)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    x = case["x"]
    assert torch.allclose(compiled(x), f(x), atol=1e-6)
    scaling.fill_(-0.5)
    y = compiled(x)
    want = lk.fused_lora_linear(x, case["weight"], case["bias"], case["lora_A"], case["lora_B"], -0.5)
    assert torch.allclose(y, want, atol=1e-6)
    assert counter.frame_count == 1
    torch._dynamo.reset()


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 8, bias=False)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _save_adapter(tmp_path, name, r, alpha, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _MLP()
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin0", "lin1"],
                                            init_lora_weights=False))
    path = tmp_path / name
    model.save_pretrained(path)
    return path


def _peft_model(path):
    from peft import PeftModel

    torch.manual_seed(0)
    return PeftModel.from_pretrained(_MLP(), path).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_peft_compiled_hotswap_on_fused_layers_gives_peft_outputs(backend, tmp_path, monkeypatch):
    """PEFT's documented workflow: load adapter 0, prepare_model_for_compiled_hotswap (scalings become tensors,
    ranks padded), compile, then hotswap adapter 1 (another rank and alpha) — fused, with no recompile."""
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
    from torch._dynamo.testing import CompileCounterWithBackend

    from lora_kernels.integrations.peft import fuse_peft_model

    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    torch._dynamo.reset()
    path0 = _save_adapter(tmp_path, "a0", r=4, alpha=8, seed=1)
    path1 = _save_adapter(tmp_path, "a1", r=2, alpha=3, seed=2)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want0, want1 = _peft_model(path0)(x), _peft_model(path1)(x)

    model = _peft_model(path0)
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    assert isinstance(model.base_model.model.lin0.scaling["default"], torch.Tensor)
    assert len(fuse_peft_model(model).fused) == 2
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        assert torch.allclose(compiled(x), want0, atol=1e-5)
        hotswap_adapter(model, str(path1), adapter_name="default")
        assert torch.allclose(compiled(x), want1, atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()
