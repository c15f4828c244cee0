"""`lora-kernels finetune --use-dora`: a short DoRA run writes PEFT's DoRA adapter (PEFT loads it with our logits),
and `merge` merges it by PEFT's rule. (A separate file: the CLI is being split into a package.)"""
import json

import pytest
import torch

from lora_kernels.cli import main

QUICK = ["--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "2", "--no-progress",
         "--lora-dropout", "0.1"]

pytestmark = pytest.mark.usefixtures("cli_defaults")


def test_finetune_use_dora_then_peft_and_merge(tmp_path, monkeypatch, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    out = tmp_path / "run"
    assert main(["finetune", "--output-dir", str(out), "--use-dora", *QUICK]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        y_peft = model(ids).logits
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(out / "base_model"), "--adapter", str(out), "--output-dir",
                 str(merged)]) == 0
    with torch.no_grad():
        y_merged = AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits
    torch.testing.assert_close(y_merged, y_peft, rtol=1e-4, atol=1e-4)
