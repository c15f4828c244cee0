"""The three ways to fine-tune LoRA on MoE experts, end to end on the grouped Triton kernels (interpreter): a tiny
Qwen3-MoE and a tiny gpt-oss with adapters on attention (target_modules) and on the experts (target_parameters),
through lk.inject_lora, through fuse_peft_model on a PEFT model, and through `lora-kernels finetune`. A spy on
TritonGroupedLoraFunction checks that every expert projection ran forward and backward on it (and the grouped
kernels launched), and that the torch GroupedLoraFunction never ran. At dropout 0 each path equals PEFT; with
dropout, the whole experts layer equals a float64 oracle given the kernels' masks (tests/test_moe_kernels.py holds
the per-projection kernel tests)."""
import copy
import json

import pytest
import torch

pytest.importorskip("triton")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lora_kernels as lk  # noqa: E402
from lora_kernels import backends  # noqa: E402
from lora_kernels.backends.base import draw_seed  # noqa: E402
from lora_kernels.backends.experts import ExpertRouting, GroupedLoraFunction  # noqa: E402
from lora_kernels.backends.triton_experts import TritonGroupedLoraFunction  # noqa: E402
from lora_kernels.persistence.keys import own_names  # noqa: E402
from lora_kernels.reference import grouped_lora_reference  # noqa: E402
from test_moe_experts import EXPERTS, _copy_peft_into_ours, _grads, _model, _ours, _peft  # noqa: E402
from test_moe_kernels import launches  # noqa: E402,F401  (the grouped kernels' launch spy, a fixture)

KINDS = ["qwen3_moe", "gpt_oss"]


