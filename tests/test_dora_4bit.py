"""DoRA over a bitsandbytes 4-bit base (QLoRA + use_dora=True): the functional op against the float64 oracle of
PEFT's formula on bitsandbytes' dequantized W (torch and Triton backends, NF4/FP4, double quant on and off, blocks
across rows), the norm read in row blocks with nothing of W's size allocated, and PEFT's own bnb DoRA layers on a
tiny 4-bit Llama: inject_lora / load_adapter and fuse_peft_model give PEFT's logits, loss and gradients of A, B and
m at p = 0 and p = 0.1 (PEFT's dropout replaced by our mask as in test_dora_peft.py), merges as PEFT merges."""
import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels.backends import keep_mask
from lora_kernels.backends.base import draw_seed
from lora_kernels.inject import lora_layers
from lora_kernels.reference import dora_linear_reference, make_case
from test_qlora_integration import load_4bit, save_tiny_4bit_base
from test_compile import _compare
from test_dora_math import AllocSpy
from test_dora_peft import SeededMaskDropout, assert_step_matches_peft, fuse_and_match_peft_step
from tiny_models import ALL_PROJ, assert_rel_close, peft_lora_names, tokens

bnb = pytest.importorskip("bitsandbytes")
bf = pytest.importorskip("bitsandbytes.functional")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_kernels.backends import dora as dora_backend  # noqa: E402
from lora_kernels.functional import fused_dora_linear  # noqa: E402
from lora_kernels.layers import FusedDoraLinear4bit  # noqa: E402
from lora_kernels.ops.format_4bit import dequantize, from_bnb  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# (K, N, quant type, double quant, blocksize): blocks across rows (K = 53) and one scale per row tile (K = 128).
QUANT = [(53, 29, "nf4", True, 64), (128, 24, "fp4", False, 64)]
TOLS = {torch.float32: (2e-6, 5e-6), torch.float16: (2e-3, 4e-3)}


def _quantized_case(K, N, quant_type, double_quant, blocksize, dtype=torch.float32):
    case = make_case((3, 5), K, N, 4, dtype, ab_dtype=torch.float32, seed=1)
    packed, qs = bf.quantize_4bit(case["weight"].float(), blocksize=blocksize, compress_statistics=double_quant,
                                  quant_type=quant_type)
    case["qweight"] = from_bnb(packed, qs)
    case["weight"] = bf.dequantize_4bit(packed, qs).to(dtype)   # the oracle's W, as the kernels round it
    case["magnitude"] = torch.rand(N, generator=torch.Generator().manual_seed(5)) + 0.5
    return case


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("triton", torch.float32),
                                           ("triton", torch.float16)])
