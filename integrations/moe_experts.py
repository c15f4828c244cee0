"""LoRA on MoE experts (PEFT's target_parameters): a tiny Qwen3-MoE whose attention projections and 3-D expert
weights get adapters, trained with dropout (which PEFT refuses on experts), then saved in PEFT's format and
reloaded by plain PEFT with the same logits (an adapter trained without dropout: PEFT loads only those).

The experts run as grouped LoRA over the token-expert pairs sorted by expert, never building B·A for an expert
(docs/moe.md; on the grouped Triton kernels where the dense layers run Triton, else the PyTorch path). The model is built from a config (no download).

    python integrations/moe_experts.py [OUTPUT_DIR]        # OUTPUT_DIR defaults to a new temporary directory
"""
import copy
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import lora_kernels as lk

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def base_model():
    torch.manual_seed(0)   # the same base weights every time it is built
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              head_dim=16, decoder_sparse_step=1))


def train(model, ids, steps):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main(out):
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    base = base_model()

    dropped = lk.inject_lora(copy.deepcopy(base), lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                target_modules=["q_proj", "v_proj"],
                                                                target_parameters=EXPERTS))
    kinds = sorted({type(m).__name__ for m in dropped.modules() if type(m).__name__.startswith("FusedLora")})
    print(f"LoRA layer types: {kinds}")
    losses = train(dropped, ids, 6)
    print("with dropout 0.1 on the experts, training loss: " + " -> ".join(f"{x:.3f}" for x in losses))
    assert losses[-1] < losses[0], losses

    model = lk.inject_lora(copy.deepcopy(base), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              target_parameters=EXPERTS))
    losses = train(model, ids, 6)
    print("without dropout, training loss: " + " -> ".join(f"{x:.3f}" for x in losses))
    lk.save_adapter(model, out)   # PEFT's target_parameters layout: lora_A (r·E, in), lora_B (out, r·E) per weight
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
    plain = PeftModel.from_pretrained(base_model(), out).eval()   # plain PEFT: its ParamWrapper on the experts
    with torch.no_grad():
        theirs = plain(ids).logits
    print(f"plain PEFT vs fused experts, max abs logit difference: {(theirs - ours).abs().max().item():.2e}")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    print("OK: experts trained with dropout; an adapter reloaded by plain PEFT with equal logits")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="moe_experts_"))
