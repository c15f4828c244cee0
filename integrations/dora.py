"""DoRA (PEFT's use_dora=True) on the fused layers: inject, train with dropout, save in PEFT's format, reload in
plain PEFT with the same logits, and merge by PEFT's rule W' = m/‖W + s·B·A‖ · (W + s·B·A).

The column norm is computed without ever building B·A, and the dropout mask is regenerated in backward, never
stored (docs/dora.md). The base is a tiny Llama built from a config (no download).

    python integrations/dora.py [OUTPUT_DIR]        # OUTPUT_DIR defaults to a new temporary directory
"""
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import lora_kernels as lk


def base_model():
    torch.manual_seed(0)   # the same base weights every time it is built
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def main(out):
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    model = lk.inject_lora(base_model(), lk.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, use_dora=True,
                                                       target_modules="all-linear"))
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, lk.FusedLoraLinear)})
    print(f"LoRA layer types: {kinds}")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss   # training mode: dropout on, DoRA's formula with the dropped input
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print("training loss: " + " -> ".join(f"{x:.3f}" for x in losses))
    assert losses[-1] < losses[0], losses

    lk.save_adapter(model, out)   # adapter_config.json (use_dora) + lora_A/lora_B/lora_magnitude_vector weights
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
    plain = PeftModel.from_pretrained(base_model(), out).eval()   # plain PEFT: its own DoRA layers
    with torch.no_grad():
        theirs = plain(ids).logits
    print(f"plain PEFT vs fused DoRA, max abs logit difference: {(theirs - ours).abs().max().item():.2e}")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    merged = lk.merge_and_unload(model)   # nn.Linear layers holding g·(W + s·B·A)
    with torch.no_grad():
        merged_logits = merged(ids).logits
    print(f"merged vs unmerged, max abs logit difference: {(merged_logits - ours).abs().max().item():.2e}")
    torch.testing.assert_close(merged_logits, ours, rtol=1e-4, atol=1e-4)
    print("OK: DoRA trained fused, reloaded by plain PEFT with equal logits, merged as PEFT merges")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dora_"))
