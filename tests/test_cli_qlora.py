"""`lora-kernels finetune --quantize`: QLoRA from the command line on the tiny default (its saved base loaded 4-bit
through transformers + bitsandbytes on CPU), PEFT interop of the saved adapter, exact resume, merge into the
full-precision base, and the flag errors."""
import json
import shutil
import sys

import pytest
import torch

from helpers import one_line_error
from lora_kernels.cli import main

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_kernels.layer_4bit import FusedLoraLinear4bit  # noqa: E402

QUICK = ["--max-steps", "4", "--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--eval-max-batches", "4",
         "--no-progress"]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("cli_defaults")


def _finetune(flags):
    """main(["finetune", *flags]) with the trained model captured and bitsandbytes' own 4-bit matmul and
    dequantization forbidden (the fused layers must serve every projection): (exit status, model)."""
    from lora_kernels.training import Trainer

    seen = {}
    init = Trainer.__init__

    def capture(self, model, *args, **kwargs):
        seen["model"] = model
        init(self, model, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("bitsandbytes computed with the 4-bit weight: a projection is not fused")

    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_KERNELS_BACKEND", "torch")
    mp.setattr(Trainer, "__init__", capture)
    mp.setattr(bnb.functional, "dequantize_4bit", forbidden)
    mp.setattr(bnb.nn.Linear4bit, "forward", forbidden)
    try:
        rc = main(["finetune", *flags])
    finally:
        mp.undo()
    return rc, seen.get("model")


def _bnb_config(quant_type="nf4", double_quant=True, compute_dtype=torch.float32):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def _projections(model):
    return {n: m for n, m in model.named_modules() if n.endswith(PROJ)}


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "run"
    rc, model = _finetune(["--output-dir", str(out), "--quantize", "nf4", "--double-quant", "--save-every", "2",
                           *QUICK])
    assert rc == 0
    return out, model


def test_nf4_double_quant_run_trains_fused_4bit_layers(qlora_run, capsys):
    run, model = qlora_run
    layers = _projections(model)
    assert len(layers) == 2 * len(PROJ)
    for name, layer in layers.items():   # bnb's packed weight under our layer: no float copy of W
        assert type(layer) is FusedLoraLinear4bit, name
        assert type(layer.weight) is bnb.nn.Params4bit and layer.weight.dtype == torch.uint8
        qs = layer.weight.quant_state
        assert qs.quant_type == "nf4" and qs.nested and layer.compute_dtype == torch.float32
    with open(run / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[3]["eval_loss"] < recs[1]["eval_loss"]   # the same held-out rows each time (train rows vary)
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(run / "base_model")


def test_peft_loads_the_adapter_on_the_same_4bit_base(qlora_run):
    run, model = qlora_run
    base = transformers.AutoModelForCausalLM.from_pretrained(str(run / "base_model"), quantization_config=_bnb_config(),
                                                             device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(base, str(run)).eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # PEFT's QLoRA
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(ids).logits
        want = theirs(ids).logits
        with theirs.disable_adapter():
            base_only = theirs(ids).logits
    assert not torch.allclose(want, base_only)   # the adapter moved off zero
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    import lora_kernels as lk   # the counts the run prints: a packed 4-bit weight counts as PEFT counts it
    assert lk.trainable_parameters(model)[1] == theirs.get_nb_trainable_parameters()[1]


def test_resume_of_a_4bit_run_is_exact(qlora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(qlora_run[0], run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    (run / "adapter_model.safetensors").unlink()
    rc, _ = _finetune(["--output-dir", str(run), "--quantize", "nf4", "--double-quant", "--save-every", "2",
                       "--resume", *QUICK])
    assert rc == 0
    assert (run / "adapter_model.safetensors").read_bytes() == \
        (qlora_run[0] / "adapter_model.safetensors").read_bytes()


def test_fp4_run_computes_in_the_run_precision(tmp_path, capsys):
    rc, model = _finetune(["--output-dir", str(tmp_path / "fp4"), "--quantize", "fp4", "--precision", "bf16",
                           *QUICK, "--max-steps", "2", "--eval-every", "1"])
    assert rc == 0
    for layer in _projections(model).values():
        assert type(layer) is FusedLoraLinear4bit and layer.compute_dtype == torch.bfloat16
        assert layer.weight.quant_state.quant_type == "fp4" and not layer.weight.quant_state.nested
    recs = [json.loads(line) for line in open(tmp_path / "fp4" / "metrics.jsonl")]
    assert recs[1]["eval_loss"] < recs[0]["eval_loss"]
    out = capsys.readouterr().out
    assert "base 4-bit fp4," in out and "bnb_4bit_compute_dtype=torch.bfloat16" in out


def test_merge_of_a_4bit_run_into_the_full_precision_base(qlora_run, tmp_path, capsys):
    """What PEFT users do with a QLoRA adapter: merge it into the dense base the 4-bit base was loaded from."""
    run, _ = qlora_run
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(run / "base_model"), "--adapter", str(run), "--output-dir", str(merged)]) == 0
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(run / "base_model"))
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(dense, str(run)).eval()(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(type(m) is torch.nn.Linear for n, m in
               transformers.AutoModelForCausalLM.from_pretrained(str(merged)).named_modules() if n.endswith(PROJ))

    # A base stored quantized is refused before anything loads: merging would re-quantize W + s·B·A.
    stored = tmp_path / "stored_4bit"
    shutil.copytree(run / "base_model", stored)
    cfg = json.loads((stored / "config.json").read_text())
    cfg["quantization_config"] = _bnb_config().to_dict()
    (stored / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["merge", "--model", str(stored), "--adapter", str(run), "--output-dir", str(tmp_path / "m2")]) == 2
    err = one_line_error(capsys.readouterr().err, "merge")
    assert err.startswith("lora-kernels merge: error: --model") and "stored quantized (bitsandbytes)" in err
    assert "full-precision" in err and not (tmp_path / "m2").exists()


@pytest.mark.parametrize("flags,expected", [
    (["--double-quant"], "--double-quant quantizes the 4-bit base's scales: it needs --quantize nf4|fp4"),
    (["--quantize", "fp4", "__no_bnb__"], "--quantize needs bitsandbytes, which cannot be imported"),
])
def test_quantize_flag_errors_are_one_line_and_write_nothing(flags, expected, tmp_path, monkeypatch, capsys):
    if "__no_bnb__" in flags:
        flags = [f for f in flags if f != "__no_bnb__"]
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # `import bitsandbytes` raises ImportError
    out = tmp_path / "o"
    assert main(["finetune", "--output-dir", str(out), *QUICK, *flags]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert expected in err, err
    if "__no_bnb__" in expected or "bitsandbytes" in expected:
        assert "pip install bitsandbytes" in err
    assert not out.exists()


def test_use_dora_on_a_4bit_run(tmp_path):
    """--quantize with --use-dora: every projection a FusedDoraLinear4bit (bitsandbytes never computes with the
    4-bit weight), the adapter saved with use_dora, and PEFT's QLoRA DoRA layers give our logits on it."""
    from lora_kernels.layers import FusedDoraLinear4bit

    out = tmp_path / "run"
    rc, model = _finetune(["--output-dir", str(out), "--quantize", "fp4", "--use-dora", "--lora-dropout", "0.1",
                           "--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "2",
                           "--eval-max-batches", "1", "--no-progress"])
    assert rc == 0 and json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    layers = _projections(model)
    assert layers and all(type(m) is FusedDoraLinear4bit for m in layers.values())
    model.eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(out / "base_model"), device_map="cpu",
                                                             quantization_config=_bnb_config("fp4", False))
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
