"""`lora-kernels`: help, a short finetune end to end (PEFT loads the result), merge, errors, check, bench."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lora_kernels.cli import build_parser, main

FINETUNE_FLAGS = ["--model", "--data", "--output-dir", "--max-steps", "--r", "--lora-alpha", "--lora-dropout",
                  "--target-modules", "--lr", "--batch-size", "--seq-len", "--resume"]
QUICK = ["--max-steps", "4", "--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


@pytest.mark.parametrize("command", ["finetune", "merge", "check", "bench"])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    if command == "finetune":
        for flag in FINETUNE_FLAGS:
            assert flag in out, flag
    actions = build_parser()._subparsers._group_actions[0].choices[command]._actions
    for action in actions:  # every option documents itself
        assert action.help, action.option_strings


def test_console_script_is_installed():
    exe = shutil.which("lora-kernels")
    if exe is None:
        pytest.skip("console script not on PATH (package not pip-installed)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "finetune" in proc.stdout and "bench" in proc.stdout


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_KERNELS_BACKEND", "torch")
    try:
        rc = main(["finetune", "--output-dir", str(out), "--save-every", "2", *QUICK])
    finally:
        mp.undo()
    assert rc == 0
    return out


def test_finetune_writes_peft_adapter_metrics_and_plot(finetuned, capsys):
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss_curve.png",
                 "base_model/config.json", "checkpoints/step-0000004/trainer_state.pt"):
        assert (finetuned / name).is_file(), name
    with open(finetuned / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and "eval_loss" in recs[1]
    cfg = json.loads((finetuned / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(finetuned / "base_model")


def test_peft_loads_the_adapter_and_merge_matches(finetuned, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(finetuned / "base_model"))
    model = peft.PeftModel.from_pretrained(base, str(finetuned)).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        y_peft = model(ids).logits
        y_base = AutoModelForCausalLM.from_pretrained(str(finetuned / "base_model"))(ids).logits
    assert not torch.allclose(y_peft, y_base)  # the adapter trained (lora_B moved off zero)
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(finetuned / "base_model"), "--adapter", str(finetuned),
                 "--output-dir", str(merged)]) == 0
    with torch.no_grad():
        y_merged = AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits
    torch.testing.assert_close(y_merged, y_peft, rtol=1e-4, atol=1e-4)


def test_resume_continues_from_latest_checkpoint(finetuned, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finetuned, run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    (run / "adapter_model.safetensors").unlink()
    assert main(["finetune", "--output-dir", str(run), "--save-every", "2", "--resume", *QUICK]) == 0
    assert (run / "adapter_model.safetensors").read_bytes() == (finetuned / "adapter_model.safetensors").read_bytes()


def test_bad_data_line_is_reported_with_file_and_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"prompt": "no response"}\n')
    rc = main(["finetune", "--data", str(data), "--output-dir", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:2:" in err and "'response'" in err


@pytest.mark.parametrize("flags, expected", [
    (["--data", "/nonexistent/train.jsonl"], "--data '/nonexistent/train.jsonl': no such file"),
    (["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such directory"),
    (["--resume", "/nonexistent/ckpt"], "--resume '/nonexistent/ckpt': no such checkpoint directory"),
])
def test_bad_paths_are_clear_errors(tmp_path, capsys, flags, expected):
    rc = main(["finetune", "--output-dir", str(tmp_path / "o"), *flags, *QUICK])
    assert rc == 2 and expected in capsys.readouterr().err


def test_model_dir_without_config(tmp_path, capsys):
    rc = main(["finetune", "--model", str(tmp_path), "--output-dir", str(tmp_path / "o"), *QUICK])
    assert rc == 2 and "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--max-steps", "0"], "must be >= 1"),
    (["--lora-dropout", "1.5"], "argument --lora-dropout: must be in [0, 1)"),
    (["--lr", "-1"], "must be a finite number > 0"),
    (["--precision", "fp8"], "invalid choice"),
])
def test_bad_flag_values(tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--output-dir", str(tmp_path), *flags])
    assert exc.value.code == 2 and expected in capsys.readouterr().err


def test_out_of_range_training_option_is_a_clear_error(tmp_path, capsys):
    rc = main(["finetune", "--weight-decay", "-1", "--output-dir", str(tmp_path / "o"), *QUICK])
    assert rc == 2 and "weight_decay must be a finite number >= 0" in capsys.readouterr().err


def test_unknown_target_module_is_a_clear_error(tmp_path, capsys):
    rc = main(["finetune", "--target-modules", "no_such_proj", "--output-dir", str(tmp_path / "o"), *QUICK])
    assert rc == 2 and "no_such_proj" in capsys.readouterr().err


def test_merge_rejects_non_adapter_dir(tmp_path, capsys):
    rc = main(["merge", "--model", str(tmp_path), "--adapter", str(tmp_path), "--output-dir", str(tmp_path / "m")])
    assert rc == 2 and "no adapter_config.json" in capsys.readouterr().err


def test_check_runs_triton_interpreter_and_passes():
    env = dict(os.environ)
    env.pop("LORA_KERNELS_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # check must switch the interpreter on by itself
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.cli", "check", "--dtype", "float32"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backend=triton" in proc.stdout and "dtype=float32" in proc.stdout
    assert "OK: all within tolerance" in proc.stdout
    if not torch.cuda.is_available():
        assert "device=cpu" in proc.stdout and "(Triton interpreter)" in proc.stdout
    assert "grad_A " in proc.stdout and "(tolerance 2e-05)" in proc.stdout


def test_bench_prints_device_and_three_timings(capsys):
    assert main(["bench", "--tokens", "64", "--in-features", "32", "--r", "4", "--min-time", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "device cpu" in out and "FusedLoraLinear" in out and "base nn.Linear" in out
    assert "PEFT LoRA Linear" in out or "peft is not installed" in out


def test_finetune_a_local_model_directory(finetuned, tmp_path, capsys):
    """--model PATH: a saved transformers model (here the tiny base), a comma list of targets, bf16 autocast."""
    out = tmp_path / "local"
    rc = main(["finetune", "--model", str(finetuned / "base_model"), "--output-dir", str(out),
               "--target-modules", "q_proj,v_proj", "--r", "2", "--lora-alpha", "4", "--precision", "bf16", *QUICK])
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    targets = cfg["target_modules"]
    assert len(targets) == 4 and all(t.endswith(("q_proj", "v_proj")) for t in targets) and cfg["r"] == 2
    assert cfg["base_model_name_or_path"] == str(finetuned / "base_model")
    assert not (out / "base_model").exists()  # a user's model is referenced, not copied
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
