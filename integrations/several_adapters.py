"""Several adapters on one base: trained together in mixed batches (each row with its own adapter), saved one
folder per adapter in PEFT's format, and served by PEFT with adapter_names=[...] (plain, then fused).

lk.batch_adapters(model, names) runs each row of a batch through its own adapter (None: the base model) in one
forward, on the segmented kernels; each adapter gets the gradients of its own rows. A tiny Llama built from a
config (no download); two "tasks" of made-up token sequences.

    python integrations/several_adapters.py [OUTPUT_DIR]  # OUTPUT_DIR defaults to a new temporary directory
"""
import os
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lora_kernels as lk
from lora_kernels.integrations.peft import fuse_peft_model


def base_model():
    torch.manual_seed(0)   # the same base weights every time
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def main(out):
    model = base_model()
    lk.inject_lora(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), adapter_name="sql")
    lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name="chat")

    g = torch.Generator().manual_seed(1)
    tasks = {"sql": torch.randint(0, 32, (2, 16), generator=g), "chat": torch.randint(32, 64, (2, 16), generator=g)}
    ids = torch.cat([tasks["sql"], tasks["chat"]])
    names = ["sql", "sql", "chat", "chat"]   # one entry per row

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        with lk.batch_adapters(model, names):
            loss = model(ids, labels=ids).loss
        loss.backward()   # sql's A and B get the gradients of rows 0-1, chat's of rows 2-3
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"mixed-batch training loss: {losses[0]:.3f} -> {losses[-1]:.3f}")

    trained = {}
    for name in ("sql", "chat"):
        lk.save_adapter(model, os.path.join(out, name), adapter_name=name)   # PEFT's files, one folder each
        tensors = load_file(os.path.join(out, name, "adapter_model.safetensors"))
        trained[name] = all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)   # B starts at 0
    print(f"every lora_B of each adapter moved from zero: {trained}")

    serve_ids = torch.cat([tasks["chat"][:1], tasks["sql"][:1], tasks["sql"][1:]])
    serve_names = ["chat", "sql", "__base__"]   # "__base__" (or None here): the base model
    model.eval()
    with torch.no_grad(), lk.batch_adapters(model, serve_names):
        ours = model(serve_ids).logits

    peft_model = PeftModel.from_pretrained(base_model(), os.path.join(out, "sql"), adapter_name="sql")
    peft_model.load_adapter(os.path.join(out, "chat"), adapter_name="chat")
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(serve_ids, adapter_names=serve_names).logits
        fuse_peft_model(peft_model)   # PEFT's mixed batches now run on the segmented kernels too
        fused = peft_model(serve_ids, adapter_names=serve_names).logits
    print(f"PEFT adapter_names vs batch_adapters, max abs logit difference: {(theirs - ours).abs().max():.2e}")
    print(f"fused PEFT adapter_names vs batch_adapters, max abs logit difference: {(fused - ours).abs().max():.2e}")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, ours, rtol=1e-5, atol=1e-5)
    if not (losses[-1] < losses[0] and all(trained.values())):
        sys.exit("the mixed-batch training did not train both adapters")
    print("OK: two adapters trained in mixed batches, served by PEFT with equal logits")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="several_adapters_"))
