"""fuse_peft_model honours what PEFT's forward honours: module and global hooks, accelerate's offloading hooks,
cast_input_dtype_enabled, tensor scaling (compiled hotswap), lora_bias, nn.Linear subclasses; the fused layer
keeps PEFT's class identity in its repr and in get_layer_status.

Each test compares the fused model against the same model on PEFT's own forward (before fusing or after
unfuse_peft_model), in float32 on the torch backend unless it says otherwise."""
import copy

import peft
import pytest
import torch
import torch.nn as nn

import lora_kernels.integrations.peft as lk_peft
from lora_kernels.integrations.peft import fuse_peft_model, unfuse_peft_model
from tiny_models import tiny_llama, tokens


class MLP(nn.Module):
    def __init__(self, d_in=12, d=20, d_out=6):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d)
        self.fc2 = nn.Linear(d, d)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _peft_mlp(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "head"], init_lora_weights=False)
    args.update(kw)
    return peft.get_peft_model(MLP(), peft.LoraConfig(**args))


def _x(seed=3, rows=5, d_in=12):
    return torch.randn(rows, d_in, generator=torch.Generator().manual_seed(seed))


def _out_and_grads(pm, x):
    """Output and the gradients of x and every trainable parameter, for a fixed random projection of the output."""
    pm.zero_grad()
    x = x.clone().requires_grad_(True)
    out = pm(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    grads["x"] = x.grad.clone()
    return out.detach(), grads


def _assert_same(got, want):
    out, grads = got
    ref_out, ref_grads = want
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-6, atol=1e-6, msg=n)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Torch backend; records the first dimension of x of every fused_lora_linear call (one entry per call)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    calls = []
    real = lk_peft.fused_lora_linear

    def counting(x, *args, **kwargs):
        calls.append(x.shape)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(lk_peft, "fused_lora_linear", counting)
    return calls


def _layer(pm, name):
    return pm.base_model.model.get_submodule(name)


# -- module hooks -------------------------------------------------------------------------------------------

def test_forward_hook_on_base_layer_is_honoured(kernel_calls):
    pm = _peft_mlp()
    x = _x()
    # A hook that changes the base layer's output (as e.g. activation steering or a quantisation simulator would).
    handle = _layer(pm, "fc2").base_layer.register_forward_hook(lambda mod, args, out: out * 1.5 + 0.25)
    want = _out_and_grads(pm, x)
    fuse_peft_model(pm)
    _assert_same(_out_and_grads(pm, x), want)
    assert len(kernel_calls) == 2  # fc1 and head on the kernels, fc2 on PEFT's path
    handle.remove()
    unfuse_peft_model(pm)
    want = _out_and_grads(pm, x)
    fuse_peft_model(pm)
    kernel_calls.clear()
    _assert_same(_out_and_grads(pm, x), want)
    assert len(kernel_calls) == 3  # the decision is per call: without the hook, fc2 is fused again


def test_forward_pre_hook_on_lora_A_is_honoured(kernel_calls):
    pm = _peft_mlp()
    x = _x()
    _layer(pm, "fc1").lora_A["default"].register_forward_pre_hook(lambda mod, args: (args[0].flip(-1),))
    want = _out_and_grads(pm, x)
    fuse_peft_model(pm)
    _assert_same(_out_and_grads(pm, x), want)
    assert len(kernel_calls) == 2


def test_backward_hook_on_lora_B_is_honoured(kernel_calls):
    pm = _peft_mlp()
    x = _x()
    # A full backward hook rescales the gradient flowing into lora_B's input: only lora_A's and x's grads change.
    _layer(pm, "head").lora_B["default"].register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 3.0,))
    want = _out_and_grads(pm, x)
    fuse_peft_model(pm)
    _assert_same(_out_and_grads(pm, x), want)
    assert len(kernel_calls) == 2


def test_global_forward_hook_is_honoured(kernel_calls):
    pm = _peft_mlp()
    x = _x()

    def shift_linear_outputs(mod, args, out):
        return out + 0.5 if isinstance(mod, nn.Linear) else None

    handle = torch.nn.modules.module.register_module_forward_hook(shift_linear_outputs)
    try:
        want = _out_and_grads(pm, x)
        fuse_peft_model(pm)
        got = _out_and_grads(pm, x)
    finally:
        handle.remove()
    _assert_same(got, want)
    assert not kernel_calls


def test_dropout_module_hook_is_honoured(kernel_calls):
    pm = _peft_mlp(lora_dropout=0.1)
    pm.eval()  # dropout off: the hook alone decides the difference
    x = _x()
    _layer(pm, "fc1").lora_dropout["default"].register_forward_hook(lambda mod, args, out: out * 0.5)
    want = _out_and_grads(pm, x)
    fuse_peft_model(pm)
    _assert_same(_out_and_grads(pm, x), want)
    assert len(kernel_calls) == 2


