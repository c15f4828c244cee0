"""End to end: training-step tokens/s and peak memory of a Llama-style model, ours vs PEFT.

The model is built from a LlamaConfig (no download), all seven projections (q, k, v, o, gate, up,
down) get a LoRA adapter, the rest is frozen. One step = forward with labels, backward, AdamW step
over the adapters, zero_grad. Both sides start from the same base weights and use PEFT's defaults
for the adapters (float32 on a bf16 base), so the only difference is the LoRA layer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch
from lora_kernels.timing import Timer

from ._internals import gemm_dispatch
from .memory import MB, free

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
E2E_IMPLS = ("peft", "fused")


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int
    dtype: str
    r: int = 16
    lora_alpha: int = 32
    dropout: float = 0.1

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.batch


PRESETS = {
    # Llama-3.2-1B-like blocks (hidden 2048, GQA 32/8 heads, MLP 8192), 4 layers, 8192 tokens per step.
    "llama-2048": Preset("llama-2048", 2048, 8192, 4, 32, 8, 32000, 2048, 4, "bf16"),
    # Llama-3-8B blocks (hidden 4096, MLP 14336), 4 layers, 4096 tokens per step.
    "llama-4096": Preset("llama-4096", 4096, 14336, 4, 32, 8, 32000, 2048, 2, "bf16"),
    # Seconds under the Triton interpreter on CPU: proves the code path, measures nothing.
    "smoke": Preset("smoke", 32, 64, 1, 4, 2, 128, 16, 2, "fp32", r=4, lora_alpha=8),
}


def build_model(p: Preset, device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from .cases import DTYPES

    cfg = LlamaConfig(hidden_size=p.hidden, intermediate_size=p.intermediate, num_hidden_layers=p.layers,
                      num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, vocab_size=p.vocab,
                      max_position_embeddings=p.seq, attention_dropout=0.0)
    torch.manual_seed(seed)  # same seed, same base weights for ours and PEFT
    with torch.device(device):  # initialise on the GPU: a CPU init of the 4096 preset takes long
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype=DTYPES[p.dtype])
    model.config.use_cache = False
    return model


def add_adapters(model, impl: str, p: Preset):
    """(model with adapters, how they were injected)."""
    if impl == "peft":
        import peft

        cfg = peft.LoraConfig(r=p.r, lora_alpha=p.lora_alpha, lora_dropout=p.dropout, target_modules=TARGETS,
                              bias="none")
        return peft.get_peft_model(model, cfg), f"peft.get_peft_model (peft {peft.__version__})"
    if impl == "fused":
        import lora_kernels as lk

        cfg = lk.LoraConfig(r=p.r, lora_alpha=p.lora_alpha, lora_dropout=p.dropout, target_modules=TARGETS)
        return lk.inject_lora(model, cfg), "lora_kernels.inject_lora"
    raise ValueError(f"end-to-end implementation must be one of {E2E_IMPLS}, got {impl!r}")


def prepare(impl: str, p: Preset, device):
    """(step, info): a closure running one training step of `impl` on preset `p`, and what was built."""
    device = torch.device(device)
    model, injected = add_adapters(build_model(p, device), impl, p)
    model.train()
    trainable = [t for t in model.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, p.vocab, (p.batch, p.seq), generator=gen).to(device)
    info = {
        "trainable_params": sum(t.numel() for t in trainable),
        "adapter_dtypes": sorted({str(t.dtype).replace("torch.", "") for t in trainable}),
        "injected_by": injected,
        "lora_kernels_backend": None,
    }
    if impl == "fused":
        import lora_kernels as lk

        probe = torch.empty(1, device=device, dtype=next(model.parameters()).dtype)
        info["lora_kernels_backend"] = lk.resolve_backend(probe)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, info


def run_one(impl: str, p: Preset, device, warmup: int, steps: int) -> dict:
    """Median step time, tokens/s and peak memory of `impl` on preset `p`."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    gemm_dispatch.clear_gemm_choices()
    step, info = prepare(impl, p, device)
    for _ in range(warmup):  # also autotunes the Triton kernels, picks GEMM paths, allocates AdamW's state
        step()
    if impl == "fused":  # which GEMM path LORA_KERNELS_GEMM=auto took for each projection shape and pass
        info["gemm"] = {k.describe(): path for k, (path, _) in gemm_dispatch.gemm_choices().items()}
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if cuda else None
    losses = []
    # Timer's one warm-up step lies after the peak reset: steady state, nothing left to autotune. No L2 flush:
    # a whole model's step does not run out of L2.
    timed = Timer(device, warmup=1, reps=steps, flush_l2=False).measure(lambda _: losses.append(step()))
    step_ms = timed["median_ms"]
    loss = losses[-1]
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    out = {
        "step_ms": round(step_ms, 3),
        "tokens_per_s": round(p.tokens_per_step / (step_ms / 1e3), 1),
        # Peak over the timed steps, everything included (weights, optimizer state, activations).
        "peak_mb": round(peak / MB, 1) if cuda else None,
        # The same peak above what is resident between steps: activations and temporaries.
        "peak_step_mb": round((peak - resident) / MB, 1) if cuda else None,
        "loss": round(float(loss), 4),
        "steps": steps,
        **info,
    }
    del step
    free(device)
    return out


def run_e2e(preset: str, device, warmup: int = 3, steps: int = 10, impls=E2E_IMPLS) -> dict:
    """Both implementations on one preset, one after the other in this process, with their ratios."""
    p = PRESETS[preset]
    res: Dict[str, Optional[dict]] = {impl: run_one(impl, p, device, warmup, steps) for impl in impls}
    out = {"name": f"e2e/{p.name}", "config": asdict(p), "tokens_per_step": p.tokens_per_step, "impls": res}
    ours, peft = res.get("fused"), res.get("peft")
    if ours and peft:
        out["ratios"] = {
            "tokens_per_s_fused_over_peft": round(ours["tokens_per_s"] / peft["tokens_per_s"], 4),
            "peak_mb_fused_over_peft": (round(ours["peak_mb"] / peft["peak_mb"], 4)
                                        if ours["peak_mb"] and peft["peak_mb"] else None),
        }
    return out