@pytest.fixture
def expert_calls(monkeypatch, launches):  # noqa: F811
    """Records each TritonGroupedLoraFunction forward (the weight it projects with, whether an adapter and which
    dropout rate came with it) and backward (whether it returned both LoRA gradients), the grouped kernel
    launches, and every call of the torch GroupedLoraFunction (there must be none). Runs on the Triton backend."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    calls = {"forward": [], "backward": [], "torch": [], "launches": launches}
    forward, backward = TritonGroupedLoraFunction.forward, TritonGroupedLoraFunction.backward

    def spy_forward(ctx, x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, transposed):
        calls["forward"].append((weight.data_ptr(), lora_A is not None, dropout_p))
        return forward(ctx, x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, transposed)

    def spy_backward(ctx, dy):
        grads = backward(ctx, dy)
        calls["backward"].append(grads[3] is not None and grads[4] is not None)
        return grads

    torch_forward = GroupedLoraFunction.forward
    monkeypatch.setattr(TritonGroupedLoraFunction, "forward", staticmethod(spy_forward))
    monkeypatch.setattr(TritonGroupedLoraFunction, "backward", staticmethod(spy_backward))
    monkeypatch.setattr(GroupedLoraFunction, "forward",
                        staticmethod(lambda ctx, *a: calls["torch"].append(1) or torch_forward(ctx, *a)))
    return calls


def _expert_weights(model):
    """data_ptr of every 3-D expert weight of the model (gate_up_proj and down_proj of each layer)."""
    return {p.data_ptr() for n, p in model.named_parameters() if n.endswith((".gate_up_proj", ".down_proj"))}


def _check_kernel_path(calls, weights, steps, dropout_p=0.0):
    """`steps` forward+backward passes ran every expert projection with its adapter on the Triton Function, and
    nothing on the torch one. weights: the expert weights' data_ptrs, or (a model built out of reach) their
    number. The grouped shrink and gradient kernels are the LoRA part (two launches each per projection per
    forward+backward); the base GEMM's count is left to the backend's dispatch."""
    projections = weights if isinstance(weights, int) else len(weights)
    n = projections * steps
    seen = {w for w, _, _ in calls["forward"]}
    assert calls["torch"] == []
    assert len(calls["forward"]) == n and (len(seen) == weights if isinstance(weights, int) else seen == weights)
    assert all(lora and p == dropout_p for _, lora, p in calls["forward"])
    assert calls["backward"] == [True] * n
    assert calls["launches"].count("grouped_lora_shrink") == 2 * n
    assert calls["launches"].count("grouped_lora_grad") == 2 * n


def _step_and_compare(ref, ours, ids, loss_before):
    """One SGD step (lr 0.5) on the trainable parameters of both models: their logits still agree and our loss
    fell from loss_before."""
    for model in (ref, ours):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    with torch.no_grad():
        a2, b2 = ref(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(b2.logits, a2.logits, rtol=1e-5, atol=1e-5)
    assert b2.loss < loss_before - 1e-3, (loss_before, b2.loss)


def _ids(vocab=64, shape=(2, 9)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", KINDS)
def test_inject_lora_fine_tunes_on_the_kernels_equal_to_peft(kind, expert_calls):
    """lk.inject_lora on attention and experts, next to PEFT with the same adapter weights at dropout 0: the loss
    and every LoRA gradient equal PEFT's, an SGD step moves both the same way (logits still equal, loss lower)."""
    base = _model(kind)
    pm, ours = _peft(base), _ours(base)
    _copy_peft_into_ours(pm, ours)
    ids = _ids()
    a, b = pm(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    a.loss.backward(), b.loss.backward()
    _check_kernel_path(expert_calls, _expert_weights(ours), steps=1)
    names = {k.replace("base_model.model.", ""): v for k, v in own_names(ours).items()}
    params = dict(ours.named_parameters())
    peft_grads = {n.replace(".default", ""): g for n, g in _grads(pm, "lora_").items()}
    assert len(peft_grads) == 6  # q_proj's A, B and both expert projections' A, B
    for key, g in peft_grads.items():
        torch.testing.assert_close(params[names[key]].grad, g, rtol=1e-5, atol=1e-6)
    _step_and_compare(pm, ours, ids, b.loss)


@pytest.mark.parametrize("kind", KINDS)
def test_fuse_peft_model_fine_tunes_on_the_kernels_equal_to_peft(kind, expert_calls):
    """fuse_peft_model on a PEFT model with target_modules and target_parameters: logits and every LoRA gradient
    equal unfused PEFT's, and after an SGD step on both they still agree (the loss falls)."""
    from lora_kernels.integrations.peft import fuse_peft_model

    pm = _peft(_model(kind), init=False)
    ref = copy.deepcopy(pm)
    report = fuse_peft_model(pm)
    assert "base_model.model.model.layers.0.mlp.experts" in report.fused and not report.skipped
    ids = _ids()
    a, b = ref(ids, labels=ids), pm(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    a.loss.backward(), b.loss.backward()
    _check_kernel_path(expert_calls, _expert_weights(pm), steps=1)
    ga, gb = _grads(ref, "lora_"), _grads(pm, "lora_")
    assert sorted(ga) == sorted(gb) and len(gb) == 6
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-6)
    _step_and_compare(ref, pm, ids, b.loss)


@pytest.mark.parametrize("kind", KINDS)
def test_experts_layer_with_dropout_matches_the_float64_oracle(kind, expert_calls):
    """The experts layer of an injected model in training with dropout, on the kernels: both projections, the
    model's own gate (gpt-oss: clamped GLU, biases, transposed weights) and the routing weights, against a float64
    per-pair oracle given the kernels' masks (one per projection, each from its own seed): the output and the
    gradients of the input, the routing weights and every LoRA tensor."""
    p, T, k = 0.25, 7, 2
    ours = _ours(_model(kind), lora_dropout=p, init_lora_weights=False)
    layer = ours.get_submodule("model.layers.0.mlp.experts").train()
    E, H = layer.num_experts, layer.features("gate_up_proj")[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g).requires_grad_(True)
    dy = torch.randn(T, H, generator=g, dtype=torch.float64)
    torch.manual_seed(11)
    y = layer(x, idx, w)
    (y * dy.float()).sum().backward()
    _check_kernel_path(expert_calls, {layer.gate_up_proj.data_ptr(), layer.down_proj.data_ptr()}, 1, p)

    torch.manual_seed(11)
    seeds = [draw_seed(torch.device("cpu")) for _ in range(2)]  # gate_up_proj's forward draws first
    routing = ExpertRouting.from_top_k(idx, E)

    def pair_masks(seed, width):  # the kernels' mask is per sorted row: row i is pair routing.order[i]
        keep_sorted = backends.keep_mask("triton", seed, (T * k, width), p)
        keep = torch.empty_like(keep_sorted)
        keep[routing.order] = keep_sorted
        return keep

    frozen = {n: t.detach().double() for n, t in layer.named_parameters() if "lora" not in n}
    lora = {n: getattr(layer, n).detach().double().requires_grad_(True) for n in layer.adapter_tensor_names}
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)

    def project(param, inputs, index, keep):
        return grouped_lora_reference(inputs, index, frozen[param], frozen.get(f"{param}_bias"),
                                      lora[f"{param}_lora_A"], lora[f"{param}_lora_B"], layer.scaling,
                                      keep.view(*index.shape, -1), p, transposed=layer.transposed)

    h = layer._experts._apply_gate(project("gate_up_proj", x64, idx, pair_masks(seeds[0], H)))  # (T, k, I)
    pairs = h.reshape(T * k, -1)
    out = project("down_proj", pairs, idx.reshape(T * k, 1), pair_masks(seeds[1], pairs.shape[1])).view(T, k, H)
    ref = (out * w64[..., None]).sum(1)
    (ref * dy).sum().backward()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    for n, t in lora.items():
        torch.testing.assert_close(getattr(layer, n).grad.double(), t.grad, rtol=1e-4, atol=1e-4, msg=n)