def test_replaced_forward_is_honoured_and_accelerate_removal_restores_fusion(kernel_calls):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class AddOne(ModelHook):
        def post_forward(self, module, output):
            return output + 1.0

    pm = _peft_mlp()
    x = _x()
    base = _layer(pm, "fc2").base_layer
    add_hook_to_module(base, AddOne())  # accelerate replaces base.forward on the instance
    want = _out_and_grads(pm, x)
    fuse_peft_model(pm)
    _assert_same(_out_and_grads(pm, x), want)
    assert len(kernel_calls) == 2
    # accelerate puts the bound class forward back as an instance attribute: plain again, so fused again.
    remove_hook_from_module(base)
    assert "forward" in base.__dict__
    unfuse_peft_model(pm)
    want = _out_and_grads(pm, x)
    fuse_peft_model(pm)
    kernel_calls.clear()
    _assert_same(_out_and_grads(pm, x), want)
    assert len(kernel_calls) == 3


# -- accelerate offloading ----------------------------------------------------------------------------------

def test_accelerate_cpu_offload_gives_peft_outputs(kernel_calls):
    from accelerate import cpu_offload

    pm = _peft_mlp()
    x = _x()
    want = _out_and_grads(pm, x)
    fuse_peft_model(pm)
    cpu_offload(pm, execution_device=torch.device("cpu"))
    layer = _layer(pm, "fc1")
    # the weights live in accelerate's state dict; the hooks put them in place for each call only
    assert layer.base_layer.weight.device.type == "meta" and layer.lora_A["default"].weight.device.type == "meta"
    pm.eval()
    with torch.no_grad():
        out = pm(x)
    torch.testing.assert_close(out, want[0], rtol=1e-6, atol=1e-6)
    assert not kernel_calls
    assert layer.base_layer.weight.device.type == "meta"


def test_accelerate_dispatch_model_with_disk_offload_gives_peft_outputs(tmp_path, kernel_calls):
    from accelerate import dispatch_model

    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                           init_lora_weights=False)).eval()
    x = tokens(batch=1, seq=5)
    with torch.no_grad():
        want = pm(x).logits
    fuse_peft_model(pm)
    inner = "base_model.model.model"
    device_map = {f"{inner}.embed_tokens": "cpu", f"{inner}.layers.0": "cpu", f"{inner}.layers.1": "disk",
                  f"{inner}.norm": "cpu", f"{inner}.rotary_emb": "cpu", "base_model.model.lm_head": "cpu"}
    dispatch_model(pm, device_map=device_map, offload_dir=str(tmp_path))
    offloaded = _layer(pm, "model.layers.1.self_attn.q_proj")
    assert offloaded.base_layer.weight.device.type == "meta"
    with torch.no_grad():
        got = pm(x).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # layer 0 stays materialised on the execution device and keeps running on the kernels
    assert len(kernel_calls) == 2


def test_weights_off_the_input_device_get_peft_behaviour(kernel_calls):
    pm = _peft_mlp()
    _layer(pm, "fc2").base_layer.to("meta")  # no hook will bring it back: PEFT's F.linear reports the device
    fuse_peft_model(pm)
    x = _x()
    with torch.no_grad(), pytest.raises(RuntimeError, match="meta"):
        pm(x)
    assert len(kernel_calls) == 1  # fc1 ran on the kernels, fc2 went to PEFT's forward


# -- cast_input_dtype_enabled -------------------------------------------------------------------------------

def test_disabled_input_cast_with_mixed_dtypes_behaves_as_peft(kernel_calls):
    from peft.helpers import disable_input_dtype_casting

    pm = _peft_mlp()
    pm.base_model.model.to(torch.bfloat16)
    for m in pm.modules():  # adapters in float32 over a bfloat16 base, as autocast_adapter_dtype leaves them
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.lora_A.float()
            m.lora_B.float()
    fuse_peft_model(pm)
    x = _x().to(torch.bfloat16)
    with torch.no_grad():
        with disable_input_dtype_casting(pm):
            # PEFT feeds the bf16 input to the float32 adapter uncast: F.linear refuses the mixed dtypes
            with pytest.raises(RuntimeError, match="dtype"):
                pm(x)
            assert not kernel_calls
        pm(x)  # casting enabled again: the kernels run
    assert len(kernel_calls) == 3


