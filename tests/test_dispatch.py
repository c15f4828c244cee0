"""One dispatch decision per call: every functional entry point (dense, 4-bit, several adapters) asks
backends.resolve_backend once per forward, reads LORA_KERNELS_BACKEND once and checks the Triton backend's
availability once; backward asks nothing (the Function chosen at forward runs it)."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends
from lora_kernels.backends import triton as triton_backend


@pytest.fixture
def decisions(monkeypatch):
    counts = {"resolve_backend": 0, "requested_backend": 0, "unavailable_reason": 0}

    def spy(module, name):
        real = getattr(module, name)

        def counting(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    spy(backends, "resolve_backend")
    spy(backends, "requested_backend")
    spy(triton_backend, "unavailable_reason")
    return counts


def _forward_backward(layer, x, counts):
    y = layer(x)
    once = dict(counts)
    counts.update({k: 0 for k in counts})
    y.float().sum().backward()
    assert counts == {k: 0 for k in counts}, "backward asked for a backend again"
    return once


ONCE = {"resolve_backend": 1, "requested_backend": 1, "unavailable_reason": 1}


def test_dense_layer_decides_once(decisions):
    layer = lk.FusedLoraLinear(24, 16, r=4, init_lora_weights=False)
    assert _forward_backward(layer, torch.randn(3, 24, requires_grad=True), decisions) == ONCE


def test_mixed_batch_decides_once_per_layer(decisions):
    layer = lk.FusedLoraLinear(24, 16, r=4, init_lora_weights=False)
    layer.add_adapter("b", r=2, init_lora_weights=False)
    layer.set_batch(lk.AdapterSegments.from_names(["default", "b", None], ["default", "b"]), ["default", "b"],
                    ["default", "b"])
    assert _forward_backward(layer, torch.randn(3, 5, 24, requires_grad=True), decisions) == ONCE


def test_4bit_layer_decides_once(decisions):
    bnb = pytest.importorskip("bitsandbytes")
    linear = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    linear.weight = linear.weight._quantize("cpu")
    layer = lk.FusedLoraLinear.from_linear(linear, r=4, init_lora_weights=False)
    assert _forward_backward(layer, torch.randn(3, 64, requires_grad=True), decisions) == ONCE
