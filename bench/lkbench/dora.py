"""The DoRA implementations measured side by side (bench/test_bench_dora.py), on a case's tensors.

    lora        ours, FusedLoraLinear on the Triton backend (the cost DoRA is compared with)
    dora        ours, FusedDoraLinear on the Triton backend: lora_shrink + ops/dora_linear_fwd.py forward,
                the LoRA backward kernels with g·dy (grad_x at p > 0 and grad_m are torch matmuls)
    dora_torch  ours, FusedDoraLinear on the torch backend
    peft_dora   PEFT's DoRA Linear (LoraConfig(use_dora=True))
"""
from __future__ import annotations

import torch

import lora_kernels as lk

from ._internals import linear_sharing
from .cases import Case
from .impls import Built, Skip, Tensors, _Holder, build

DORA_IMPLS = ("base", "lora", "dora", "dora_torch", "peft_dora")
ENV = {"dora": {"LORA_KERNELS_BACKEND": "triton"}, "dora_torch": {"LORA_KERNELS_BACKEND": "torch"}}


def _ours(name: str, case: Case, t: Tensors) -> Built:
    layer = lk.FusedDoraLinear.from_linear(linear_sharing(t.W, None), r=case.r, lora_alpha=case.lora_alpha,
                                           lora_dropout=case.dropout, lora_dtype=t.A.dtype)
    with torch.no_grad():
        layer.lora_A.copy_(t.A)
        layer.lora_B.copy_(t.B)
        layer.lora_magnitude_vector.copy_(layer.weight_norm(layer.adapter_name))
    return Built(name, layer.train(), ENV[name])


def _peft(case: Case, t: Tensors) -> Built:
    import peft

    cfg = peft.LoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=case.dropout,
                          target_modules=["proj"], use_dora=True)
    model = peft.get_peft_model(_Holder(linear_sharing(t.W, None)), cfg,
                                autocast_adapter_dtype=case.adapter_dtype == "fp32")
    layer = model.base_model.model.proj
    s = case.lora_alpha / case.r
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t.A)
        layer.lora_B["default"].weight.copy_(t.B)
        # m = ‖W + s·B·A‖ as ours starts (PEFT computed it with B = 0): the same function on both sides
        layer.lora_magnitude_vector["default"].weight.copy_(
            torch.linalg.vector_norm(t.W.float() + s * (t.B.float() @ t.A.float()), dim=1))
    return Built("peft_dora", layer.train())


def build_dora(name: str, case: Case, t: Tensors) -> Built:
    """DoRA implementation `name` in training mode; Skip when it cannot run here (e.g. bf16 on the interpreter)."""
    if name == "base":
        return build("base", case, t)
    if name == "lora":
        return build("fused", case, t)
    built = _peft(case, t) if name == "peft_dora" else _ours(name, case, t)
    try:
        with torch.no_grad():
            built(t.x[:1])
    except (RuntimeError, ValueError) as err:
        raise Skip(str(err)) from err
    return built
