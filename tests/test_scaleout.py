"""Several adapters beyond one process: the CLI's `finetune --adapter a=FILE --adapter b=FILE` under torchrun with
2 gloo ranks, DDP and FSDP2, each compared with the one-process run on the same global batch and resumed.

One torchrun launch (tests/multi_rank_runs.py) runs all six distributed runs (DDP, FSDP2, FSDP2 over an NF4 base,
each resumed): each launch costs ~10 s of imports.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_kernels.cli import main

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import multi_rank_runs as runs  # noqa: E402

ADAPTERS = ("prose", "qa")
STRATEGIES = ("ddp", "fsdp")


def _write_data(directory):
    """Plain text only: every position is a loss token, so each rank's share of an adapter's tokens is equal and
    the mean of the ranks' gradients is the gradient of the global batch's mean loss."""
    prose, qa = directory / "prose.jsonl", directory / "qa.jsonl"
    words = "the fused kernel reads each tile once and keeps only the input for the backward pass".split()
    prose.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) + "\n" for i in range(16)))
    qa.write_text("".join(json.dumps({"text": f"What is {i} plus {i}? {2 * i}."}) + "\n" for i in range(40)))
    return prose, qa


def _launch(root, gpu=False):
    """All the 2-rank runs, in one torchrun launch (on CPU with gloo; with gpu, one GPU per rank, Triton)."""
    prose, qa = _write_data(root)
    env = dict(os.environ, LORA_KERNELS_BACKEND="auto" if gpu else "torch", OMP_NUM_THREADS="1",
               PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if gpu:
        env.pop("TRITON_INTERPRET", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "multi_rank_runs.py"), str(root), str(prose), str(qa)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return prose, qa, proc


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaleout")
    prose, qa, proc = _launch(root)
    # One process, the same global batch: both ranks' rows of each adapter in one micro-batch.
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_KERNELS_BACKEND", "torch")
    n = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = runs.finetune(str(root / "single"), prose, qa, "none", "--batch-size", str(2 * runs.BATCH))
    finally:
        mp.undo()
        torch.set_num_threads(n)
    assert rc == 0
    return root, proc.stdout


def _adapter(run, name):
    return load_file(str(run / name / "adapter_model.safetensors"))


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ranks_end_with_identical_trained_adapters(runs_root, strategy):
    root, _ = runs_root
    r0, r1 = (torch.load(root / strategy / f"final{r}.pt") for r in (0, 1))
    assert set(r0) == set(r1) and any(n.endswith(".qa") for n in r0)   # the first adapter keeps lora_A, lora_B
    for n in r0:
        assert torch.equal(r0[n], r1[n]), f"{strategy}: {n} differs between ranks"
    for name in ADAPTERS:
        assert any(t.abs().max() > 0 for k, t in _adapter(root / strategy, name).items() if "lora_B" in k), name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_equals_the_one_process_run_on_the_same_global_batch(runs_root, strategy):
    root, _ = runs_root
    for name in ADAPTERS:
        ours, single = _adapter(root / strategy, name), _adapter(root / "single", name)
        assert set(ours) == set(single) and ours
        for key in single:   # fp32, summed in another order over the ranks
            torch.testing.assert_close(ours[key], single[key], rtol=1e-4, atol=1e-5, msg=f"{strategy} {name} {key}")
    keys = [f"{k}/{name}" for k in ("loss", "eval_loss") for name in ADAPTERS]
    for mine, one in zip(_records(root / strategy), _records(root / "single")):
        assert [k for k in keys if k in mine] == [k for k in keys if k in one]
        for k in keys:
            if k in one:   # the per-rank token-weighted means, reduced, are the global batch's
                assert mine[k] == pytest.approx(one[k], rel=1e-5), (strategy, mine["step"], k)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_is_bit_exact(runs_root, strategy):
    root, _ = runs_root
    full, resumed = root / strategy, root / f"{strategy}-resumed"
    for name in ADAPTERS:
        assert ((resumed / name / "adapter_model.safetensors").read_bytes()
                == (full / name / "adapter_model.safetensors").read_bytes()), (strategy, name)
    keys = [f"{k}/{name}" for k in ("loss", "grad_norm", "eval_loss") for name in ADAPTERS]
    assert [[r.get(k) for k in keys] for r in _records(resumed)] == [[r.get(k) for k in keys] for r in _records(full)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_metrics_and_reports_are_written_once(runs_root, strategy):
    root, stdout = runs_root
    recs = _records(root / strategy)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]   # rank 1 appends nothing
    assert all(f"loss/{name}" in r for r in recs for name in ADAPTERS)
    assert stdout.count(f"-> {root / strategy / 'prose'}/") == 1
    assert stdout.count("2 process(es)") == 6   # six runs, each reported by rank 0 alone


@pytest.fixture(scope="module")
def single_nf4(runs_root):
    """The one-process QLoRA run on the same global batch as the 2-rank FSDP2 one."""
    root, _ = runs_root
    prose, qa = root / "prose.jsonl", root / "qa.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_KERNELS_BACKEND", "torch")
    n = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = runs.finetune(str(root / "single-nf4"), prose, qa, "none", "--batch-size", str(2 * runs.BATCH),
                               quantized=True)
    finally:
        mp.undo()
        torch.set_num_threads(n)
    assert rc == 0
    return root / "single-nf4"


def test_fsdp2_trains_a_4bit_base_like_one_process(runs_root, single_nf4):
    """--quantize nf4 --strategy fsdp: the packed NF4 bytes (float32 quant storage) are sharded, each rank's fused
    4-bit layers dequantize the gathered bytes with the quant state kept on the module; both ranks end equal,
    equal to one process on the same global batch, and resume bit for bit."""
    root, stdout = runs_root
    run, resumed = root / "fsdp-nf4", root / "fsdp-nf4-resumed"
    assert "base 4-bit nf4, 2 process(es)" in stdout
    r0, r1 = (torch.load(run / f"final{r}.pt") for r in (0, 1))
    assert set(r0) == set(r1) and r0 and all(torch.equal(r0[n], r1[n]) for n in r0)
    ours, single = (load_file(str(d / "adapter_model.safetensors")) for d in (run, single_nf4))
    assert set(ours) == set(single) and any(t.abs().max() > 0 for k, t in ours.items() if "lora_B" in k)
    for key in single:
        torch.testing.assert_close(ours[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    assert ((resumed / "adapter_model.safetensors").read_bytes() == (run / "adapter_model.safetensors").read_bytes())
    assert [r["loss"] for r in _records(resumed)] == [r["loss"] for r in _records(run)]
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4]


@pytest.mark.gpu
def test_two_gpus(tmp_path):
    """The same runs on 2 GPUs (nccl, the Triton kernels): ranks end equal and resume bit for bit."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _launch(tmp_path, gpu=True)
    for run in ("ddp", "fsdp", "fsdp-nf4"):
        r0, r1 = (torch.load(tmp_path / run / f"final{r}.pt") for r in (0, 1))
        assert r0 and all(torch.equal(r0[n], r1[n]) for n in r0), run
    for name in ADAPTERS:
        for strategy in STRATEGIES:
            assert ((tmp_path / f"{strategy}-resumed" / name / "adapter_model.safetensors").read_bytes()
                    == (tmp_path / strategy / name / "adapter_model.safetensors").read_bytes()), (strategy, name)
