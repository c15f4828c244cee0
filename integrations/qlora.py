"""QLoRA: a bitsandbytes 4-bit (NF4, double quantization) base with fused LoRA layers, trained, then the adapter
merged into the full-precision base.

inject_lora puts a FusedLoraLinear4bit over every targeted bnb Linear4bit: the kernels read the packed weight and
dequantize it tile by tile (no float copy of W is kept). The adapter is saved in PEFT's format; merging it into
the full-precision checkpoint (what `lora-kernels merge` does) gives a plain transformers model. The base is a
tiny Llama built from a config and saved to OUTPUT_DIR/base (no download); bitsandbytes >= 0.49 runs on CPU.

    python integrations/qlora.py [OUTPUT_DIR]            # OUTPUT_DIR defaults to a new temporary directory
"""
import os
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import lora_kernels as lk


def main(out):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_dir, adapter_dir, merged_dir = (os.path.join(out, d) for d in ("base", "adapter", "merged"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=64)).save_pretrained(base_dir)

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, device_map=device)
    lk.inject_lora(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, lk.FusedLoraLinear)})
    print(f"LoRA layer types: {kinds}")
    lk.print_trainable_parameters(model)

    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1)).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"4-bit base + adapter, training loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    lk.save_adapter(model, adapter_dir)   # PeftModel.from_pretrained(<the 4-bit base>, adapter_dir) reads it

    full = AutoModelForCausalLM.from_pretrained(base_dir, device_map=device)   # the full-precision checkpoint
    with torch.no_grad():
        base_loss = full(ids, labels=ids).loss.item()
    merged = lk.merge_and_unload(lk.load_adapter(full, adapter_dir))   # W += s·B·A; plain nn.Linear layers again
    merged.save_pretrained(merged_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, device_map=device)   # no lora_kernels needed
    model.eval()
    with torch.no_grad():
        merged_loss = reloaded(ids, labels=ids).loss.item()
        qlora_loss = model(ids, labels=ids).loss.item()
    print(f"loss of the full-precision base {base_loss:.3f}, of the 4-bit model with its adapter {qlora_loss:.3f}, "
          f"of the merged full-precision model {merged_loss:.3f}")
    if not (losses[-1] < losses[0] and merged_loss < base_loss - 0.5 * (losses[0] - losses[-1])):
        sys.exit("the merged model did not keep what the adapter learned")
    print("OK: trained on the 4-bit base, merged into the full-precision one")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="qlora_"))
