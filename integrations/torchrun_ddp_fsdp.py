"""torchrun: fused LoRA under DistributedDataParallel and under FSDP2 (fully_shard), in your own training loop.

The fused layers need nothing special: DDP all-reduces the adapter gradients; FSDP2 unshards each block's
parameters into plain tensors before its forward (the kernels see an ordinary weight, lora_A and lora_B) and
reduce-scatters the adapter gradients. Every rank trains on its own rows; the script trains the same tiny Llama
(built from a config, no download) once under each, saves each adapter in PEFT's format, and checks that the two
runs end with the same adapter. 2 CPU processes with gloo (nccl on GPUs):

    torchrun --standalone --nproc_per_node 2 integrations/torchrun_ddp_fsdp.py [OUTPUT_DIR]
"""
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import lora_kernels as lk


def fused_model(device):
    torch.manual_seed(0)   # every rank builds the same model
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    return lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).to(device)


def train(model, rank, device, steps=6):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)   # after wrapping
    rows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(100 + rank)).to(device)
    losses = []
    for _ in range(steps):
        loss = model(rows, labels=rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    losses = torch.stack(losses)
    dist.all_reduce(losses)
    return (losses / dist.get_world_size()).tolist()   # mean over ranks


def main(out):
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(device)

    model = fused_model(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    losses = train(ddp, rank, device)
    if rank == 0:
        print(f"DDP   loss (mean over ranks): {losses[0]:.3f} -> {losses[-1]:.3f}")
        lk.save_adapter(model, os.path.join(out, "ddp"))   # the model inside DDP: plain parameters

    model = fused_model(device)
    for block in model.model.layers:   # shard each transformer block, then the root
        fully_shard(block)
    fully_shard(model)
    losses = train(model, rank, device)
    # The parameters are now DTensor shards: gather the adapter's full tensors (a collective: every rank calls it)
    # and hand them to the saver, by the model's own parameter names.
    full = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        print(f"FSDP2 loss (mean over ranks): {losses[0]:.3f} -> {losses[-1]:.3f}")
        lk.save_adapters(model, os.path.join(out, "fsdp2"), state_dict=full)

        ddp_file, fsdp_file = (load_file(os.path.join(out, d, "adapter_model.safetensors")) for d in ("ddp", "fsdp2"))
        diff = max((ddp_file[k] - fsdp_file[k]).abs().max().item() for k in ddp_file)
        print(f"DDP and FSDP2 adapters ({len(ddp_file)} tensors), max abs difference: {diff:.2e}")
        if ddp_file.keys() != fsdp_file.keys() or diff > 1e-4 or not losses[-1] < losses[0]:
            sys.exit("DDP and FSDP2 disagree, or the loss did not fall")
        print("OK: DDP and FSDP2 trained the same adapter")
    dist.destroy_process_group()


if __name__ == "__main__":
    # Every rank must write to the same folder: rank 0 picks it and tells the others.
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        dist.init_process_group("gloo")
        chosen = [tempfile.mkdtemp(prefix="torchrun_") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(chosen)
        dist.destroy_process_group()
        main(chosen[0])