def test_disabled_input_cast_with_layerwise_casting_hooks(kernel_calls):
    """diffusers' layerwise casting: weights stored in bfloat16, pre-hooks upcast them for the call, post-hooks
    store them back; PEFT's cast of x is disabled so that the hooks' compute dtype governs."""
    from peft.helpers import disable_input_dtype_casting

    def upcast(mod, args):
        mod.to(torch.float32)

    def downcast(mod, args, out):
        mod.to(torch.bfloat16)

    pm = _peft_mlp()
    for m in pm.modules():
        if type(m) is nn.Linear:
            m.to(torch.bfloat16)
            m.register_forward_pre_hook(upcast)
            m.register_forward_hook(downcast)
    x = _x()
    with torch.no_grad(), disable_input_dtype_casting(pm):
        want = pm(x)
        fuse_peft_model(pm)
        got = pm(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not kernel_calls


def test_disabled_input_cast_with_equal_dtypes_stays_fused(kernel_calls):
    from peft.helpers import disable_input_dtype_casting

    pm = _peft_mlp()
    x = _x()
    want = _out_and_grads(pm, x)
    fuse_peft_model(pm)
    with disable_input_dtype_casting(pm):
        _assert_same(_out_and_grads(pm, x), want)
    assert len(kernel_calls) == 3


# -- tensor scaling: PEFT's compiled hotswap ----------------------------------------------------------------

def test_compiled_hotswap_preparation_and_hotswap_give_peft_outputs(tmp_path, kernel_calls):
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    second = _peft_mlp(seed=1, r=2, lora_alpha=7)
    second.save_pretrained(tmp_path / "second")
    x = _x()

    def run(fuse):
        pm = _peft_mlp()
        if fuse:
            fuse_peft_model(pm)
        prepare_model_for_compiled_hotswap(pm, target_rank=4)  # scalings become 0-dim tensors
        with torch.no_grad():
            first = pm(x)
            hotswap_adapter(pm, str(tmp_path / "second"), adapter_name="default")
            return first, pm(x)

    (first, swapped), (ref_first, ref_swapped) = run(True), run(False)
    torch.testing.assert_close(first, ref_first, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(swapped, ref_swapped, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(first, swapped)
    assert len(kernel_calls) == 6  # three layers, before and after the swap: tensor scaling runs on the kernels


# -- lora_bias, nn.Linear subclasses ------------------------------------------------------------------------

@pytest.mark.parametrize("base_bias", [True, False])
def test_lora_bias_runs_on_the_kernels(kernel_calls, base_bias):
    pm = _peft_mlp(lora_bias=True)
    for name in ("fc1", "fc2", "head"):
        layer = _layer(pm, name)
        nn.init.normal_(layer.lora_B["default"].bias)  # PEFT initialises it to zero: make it count
        if not base_bias:
            layer.base_layer.bias = None
    x = _x()
    want = _out_and_grads(pm, x)
    assert any(k.endswith("lora_B.default.bias") for k in want[1])
    report = fuse_peft_model(pm)
    assert len(report.fused) == 3 and not report.skipped
    _assert_same(_out_and_grads(pm, x), want)
    assert len(kernel_calls) == 3


def test_linear_subclasses(kernel_calls):
    class DoubledLinear(nn.Linear):  # overrides forward: the kernels cannot know what it computes
        def forward(self, x):
            return 2 * super().forward(x)

    net = MLP()
    net.fc1 = nn.modules.linear.NonDynamicallyQuantizableLinear(12, 20)
    net.fc2 = DoubledLinear(20, 20)
    pm = peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["fc1", "fc2", "head"],
                                                  init_lora_weights=False))
    x = _x()
    want = _out_and_grads(pm, x)
    report = fuse_peft_model(pm)
    assert report.fused == ["base_model.model.fc1", "base_model.model.head"]
    assert "DoubledLinear" in report.skipped["base_model.model.fc2"]
    _assert_same(_out_and_grads(pm, x), want)
    assert len(kernel_calls) == 2


# -- class identity -----------------------------------------------------------------------------------------

def test_repr_and_layer_status_say_lora_linear():
    pm = _peft_mlp()
    reference = copy.deepcopy(pm)
    fuse_peft_model(pm)
    layer = _layer(pm, "fc1")
    assert type(layer) is lk_peft.FusedPeftLinear
    assert repr(layer).startswith("lora.Linear(\n  fused=lora_kernels\n  (base_layer): Linear(")
    # apart from the marker line, PEFT's repr
    assert repr(layer).replace("  fused=lora_kernels\n", "") == repr(_layer(reference, "fc1"))
    status = pm.get_layer_status()
    assert [s.module_type for s in status] == ["lora.Linear"] * 3
    assert status == reference.get_layer_status()
    assert pm.get_model_status() == reference.get_model_status()


def test_hook_decisions_hold_under_torch_compile(kernel_calls):
    """Dynamo traces the per-call checks as guards: a hook added after compiling is honoured (recompiling), and
    without hooks the compiled graph holds the kernels' custom op without graph breaks."""
    pm = _peft_mlp()
    reference = copy.deepcopy(pm)
    x = _x()

    def shift(mod, args, out):
        return out - 1.0

    with torch.no_grad():
        want = reference(x)
        fuse_peft_model(pm)
        compiled = torch.compile(pm.base_model.model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), want, rtol=1e-6, atol=1e-6)
        handle = _layer(pm, "fc2").base_layer.register_forward_hook(shift)
        _layer(reference, "fc2").base_layer.register_forward_hook(shift)
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
        handle.remove()
        torch.testing.assert_close(compiled(x), want, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
