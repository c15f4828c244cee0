"""PEFT: run an existing PEFT model's LoRA layers on the fused kernels, train it, save it with PEFT, and reload it
in plain PEFT (no lora_kernels) with the same logits.

fuse_peft_model replaces only the forward of PEFT's lora.Linear layers: parameters, state-dict keys,
save_pretrained and from_pretrained stay PEFT's. The base is a tiny Llama built from a config (no download).

    python integrations/peft_fuse.py [OUTPUT_DIR]        # OUTPUT_DIR defaults to a new temporary directory
"""
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lora_kernels.integrations.peft import fuse_peft_model


def base_model():
    torch.manual_seed(0)   # the same base weights every time it is built
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def main(out):
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    model = get_peft_model(base_model(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                     init_lora_weights=False))   # B != 0: logits differ from the base
    with torch.no_grad():
        peft_logits = model(ids).logits

    report = fuse_peft_model(model)       # in place; report.skipped says which layers stay on PEFT's path and why
    print(f"fused {len(report.fused)} layers, skipped {len(report.skipped)}")
    with torch.no_grad():
        fused_logits = model(ids).logits
    print(f"fused vs PEFT logits, max abs difference: {(fused_logits - peft_logits).abs().max().item():.2e}")
    torch.testing.assert_close(fused_logits, peft_logits, rtol=1e-5, atol=1e-5)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print("training loss: " + " -> ".join(f"{x:.3f}" for x in losses))
    assert losses[-1] < losses[0], losses

    model.save_pretrained(out)            # PEFT's own save: adapter_config.json + adapter_model.safetensors
    model.eval()
    with torch.no_grad():
        trained_logits = model(ids).logits
    plain = PeftModel.from_pretrained(base_model(), out).eval()   # plain PEFT: nothing fused
    with torch.no_grad():
        reloaded_logits = plain(ids).logits
    diff = (reloaded_logits - trained_logits).abs().max().item()
    print(f"reloaded in plain PEFT vs trained fused model, max abs logit difference: {diff:.2e}")
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=1e-5, atol=1e-5)
    print("OK: plain PEFT reloads the fused model's adapter with equal logits")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="peft_fuse_"))
