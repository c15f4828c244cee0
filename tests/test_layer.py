"""FusedLoraLinear: PEFT's init and scaling, merge/unmerge, from_linear, nn.Linear compatibility."""
import math

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # Module behaviour, not kernels: the parity tests cover the Triton path.
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


def test_default_init_is_identity_and_matches_peft():
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    base = nn.Linear(32, 24)
    layer = lk.FusedLoraLinear.from_linear(base, r=8, lora_alpha=16)
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=√5) on fan_in 32
    assert layer.lora_A.abs().max() <= bound
    peft = PeftLinear(base, "default", config=LoraConfig(r=8, lora_alpha=16), r=8, lora_alpha=16)
    assert layer.scaling == peft.scaling["default"] == 2.0
    assert layer.lora_A.shape == peft.lora_A["default"].weight.shape
    assert layer.lora_B.shape == peft.lora_B["default"].weight.shape


def test_rslora_scaling_and_gaussian_init():
    layer = lk.FusedLoraLinear(16, 8, r=16, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian")
    assert layer.scaling == pytest.approx(8 / 4)
    assert layer.lora_A.std().item() == pytest.approx(1 / 16, rel=0.2)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_init_false_changes_the_output():
    base = nn.Linear(16, 8)
    layer = lk.FusedLoraLinear.from_linear(base, r=4, init_lora_weights=False)
    x = torch.randn(3, 16)
    assert not torch.allclose(layer(x), base(x))


def test_from_linear_shares_storage_and_freezes():
    base = nn.Linear(16, 8)
    layer = lk.FusedLoraLinear.from_linear(base, r=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32)])
def test_from_linear_adapter_dtype_follows_peft(dtype, lora_dtype):
    layer = lk.FusedLoraLinear.from_linear(nn.Linear(8, 8, dtype=dtype))
    assert layer.lora_A.dtype == lora_dtype and layer.weight.dtype == dtype
    y = layer(torch.randn(2, 8, dtype=dtype))
    assert y.dtype == dtype


def test_linear_state_dict_loads():
    base = nn.Linear(12, 10)
    layer = lk.FusedLoraLinear(12, 10, r=2)
    result = layer.load_state_dict(base.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["lora_A", "lora_B"] and not result.unexpected_keys
    x = torch.randn(4, 12)
    assert torch.allclose(layer(x), base(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    base = nn.Linear(24, 20, dtype=dtype)
    original = base.weight.detach().clone()
    layer = lk.FusedLoraLinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False).eval()
    x = torch.randn(6, 24, dtype=dtype)
    before = layer(x)
    layer.merge()
    assert layer.merged
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(layer(x).float(), before.float(), atol=tol, rtol=tol)
    expected = (original.float() + layer.scaling * layer.lora_B.float() @ layer.lora_A.float()).to(dtype)
    assert torch.equal(layer.weight, expected)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.weight.float(), original.float(), atol=tol, rtol=tol)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_to_linear_and_disable_adapter():
    base = nn.Linear(10, 6)
    base_out_weight = base.weight.detach().clone()
    layer = lk.FusedLoraLinear.from_linear(base, r=2, init_lora_weights=False).eval()
    x = torch.randn(3, 10)
    y = layer(x)
    with layer.disable_adapter():
        assert torch.allclose(layer(x), x @ base_out_weight.t() + base.bias, atol=1e-6)
    assert torch.allclose(layer(x), y)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and linear.weight is layer.weight
    assert torch.allclose(linear(x), y, atol=1e-5)
    assert layer.merged
    with layer.disable_adapter():  # a merged layer is unmerged for the block and merged again after
        assert not layer.merged
        assert torch.allclose(layer(x), x @ base_out_weight.t() + base.bias, atol=1e-5)
    assert layer.merged
    assert torch.allclose(layer(x), y, atol=1e-5)


def test_repr_names_the_adapter():
    text = repr(lk.FusedLoraLinear(8, 4, r=2, lora_alpha=4, lora_dropout=0.1, use_rslora=True))
    for part in ("in_features=8", "out_features=4", "r=2", "lora_dropout=0.1", "rslora"):
        assert part in text


def test_train_step_changes_only_the_adapter():
    layer = lk.FusedLoraLinear(12, 8, r=4, lora_dropout=0.1)
    w0 = layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(5, 12)).square().mean().backward()
        opt.step()
    assert torch.equal(layer.weight, w0)
    assert torch.count_nonzero(layer.lora_B) > 0


