"""What is kept for backward: x itself and the r-column x·Aᵀ — never a mask, a dropped copy or a cast copy.

Measured with torch.autograd.graph.saved_tensors_hooks; parameters (W, b, A, B) are excluded since they
live anyway. PEFT's LoRA Linear keeps, per element of x, a dropped copy in the adapter dtype (float32 by
default) and the dropout mask — as a float tensor in the adapter dtype on CPU, as a bool tensor on CUDA
(torch's native_dropout) — and, because its frozen base linear keeps nothing of x, no x itself.
"""
import pytest
import torch
import torch.nn as nn

import lora_kernels as lk


def saved_activation_bytes(module_fn, params, x):
    """Bytes of distinct non-parameter storages saved for backward while running module_fn(x)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module_fn(x)
    return sum(storages.values()), out, storages


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nothing_of_x_size_but_x(backend, dtype, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    layer = lk.FusedLoraLinear.from_linear(nn.Linear(48, 40, dtype=dtype), r=4, lora_dropout=0.1)
    x = torch.randn(2, 30, 48, dtype=dtype, requires_grad=True)
    _, _, storages = saved_activation_bytes(layer, list(layer.parameters()), x)
    big = {ptr: n for ptr, n in storages.items() if n >= x.numel() * x.element_size() // 2}
    assert big == {x.untyped_storage().data_ptr(): x.numel() * x.element_size()}


def _peft_linear(base, p, lora_dtype):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    layer = PeftLinear(base, "default", config=LoraConfig(r=8, lora_alpha=16, lora_dropout=p), r=8,
                       lora_alpha=16, lora_dropout=p)
    layer.lora_A["default"].to(lora_dtype)
    layer.lora_B["default"].to(lora_dtype)
    return layer.train()


# (x dtype, adapter dtype, ours/PEFT bound on CPU, on CUDA). We keep x (plus the r-column x·Aᵀ).
# CPU: PEFT keeps a float mask + a dropped copy, both in the adapter dtype: fp32 4/8, bf16 x with
# PEFT's default fp32 adapters 2/8, bf16 adapters 2/4. CUDA: bool mask: 4/5, 2/5, 2/3.
SINGLE_LAYER = [(torch.float32, torch.float32, 0.55, 0.81), (torch.bfloat16, torch.float32, 0.30, 0.41),
                (torch.bfloat16, torch.bfloat16, 0.55, 0.68)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,lora_dtype,cpu_bound,cuda_bound", SINGLE_LAYER)
def test_single_layer_vs_peft(x_dtype, lora_dtype, cpu_bound, cuda_bound, device, monkeypatch):
    pytest.importorskip("peft")
    if device == "cpu":  # the Triton path has the same contract (test above); torch runs bf16 on CPU
        monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    bound = cpu_bound if device == "cpu" else cuda_bound
    base = nn.Linear(256, 192, dtype=x_dtype, device=device).requires_grad_(False)
    x = torch.randn(4, 64, 256, dtype=x_dtype, device=device, requires_grad=True)
    peft_layer = _peft_linear(base, 0.1, lora_dtype)
    ours = lk.FusedLoraLinear.from_linear(base, r=8, lora_alpha=16, lora_dropout=0.1, lora_dtype=lora_dtype)
    peft_bytes, _, _ = saved_activation_bytes(peft_layer, list(peft_layer.parameters()), x)
    our_bytes, _, _ = saved_activation_bytes(ours, list(ours.parameters()), x)
    ratio = our_bytes / peft_bytes
    assert ratio <= bound, f"ours {our_bytes} B vs PEFT {peft_bytes} B = {ratio:.3f}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,lora_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
def test_attention_projections_vs_peft(x_dtype, lora_dtype, device, monkeypatch):
    """q, k and v read one input: we keep it once, PEFT keeps a mask and a dropped copy per projection."""
    pytest.importorskip("peft")
    if device == "cpu":
        monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    bases = [nn.Linear(256, 192, dtype=x_dtype, device=device).requires_grad_(False) for _ in range(3)]
    x = torch.randn(4, 64, 256, dtype=x_dtype, device=device, requires_grad=True)
    peft_layers = [_peft_linear(b, 0.1, lora_dtype) for b in bases]
    ours = [lk.FusedLoraLinear.from_linear(b, r=8, lora_alpha=16, lora_dropout=0.1, lora_dtype=lora_dtype) for b in bases]

    def qkv(layers):
        return lambda t: [layer(t) for layer in layers]

    peft_bytes, _, _ = saved_activation_bytes(qkv(peft_layers), [p for m in peft_layers for p in m.parameters()], x)
    our_bytes, _, _ = saved_activation_bytes(qkv(ours), [p for m in ours for p in m.parameters()], x)
    assert our_bytes / peft_bytes <= 0.55, f"ours {our_bytes} B vs PEFT {peft_bytes} B"
