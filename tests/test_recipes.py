"""The recipes in integrations/ run as a user runs them: each in its own process, from an empty working directory,
writing only under the output directory it is given, and ending with its "OK:" line.

They run on the torch backend: they show the integrations (Trainer, TRL, PEFT, bitsandbytes, torchrun), which
reach every backend through the same autograd function, and the interpreted Triton kernels would make each
multi-step run minutes long; the kernels are checked op by op and against PEFT in the other tests.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "integrations"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

RUNS = ("ddp", "peft-ddp", "mixed-ddp", "fsdp2", "peft-fsdp2", "mixed-fsdp2")   # torchrun_trainer.py
# recipe -> lines its output must hold (besides the final "OK:")
EXPECTED = {
    "trainer_resume.py": ["first attempt: killed after step 3",
                          "resumed adapters equal the uninterrupted run's, bit for bit: True"],
    "trl_sft_dpo.py": ["adapters on the model: ['default', 'ref']"],
    "peft_fuse.py": ["fused 14 layers, skipped 0"],
    "dora.py": ["LoRA layer types: ['FusedDoraLinear']"],
    "moe_experts.py": ["LoRA layer types: ['FusedLoraExperts', 'FusedLoraLinear']"],
    "qlora.py": ["LoRA layer types: ['FusedLoraLinear4bit']"],
    "several_adapters.py": ["every lora_B of each adapter moved from zero: {'sql': True, 'chat': True}"],
    "torchrun_ddp_fsdp.py": ["DDP and FSDP2 adapters (28 tensors)"] + [
        f"{kind}: packed {qt} weights sharded as float32 DTensors: True; 28 tensors got gradients, all of them adapter "
        "tensors: True" for kind, qt in (("inject_lora", "nf4"), ("fuse_peft_model", "fp4"))],
    # Trainer's FSDP2 on CPU runs through the recipe's fsdp_on_cpu (accelerate enables FSDP for accelerators only);
    # "sharded parameters: True" is the check that fully_shard really ran.
    "torchrun_trainer.py": [f"{run}: resumed from checkpoint-2, equal to the uninterrupted run bit for bit: True"
                            for run in RUNS]
                           + [f"{run}: sharded parameters: {run.endswith('fsdp2')}" for run in RUNS]
                           + [f"PEFT loaded the {run} adapter(s): {16 if run.startswith('mixed') else 8} LoRA tensors"
                              for run in RUNS]
                           + ["mixed-ddp vs one process on the same global batch",
                              "mixed-fsdp2 vs one process on the same global batch",
                              # accelerate writes trainable tensors only for a PeftModel (docs/scale-out.md)
                              "fsdp2: checkpoint-2/pytorch_model_fsdp.bin holds 29 tensors, the frozen base "
                              "included: True",
                              "peft-fsdp2: checkpoint-2/pytorch_model_fsdp.bin holds 8 tensors, the frozen base "
                              "included: False"],
}
PUBLIC = {"lora_kernels", "lora_kernels.integrations.peft", "lora_kernels.integrations.transformers"}


def _gpus():
    import torch

    return torch.cuda.device_count()


def recipes():
    return sorted(p.name for p in RECIPES.glob("*.py"))


def test_every_recipe_is_run_here_and_listed():
    assert recipes() == sorted(EXPECTED)
    listing = (RECIPES / "README.md").read_text()
    workflows = (REPO / "README.md").read_text()
    for name in recipes():
        assert f"integrations/{name}" in listing, f"integrations/README.md does not list {name}"
        assert f"(integrations/{name})" in workflows, f"README.md does not link integrations/{name}"


@pytest.mark.parametrize("name", recipes())
def test_recipe_uses_only_the_public_api(name):
    tree = ast.parse((RECIPES / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}:{node.lineno}: a relative import (a recipe is a script)"
            mods = [node.module]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        for mod in mods:
            if mod.split(".")[0] == "lora_kernels":
                assert mod in PUBLIC, f"{name}:{node.lineno} imports {mod}"
    assert ast.get_docstring(tree), f"{name} has no docstring"


def test_nothing_imports_the_top_level_integrations_folder():
    """integrations/ (recipes, no __init__) must not be confused with the package lora_kernels.integrations."""
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or ".git" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "integrations" for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] != "integrations", path


@pytest.mark.parametrize("name", recipes())
def test_recipe_runs(name, tmp_path):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LORA_KERNELS_BACKEND="torch", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    launcher = TORCHRUN if name.startswith("torchrun") else [sys.executable]
    if name.startswith("torchrun") and _gpus() < 2:   # a rank per GPU: on one GPU, both ranks run on the CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(launcher + [str(RECIPES / name), str(out)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    for line in EXPECTED[name] + ["OK: "]:
        assert line in proc.stdout, f"{line!r} missing from the output:\n{log[-4000:]}"
    assert not list(cwd.iterdir()), f"{name} wrote into its working directory: {list(cwd.iterdir())}"
    assert any(out.iterdir()), f"{name} wrote nothing to its output directory"
