"""The trainer under torchrun: 2 CPU processes with gloo (DDP), FSDP2 on CPU, and FSDP2 on GPU."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each rank trains the tiny model for a few steps and saves what it ends with, so the test can compare ranks.
SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import lora_kernels as lk
    from lora_kernels.data import DEMO_PATH, load_packed
    from lora_kernels.models import build_tiny_model
    from lora_kernels.training import Trainer, TrainConfig, trainable_state_dict

    out, strategy, device = sys.argv[1], sys.argv[2], sys.argv[3]
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    torch.manual_seed(0)
    model, tok = build_tiny_model(32, seed=0)
    lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    init = trainable_state_dict(model)
    ds = load_packed(DEMO_PATH, tok, 32)
    cfg = TrainConfig(output_dir=out, max_steps=4, batch_size=2, lr=5e-3, warmup_steps=0, eval_every=0,
                      progress=False, plot=False, strategy=strategy, save_every=2, eval_batches=1)
    trainer = Trainer(model, ds, cfg, eval_data=ds, device=torch.device(device), save_adapter=lk.save_adapter)
    first_rows = trainer.batches._order[:2].tolist()
    if resume:
        torch.manual_seed(1234 + dist.get_rank())  # restoring the checkpoint must undo this
    res = trainer.train(resume_from=resume)
    rank = dist.get_rank()
    torch.save({"final": trainable_state_dict(trainer.model), "init": init, "rows": first_rows,
                "loss": res.loss}, os.path.join(out, f"rank{rank}_result.pt"))
    dist.destroy_process_group()
""")


def _torchrun(tmp_path, strategy, device="cpu", nproc=2, resume=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "train_rank.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, LORA_KERNELS_BACKEND="torch" if device == "cpu" else "auto", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None) if device != "cpu" else None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), str(tmp_path / "out"), strategy, device] + ([resume] if resume else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # The end-of-run eval runs on every rank (all take part in the reduction), but only rank 0 reports it.
    assert (proc.stdout + proc.stderr).count("step 4: eval loss") == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / "out" / f"rank{r}_result.pt") for r in range(nproc)]


def _assert_same_trained_adapter(results):
    r0, r1 = results
    assert r0["rows"] != r1["rows"], "ranks must read different rows"
    assert set(r0["final"]) == set(r1["final"]) and r0["final"]
    for n in r0["final"]:
        assert torch.equal(r0["final"][n], r1["final"][n]), f"{n} differs between ranks"
    assert any(not torch.equal(r0["final"][n], r0["init"][n]) for n in r0["final"] if "lora_B" in n)


def test_ddp_two_ranks_end_with_identical_adapters(tmp_path):
    results = _torchrun(tmp_path, "ddp")
    _assert_same_trained_adapter(results)
    assert results[0]["loss"] == results[1]["loss"]  # the logged loss is the mean over ranks
    ckpt = tmp_path / "out" / "checkpoints" / "step-0000004"
    assert (ckpt / "rank0.json").is_file() and (ckpt / "rank1.json").is_file()


def test_ddp_resume_reproduces_uninterrupted_run(tmp_path):
    """Per-rank RNG states and data cursors: two ranks resumed from step 2 end exactly where the full run did."""
    import shutil

    full = _torchrun(tmp_path / "full", "ddp")
    ckpt = tmp_path / "full" / "out" / "checkpoints" / "step-0000002"
    shutil.copytree(ckpt, tmp_path / "resumed" / "out" / "checkpoints" / "step-0000002")
    resumed = _torchrun(tmp_path / "resumed", "ddp", resume="latest")
    for n in full[0]["final"]:
        assert torch.equal(full[0]["final"][n], resumed[0]["final"][n]), n
        assert torch.equal(full[1]["final"][n], resumed[1]["final"][n]), n
    assert full[0]["loss"] == resumed[0]["loss"]


def test_fsdp2_two_ranks_cpu(tmp_path):
    """FusedLoraLinear under fully_shard (gloo on CPU): trains and matches the DDP run closely."""
    fsdp = _torchrun(tmp_path / "fsdp", "fsdp")
    _assert_same_trained_adapter(fsdp)
    ddp = _torchrun(tmp_path / "ddp", "ddp")
    for n in ddp[0]["final"]:
        torch.testing.assert_close(fsdp[0]["final"][n], ddp[0]["final"][n], rtol=1e-4, atol=1e-5)
    # The PEFT-format adapter written under FSDP2 holds the gathered full tensors, like the DDP one.
    from safetensors.torch import load_file

    files = [load_file(str(tmp_path / d / "out" / "adapter_model.safetensors")) for d in ("fsdp", "ddp")]
    assert set(files[0]) == set(files[1]) and files[0]
    for key in files[0]:
        assert files[0][key].shape == files[1][key].shape, key
        torch.testing.assert_close(files[0][key], files[1][key], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_fsdp2_gpu(tmp_path):
    n = torch.cuda.device_count()
    if n < 1:
        pytest.skip("needs a GPU")
    results = _torchrun(tmp_path, "fsdp", device="cuda", nproc=min(n, 2))
    if len(results) == 2:
        _assert_same_trained_adapter(results)
    assert all(torch.isfinite(t).all() for t in results[0]["final"].values())