@pytest.mark.parametrize("K,N,quant_type,double_quant,blocksize", QUANT)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_4bit_dora_matches_float64_oracle(p, K, N, quant_type, double_quant, blocksize, backend, dtype, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    case = _quantized_case(K, N, quant_type, double_quant, blocksize, dtype)
    t = {k: case[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B", "magnitude")}
    torch.manual_seed(7)
    y = fused_dora_linear(t["x"], case["qweight"], case["bias"], t["lora_A"], t["lora_B"], t["magnitude"],
                          case["scaling"], dropout_p=p)
    assert y.dtype == dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y.backward(dy)
    keep = None
    if p > 0:
        torch.manual_seed(7)   # the forward's one draw
        keep = keep_mask(backend, draw_seed(torch.device("cpu")), case["x"].shape, p)
    d = {k: case[k].double().requires_grad_(True) for k in t}
    want = dora_linear_reference(d["x"], case["weight"].double(), case["bias"].double(), d["lora_A"], d["lora_B"],
                                 d["magnitude"], case["scaling"], keep_mask=keep, dropout_p=p if keep is not None
                                 else 0.0)
    want.backward(dy.double())
    tol_y, tol_g = TOLS[dtype]
    assert_rel_close(y.double(), want.detach(), tol_y, "y")
    for k in t:
        assert_rel_close(t[k].grad.double(), d[k].grad, tol_g, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K,N,quant_type,double_quant,blocksize", QUANT + [(257, 191, "nf4", True, 64)])
def test_4bit_dora_matches_oracle_on_gpu(dtype, K, N, quant_type, double_quant, blocksize, monkeypatch):
    """The compiled Triton DoRA kernels on a 4-bit W (bf16 too), with dropout, against the float64 oracle."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    case = _quantized_case(K, N, quant_type, double_quant, blocksize, dtype)
    case = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    case["qweight"] = case["qweight"]._replace(**{f: getattr(case["qweight"], f).cuda() for f in
                                                  ("packed", "absmax", "nested_absmax", "nested_code", "offset")
                                                  if getattr(case["qweight"], f) is not None})
    t = {k: case[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B", "magnitude")}
    torch.manual_seed(7)
    y = fused_dora_linear(t["x"], case["qweight"], case["bias"], t["lora_A"], t["lora_B"], t["magnitude"],
                          case["scaling"], dropout_p=0.1)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.manual_seed(7)   # the forward's one draw
    keep = keep_mask("triton", draw_seed(torch.device("cuda")), case["x"].shape, 0.1)
    d = {k: case[k].double().requires_grad_(True) for k in t}
    want = dora_linear_reference(d["x"], case["weight"].double(), case["bias"].double(), d["lora_A"], d["lora_B"],
                                 d["magnitude"], case["scaling"], keep_mask=keep, dropout_p=0.1)
    want.backward(dy.double())
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
    assert_rel_close(y.double(), want.detach(), tol, "y")
    for k in t:
        assert_rel_close(t[k].grad.double(), d[k].grad, tol, k)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_norm_in_row_blocks_and_no_w_sized_tensor_on_triton(backend, monkeypatch):
    """‖W_o‖² reads W a row block at a time (here 7 rows; blocks across rows); the per-step A·Wᵀ runs on the 4-bit
    GEMM kernel (Triton) or from the row blocks (torch); both equal the norms of the whole float32-dequantized W.
    Triton's forward + backward then allocate nothing of W's size; the torch backend dequantizes W per call (the
    spy sees it: it can fail)."""
    from lora_kernels.ops import lora_linear_fwd as fwd_op

    monkeypatch.setattr(dora_backend, "ROW_BLOCK", 7)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    gemm_rows = []
    real = fwd_op.lora_linear_fwd
    monkeypatch.setattr(fwd_op, "lora_linear_fwd", lambda x, *a, **k: gemm_rows.append(x.shape[0]) or real(x, *a, **k))
    case = _quantized_case(53, 29, "nf4", True, 64)
    qw, N, K = case["qweight"], 29, 53
    dense = dequantize(qw, torch.float32)
    with AllocSpy() as spy:
        w_sq = dora_backend.weight_sq_norm(qw)
        n = dora_backend.dora_norm(qw, w_sq, case["lora_A"], case["lora_B"], 2.0, backend)
    assert spy.largest < N * K / 2, spy.largest
    assert gemm_rows == ([4] if backend == "triton" else [])   # A·Wᵀ: A's r = 4 rows through the 4-bit GEMM
    torch.testing.assert_close(w_sq, dense.pow(2).sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(n, (dense + 2.0 * case["lora_B"] @ case["lora_A"]).norm(dim=1), rtol=1e-5, atol=0)
    x = case["x"][0, :2].clone().requires_grad_(True)    # 2 rows: M·N and M·K stay far below N·K
    A, B, m = (case[k].clone().requires_grad_(True) for k in ("lora_A", "lora_B", "magnitude"))
    saved = []
    with AllocSpy() as spy, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_dora_linear(x, qw, case["bias"], A, B, m, 2.0, dropout_p=0.2, weight_sq_norm=w_sq).sum().backward()
    assert (spy.largest < N * K / 2) == (backend == "triton"), spy.largest
    # Never a dequantized W saved for backward: the only W-sized tensor saved is the packed one itself.
    big = [t for t in saved if t.numel() >= N * K / 2]
    assert saved and all(t.data_ptr() == qw.packed.data_ptr() for t in big), [t.numel() for t in saved]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile(backend, monkeypatch):
    """torch.compile(fullgraph=True) traces a 4-bit DoRA layer (its ops take the packed tensors, ‖W_o‖² is
    recomputed in the graph): the eager step's outputs and gradients, the magnitude's included."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(64, 24, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True).to("cpu")
    layer = lk.FusedDoraLinear.from_linear(lin, r=4, lora_dropout=0.1, init_lora_weights=False)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    _compare(layer, compiled, torch.randn(2, 3, 64), 1e-5)
    assert layer.adapter_params("default")[2].grad.abs().sum() > 0


def test_from_linear_on_a_linear4bit():
    """FusedDoraLinear.from_linear(a bnb Linear4bit) is a FusedDoraLinear4bit over the same packed weight: equal to
    its base at init (m = ‖W‖), disable_adapter gives the base, to_linear gives a Linear4bit back, and a mixed
    batch (batch_adapters) is a clear ValueError."""
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(128, 24, compute_dtype=torch.float32, quant_type="fp4", compress_statistics=False).to("cpu")
    layer = lk.FusedDoraLinear.from_linear(lin, r=4)
    assert type(layer) is FusedDoraLinear4bit and layer.weight is lin.weight and "dora" in repr(layer)
    x = torch.randn(5, 128)
    with torch.no_grad():
        want = lin(x)
        assert_rel_close(layer(x), want, 1e-5, "at init")
        layer.lora_B.normal_()
        assert not torch.allclose(layer(x), want, atol=1e-3)
        with layer.disable_adapter():
            assert_rel_close(layer(x), want, 1e-6, "disabled")
    with pytest.raises(ValueError, match="DoRA adapters .*not supported"):
        with lk.batch_adapters(nn.Sequential(layer), ["default", None]):
            pass
    assert type(layer.to_linear()) is bnb.nn.Linear4bit


# -- PEFT's bnb DoRA layers on a tiny 4-bit Llama -------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """test_qlora_integration.py's tiny 4-bit Llama (rows a multiple of the quantization block: see there)."""
    return save_tiny_4bit_base(tmp_path_factory.mktemp("tiny_llama_dora4"))


def peft_dora_4bit(d, p=0.0, quant_type="nf4", double_quant=True):
    """PEFT's QLoRA DoRA model (lora.bnb.Linear4bit with DoraLinearVariant) with magnitudes off their init."""
    torch.manual_seed(0)
    model = peft.get_peft_model(load_4bit(d, quant_type, double_quant), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=p, target_modules=ALL_PROJ, use_dora=True, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in peft_lora_names(model).values():
            m = layer.lora_magnitude_vector["default"].weight
            m.mul_(torch.rand(m.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("p,quant", [(0.0, ("nf4", True)), (0.1, ("fp4", False))])
def test_load_peft_4bit_dora_matches_outputs_and_grads(base_dir, tmp_path, p, quant, monkeypatch):
    """PEFT's QLoRA DoRA adapter loads through inject_lora (load_adapter) onto FusedDoraLinear4bit layers with
    PEFT's logits, loss and gradients; our saved adapter loads back in PEFT with PEFT's logits. (The torch
    backend: the Triton kernels on a 4-bit W are compared with the oracle above, at a fraction of the time.)"""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = peft_dora_4bit(base_dir, p, *quant)
    pm.save_pretrained(tmp_path / "peft")
    if p > 0:
        for layer in peft_lora_names(pm).values():
            layer.lora_dropout["default"] = SeededMaskDropout(p)
    ours = lk.load_adapter(load_4bit(base_dir, *quant), tmp_path / "peft")
    layers = lora_layers(ours)
    assert len(layers) == 2 * len(ALL_PROJ) and all(type(v) is FusedDoraLinear4bit for v in layers.values())
    assert all(v.weight.dtype == torch.uint8 for v in layers.values())   # the packed weight, no float copy
    pm.train(), ours.train()
    ids, _ = assert_step_matches_peft(pm, ours)
    if p > 0:
        return
    lk.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(load_4bit(base_dir, *quant), tmp_path / "ours")
    back.eval(), ours.eval()
    with torch.no_grad():
        assert_rel_close(back(ids).logits, ours(ids).logits, 1e-5, "PEFT on our adapter")


def test_inject_lora_use_dora_on_a_4bit_model(base_dir, monkeypatch):
    """inject_lora(use_dora=True) on a quantized model: a new DoRA layer equals its base (m = ‖W‖), trains, and
    its ‖W_o‖² cache follows the weight (a merge replaces it)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    model = load_4bit(base_dir)
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
    lk.inject_lora(model, lk.LoraConfig(r=4, target_modules=ALL_PROJ, use_dora=True))
    layers = lora_layers(model)
    assert len(layers) == 2 * len(ALL_PROJ) and all(type(v) is FusedDoraLinear4bit for v in layers.values())
    with torch.no_grad():
        assert_rel_close(model(ids).logits, want, 1e-5, "at init")
    model(ids, labels=ids).loss.backward()
    layer = layers["model.layers.0.mlp.down_proj"]
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_B.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="4-bit .* holds one adapter"):
        lk.inject_lora(model, lk.LoraConfig(r=2, target_modules=["down_proj"], use_dora=True), adapter_name="b")
    first = layer.weight_sq_norm()
    assert layer.weight_sq_norm() is first
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    assert layer.weight_sq_norm() is not first   # a new Params4bit: recomputed


def test_fuse_peft_model_serves_4bit_dora(base_dir, monkeypatch):
    """fuse_peft_model runs PEFT's bnb DoRA layers on fused_dora_linear with PEFT's outputs and gradients at
    p = 0.1 (the reference's dropout draws the fused layers' mask) and, after an optimizer step, PEFT's eval
    output (no stale norm); with PEFT's DoRA caching on, PEFT's own forward runs."""
    from peft.tuners.lora import dora

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    p = 0.1
    ref, fused = peft_dora_4bit(base_dir, p), peft_dora_4bit(base_dir, p)
    with torch.no_grad():
        theirs = dict(ref.named_parameters())
        for n, q in fused.named_parameters():
            if "lora_" in n:
                q.copy_(theirs[n])
    for layer in peft_lora_names(ref).values():
        layer.lora_dropout["default"] = SeededMaskDropout(p)
    ids, logits_f, calls = fuse_and_match_peft_step(ref, fused, monkeypatch)
    for model in (ref, fused):   # one SGD step, then eval: the norm follows the new B
        with torch.no_grad():
            for q in model.parameters():
                if q.grad is not None:
                    q -= 0.5 * q.grad
        model.eval()
    with torch.no_grad():
        after = fused(ids).logits
        assert_rel_close(after, ref(ids).logits, 1e-5, "eval after a step")
        assert not torch.allclose(after, logits_f, atol=1e-4)
        assert len(calls) == 2 * 2 * len(ALL_PROJ)
        monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)
        fused(ids)
    assert len(calls) == 2 * 2 * len(ALL_PROJ)   # with PEFT's cache on, PEFT's forward ran


def test_4bit_dora_merges_like_peft(base_dir, tmp_path, monkeypatch):
    """PEFT's bnb DoRA merge (dequantize, g·(W + s·B·A) with the unmerged norm, quantize again) and unmerge
    (dequantize, W'/g − s·B·A, quantize again): the packed bytes equal PEFT's after each, and merge_and_unload
    gives PEFT's merged model (logits and packed weights)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = peft_dora_4bit(base_dir)
    pm.save_pretrained(tmp_path)
    ours = lk.load_adapter(load_4bit(base_dir), tmp_path)
    ids = tokens()
    ours.eval(), pm.eval()
    name = "model.layers.1.mlp.down_proj"
    layer, theirs_layer = lora_layers(ours)[name], peft_lora_names(pm)[name]
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        with pytest.warns(UserWarning, match="DoRA adapter into a 4-bit base"):
            layer.merge()
        theirs_layer.merge()
        assert not torch.equal(layer.weight, w0) and torch.equal(layer.weight, theirs_layer.base_layer.weight)
        layer.unmerge()
        theirs_layer.unmerge()
        assert torch.equal(layer.weight, theirs_layer.base_layer.weight)
        merged = lk.merge_and_unload(ours)
        assert not lora_layers(merged)
        q_proj = merged.model.layers[0].self_attn.q_proj
        assert type(q_proj) is bnb.nn.Linear4bit and q_proj.weight.dtype == torch.uint8
        theirs = pm.merge_and_unload()
        assert_rel_close(merged(ids).logits, theirs(ids).logits, 1e-5, "merged logits")
        ours_w = dict(merged.named_parameters())
        for n, w in theirs.named_parameters():
            if w.dtype == torch.uint8:
                assert torch.equal(ours_w[n], w), n


def test_bf16_compute_dtype_fused_and_merged_like_peft(monkeypatch):
    """A Linear4bit computing in bfloat16 over float32-quantized weights (quant state dtype float32), float32
    adapters: fuse_peft_model's output and gradients agree with PEFT's at bfloat16's tolerance, and our layer's
    merge (W taken in the quant state's dtype, as PEFT) gives PEFT's packed bytes."""
    import copy

    from lora_kernels.integrations.peft import fuse_peft_model

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    lin = lin.to("cpu")
    assert lin.weight.quant_state.dtype == torch.float32
    models = []
    for _ in range(2):
        base = nn.Sequential(copy.deepcopy(lin))
        base.is_loaded_in_4bit = True   # what transformers sets; PEFT then uses lora.bnb.Linear4bit
        torch.manual_seed(3)
        models.append(peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                use_dora=True, init_lora_weights=False)))
    fused, ref = models
    with torch.no_grad():
        for model in models:
            model.base_model.model[0].lora_magnitude_vector["default"].weight.mul_(1.25)
    assert len(fuse_peft_model(fused).fused) == 1
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    outs = []
    for model in (fused, ref):
        model.train()
        y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        layer = model.base_model.model[0]
        outs.append([y.detach(), layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
                     layer.lora_magnitude_vector["default"].weight.grad])
    for what, a, b in zip(("y", "lora_A", "lora_B", "m"), *outs):
        assert_rel_close(a, b, 3e-2, what)
    theirs = ref.base_model.model[0]
    ours = lk.FusedDoraLinear.from_linear(copy.deepcopy(lin), r=4, lora_alpha=8)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        ours.lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight)
        ours.merge()
        theirs.merge()
    assert torch.equal(ours.weight, theirs.base_layer.weight)