def _tiny_gpt_oss_dir(path):
    """A saved tiny gpt-oss (the test model, its vocabulary widened to the byte tokenizer's) for --model PATH."""
    from lora_kernels.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    model = _model("gpt_oss")
    model.resize_token_embeddings(tok.vocab_size, mean_resizing=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_cli_finetunes_on_the_kernels_and_round_trips_with_peft(kind, tmp_path, cli_defaults, expert_calls,
                                                                 monkeypatch):
    """`finetune --target-modules q_proj --target-parameters ...` on the Triton backend, for the built-in tiny-moe
    (Qwen3-MoE) and a saved tiny gpt-oss (--model PATH): every step runs every expert projection on the kernels
    and the adapters train; PEFT loads the run's adapter with our logits, and we load PEFT's save of it.
    tests/test_moe_experts.py::test_cli_tiny_moe_trains_and_merges runs a longer tiny-moe run (the loss falls) and
    its merge on the torch backend; the dropout kernels run in tests/test_moe_kernels.py (they would triple the
    interpreter's time here)."""
    from lora_kernels.cli import main

    model_arg = "tiny-moe" if kind == "qwen3_moe" else str(_tiny_gpt_oss_dir(tmp_path / "gpt_oss"))
    out, steps = tmp_path / "run", 2
    expert_calls["launches"].clear()
    assert main(["finetune", "--model", model_arg, "--output-dir", str(out), "--target-modules", "q_proj",
                 "--target-parameters", ",".join(EXPERTS), "--lora-dropout", "0", "--max-steps", str(steps),
                 "--seq-len", "8", "--batch-size", "1", "--eval-every", "0", "--eval-fraction", "0",
                 "--no-progress"]) == 0
    base_dir = out / "base_model" if kind == "qwen3_moe" else tmp_path / "gpt_oss"
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    _check_kernel_path(expert_calls, len(_expert_weights(base)), steps)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_modules"] and saved["target_parameters"]
    ours = lk.load_adapter(copy.deepcopy(base), out).eval()
    layer = ours.get_submodule("model.layers.0.mlp.experts")
    assert layer.gate_up_proj_lora_B.abs().sum() > 0 and layer.down_proj_lora_B.abs().sum() > 0  # B starts at 0
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")  # the round trip is the files' business: on the quick path
    ids = _ids(vocab=256, shape=(1, 8))
    with torch.no_grad():
        want = ours(ids).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)
        theirs.save_pretrained(tmp_path / "peft")
        back = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
        torch.testing.assert_close(back(ids).logits, want, rtol=1e-5, atol=1e-5)