# -- layer types: one table, one shared bookkeeping -------------------------------------------------------------

def test_the_layer_type_table_picks_the_layer():
    from lora_kernels.layers import LAYER_TYPES, FusedLoraLinear4bit, layer_type_for

    assert layer_type_for(nn.Linear(4, 4)).layer is lk.FusedLoraLinear
    assert layer_type_for(nn.Conv1d(3, 3, 1)) is None
    assert LAYER_TYPES[0].layer is FusedLoraLinear4bit  # bnb linears subclass nn.Linear: their rows come first

    class Mine(lk.FusedLoraLinear):
        pass

    assert type(Mine.from_linear(nn.Linear(4, 4), r=2)) is Mine  # from_linear on a subclass keeps it
    with pytest.raises(ValueError, match=r"layer-type table \(.*torch nn.Linear.*\), got Conv1d"):
        lk.FusedLoraLinear.from_linear(nn.Conv1d(3, 3, 1))


class _ScaledLoraLayer(lk.layers.LoraLayer):
    """A toy layer type, shaped like DoRA's: three tensors per adapter (A, B and an output scale g) and its own
    merge rule W <- g·(W + s·B·A). It writes only parameters, math and merge rule; the rest comes from LoraLayer."""

    adapter_tensor_names = ("lora_A", "lora_B", "lora_g")
    peft_keys = ("lora_A.weight", "lora_B.weight", "lora_g.weight")
    mixed_batches = False

    def __init__(self, linear: nn.Linear, r: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        self._init_adapters(r, 2 * r, 0.0, False, False, {"dtype": torch.float32})

    def _adapter_shapes(self, r):
        out_f, in_f = self.weight.shape
        return (r, in_f), (out_f, r), (out_f,)

    def _init_adapter(self, name, init_lora_weights):
        for t in self.adapter_params(name):
            nn.init.uniform_(t, 0.5, 1.0)

    def _delta(self, name):
        A, B, _ = self.adapter_params(name)
        return self._scaling_dropout(name)[0] * B @ A

    def _base_output(self, x):
        return nn.functional.linear(x, self.weight, self.bias)

    def _adapter_output(self, x, name):
        g = self.adapter_params(name)[2]
        return nn.functional.linear(x, g[:, None] * (self.weight + self._delta(name)), self.bias)

    def _merge_rule(self, name, sign):
        g = self.adapter_params(name)[2]
        self.weight.copy_(g[:, None] * (self.weight + self._delta(name)) if sign > 0
                          else self.weight / g[:, None] - self._delta(name))

    def to_base(self):
        return lk.layers.linear_sharing(self.weight, self.bias)


def test_a_new_layer_type_gets_the_adapter_bookkeeping():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    layer = _ScaledLoraLayer(base, r=2)
    y_base = base(x).detach()
    layer.add_adapter("b", r=3, lora_alpha=3)
    assert layer.adapter_names == ["default", "b"]
    assert layer.adapter_param_names("b") == ("lora_As.b", "lora_Bs.b", "lora_gs.b")
    assert [tuple(t.shape) for t in layer.adapter_params("b")] == [(3, 6), (5, 3), (5,)]
    assert set(layer.peft_names("b")) == {"lora_A.weight", "lora_B.weight", "lora_g.weight"}
    y = layer(x)
    layer.active_adapter = "b"
    y_b = layer(x)
    assert not torch.allclose(y, y_b)
    with layer.disable_adapter():
        assert torch.allclose(layer(x), y_base)
    w0 = layer.weight.detach().clone()
    layer.merge()  # the type's rule, on the active adapter
    assert layer.merged and torch.allclose(layer(x), y_b, atol=1e-5) and not torch.allclose(layer.weight, w0)
    layer.unmerge()
    assert torch.allclose(layer(x), y_b, atol=1e-5) and torch.allclose(layer.weight, w0, atol=1e-6)
    layer.set_adapter_trainable("b", False)
    assert not layer.adapter_trainable("b") and layer.adapter_trainable("default")
    layer.set_batch(lk.AdapterSegments([0, 1, None]), ["default", "b"], ["default", "b"])
    with pytest.raises(ValueError, match="does not run mixed-adapter batches"):
        layer(x)
