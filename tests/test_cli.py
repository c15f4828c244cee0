"""`lora-kernels`: help, a short finetune end to end (PEFT loads the result), merge, errors, check, bench."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import one_line_error
from lora_kernels.cli import build_parser, main

FINETUNE_FLAGS = ["--model", "--data", "--output-dir", "--max-steps", "--r", "--lora-alpha", "--lora-dropout",
                  "--target-modules", "--lr", "--batch-size", "--seq-len", "--resume"]
QUICK = ["--max-steps", "4", "--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("cli_defaults")


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
                 "base_model/config.json", "checkpoints/step-0000004/trainer_state.json"):
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


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


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
    # The 4-bit (QLoRA) cases: on both backends, NF4 and FP4, double quant on and off, with and without dropout.
    lines_4bit = [line for line in proc.stdout.splitlines() if " weight=4-bit(" in line and " dora" not in line]
    for backend in ("triton", "torch"):
        mine = [line for line in lines_4bit if line.startswith(f"backend={backend} ")]
        assert len(mine) == 4 and all("y " in line and "grad_x " in line and "FAIL" not in line for line in mine)
        for part in ("4-bit(nf4,", "4-bit(fp4,", "double quant)", "blocksize 32", "blocksize 64", "dropout=0.1"):
            assert any(part in line for line in mine), (backend, part)
        assert any("dropout" not in line for line in mine)
    # DoRA: dense W on the resolved backend (Triton), 4-bit W on both backends, with and without dropout.
    dora = [line for line in proc.stdout.splitlines() if " dora" in line and line.startswith("backend=")]
    assert len(dora) == 6 and all("grad_m " in line and "FAIL" not in line for line in dora), dora
    assert sum(line.startswith("backend=triton") for line in dora) == 4
    assert sum(" weight=4-bit(" in line for line in dora) == 4
    assert any("dropout=0.1" in line and " weight=4-bit(" not in line for line in dora)


def test_check_fails_on_a_wrong_dora_norm(monkeypatch, capsys):
    """A DoRA bug (here: the norm 1 % too large) fails check's DoRA cases, dense and 4-bit, exit 1."""
    import lora_kernels.backends.dora as dora_backend

    real = dora_backend.dora_norm
    monkeypatch.setattr(dora_backend, "dora_norm", lambda *a, **k: real(*a, **k) * 1.01)
    assert main(["check", "--backend", "torch", "--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("backend=") and "FAIL" in line]
    assert len(failed) == 4 and all(" dora" in line for line in failed), failed
    assert any(" weight=4-bit(" in line for line in failed)
    assert all(line.split("y ")[1].split(";")[0].endswith("FAIL") for line in failed)
    assert "FAILED: errors above tolerance" in out


def test_check_fails_on_a_wrong_4bit_dequantization(monkeypatch, capsys):
    """A 4-bit kernel bug (here: the torch backend reads NF4 codes as FP4 and vice versa) fails check, exit 1."""
    import lora_kernels.backends.torch as torch_backend

    real = torch_backend.dequantize
    swapped = {"nf4": "fp4", "fp4": "nf4"}
    monkeypatch.setattr(torch_backend, "dequantize",
                        lambda qw, dtype: real(qw._replace(quant_type=swapped[qw.quant_type]), dtype))
    assert main(["check", "--backend", "torch", "--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("backend=") and "FAIL" in line]
    assert failed and all(" weight=4-bit(" in line for line in failed)
    assert all("y " in line and "FAIL" in line.split("grad_x")[1].split(";")[0] for line in failed)
    assert "FAILED: errors above tolerance" in out


def test_check_without_bitsandbytes_skips_the_4bit_cases(monkeypatch, capsys):
    for name in ("bitsandbytes", "bitsandbytes.functional"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["check", "--backend", "torch", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "4-bit (QLoRA) cases skipped: bitsandbytes cannot be imported" in out and "pip install bitsandbytes" in out
    assert " weight=4-bit(" not in out and "OK: all within tolerance" in out


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


# -- a used output directory, a finished run ------------------------------------------------------------

def test_a_used_output_dir_is_refused_and_left_alone(finetuned, tmp_path, capsys):
    run = _copy(finetuned, tmp_path)
    before = _snapshot(run)
    rc = main(["finetune", "--output-dir", str(run), *QUICK])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 2 and "--resume" in line and "--overwrite" in line and "previous run" in line
    assert _snapshot(run) == before


def test_overwrite_replaces_the_previous_run_only(finetuned, tmp_path, capsys):
    run = _copy(finetuned, tmp_path)
    (run / "checkpoints" / "step-0000999").mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["finetune", "--output-dir", str(run), "--overwrite", "--max-steps", "1", *QUICK[2:]]) == 0
    assert sorted(os.listdir(run / "checkpoints")) == ["step-0000001"]
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1]
    assert (run / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    assert main(["finetune", "--output-dir", str(run), "--overwrite", "--resume", *QUICK]) == 2
    assert "pass one" in one_line_error(capsys.readouterr().err)


def test_resume_of_a_finished_run_says_so_and_changes_nothing(finetuned, tmp_path, capsys):
    run = _copy(finetuned, tmp_path)
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["finetune", "--output-dir", str(run), "--resume", *QUICK]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "is finished" in out[-1] and "step 4" in out[-1] and "nan" not in "".join(out)
    assert _snapshot(run) == before


# -- one-line errors ------------------------------------------------------------------------------------

def _error_cases(tmp_path):
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--device", "foo"], "--device 'foo': not a device name torch knows"),
        (["--output-dir", str(tmp_path / "a_file")], "exists and is not a directory"),
        (["--output-dir", str(tmp_path / "a_file" / "sub")], "is not writable"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device 'cuda': cuda is not available on this machine"))
    if os.path.isdir("/proc/self"):  # not writable even by root, unlike a chmod-ed folder
        cases.append((["--output-dir", "/proc/self"], "is not writable"))
    return cases


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    for flags, expected in _error_cases(tmp_path):
        rc = main(["finetune", "--output-dir", str(tmp_path / "o"), *QUICK, *flags])
        line = one_line_error(capsys.readouterr().err)
        assert rc == 2 and expected in line, (flags, line)
    assert main(["bench", "--device", "foo"]) == 2
    assert "--device 'foo'" in one_line_error(capsys.readouterr().err, "bench")
    rc = main(["merge", "--model", str(tmp_path), "--adapter", str(tmp_path), "--output-dir", str(tmp_path / "m")])
    assert rc == 2 and one_line_error(capsys.readouterr().err, "merge")


def test_seq_len_below_2_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--seq-len", "1", "--output-dir", str(tmp_path)])
    assert exc.value.code == 2 and "argument --seq-len: must be >= 2" in capsys.readouterr().err


# -- Ctrl-C ---------------------------------------------------------------------------------------------

def test_ctrl_c_in_process_checkpoints_and_resume_finishes_the_same_run(finetuned, tmp_path, monkeypatch, capsys):
    from lora_kernels.training import Trainer

    run = tmp_path / "run"
    orig = Trainer._train_step

    def step(self):
        if self.step == 2:  # during step 3
            os.kill(os.getpid(), signal.SIGINT)
        return orig(self)

    monkeypatch.setattr(Trainer, "_train_step", step)
    rc = main(["finetune", "--output-dir", str(run), "--save-every", "2", *QUICK])
    assert rc == 130
    assert capsys.readouterr().err.strip() == "lora-kernels finetune: interrupted at step 3; continue with --resume"
    assert (run / "checkpoints" / "step-0000003").is_dir()
    monkeypatch.undo()
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    assert main(["finetune", "--output-dir", str(run), "--save-every", "2", "--resume", *QUICK]) == 0
    assert (run / "adapter_model.safetensors").read_bytes() == (finetuned / "adapter_model.safetensors").read_bytes()


def test_ctrl_c_to_a_running_process(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, LORA_KERNELS_BACKEND="torch")
    proc = subprocess.Popen([sys.executable, "-m", "lora_kernels.cli", "finetune", "--output-dir", str(run),
                             "--max-steps", "100000", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0",
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    step = int(re.fullmatch(r"lora-kernels finetune: interrupted at step (\d+); continue with --resume", last)[1])
    assert (run / "checkpoints" / f"step-{step:07d}").is_dir()


# -- threads, eval cap, GPT-2 -------------------------------------------------------------------------------

def test_tiny_default_trains_on_one_thread(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert main(["finetune", "--output-dir", str(tmp_path / "o"), "--max-steps", "1", *QUICK[2:]]) == 0
    assert torch.get_num_threads() == 1 and "(1 intra-op thread)" in capsys.readouterr().out
    assert main(["finetune", "--output-dir", str(tmp_path / "p"), "--threads", "2", "--max-steps", "1",
                 *QUICK[2:]]) == 0
    assert torch.get_num_threads() == 2


def test_eval_max_batches_caps_every_eval_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["finetune", "--output-dir", str(out), "--eval-max-batches", "1", *QUICK]) == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["eval_rows"] for r in recs if "eval_loss" in r] == [2, 2]  # step 2 and the final eval: 1 batch of 2
    assert "(2 evaluated each time)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from lora_kernels.data import ByteTokenizer

    path = tmp_path_factory.mktemp("gpt2")
    tok = ByteTokenizer()  # saved beside the model: load_pretrained takes it instead of an AutoTokenizer
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_finetune_a_local_gpt2_with_all_linear(gpt2_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    out = tmp_path / "o"
    assert main(["finetune", "--model", str(gpt2_dir), "--output-dir", str(out), *QUICK]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert sorted({t.rsplit(".", 1)[-1] for t in cfg["target_modules"]}) == ["c_attn", "c_fc", "c_proj"]
    ids = torch.randint(0, 256, (2, 16))
    model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_dir), str(out)).eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, GPT2LMHeadModel.from_pretrained(gpt2_dir)(ids).logits)


def test_gpt2_seq_len_beyond_its_positions_is_an_error(gpt2_dir, tmp_path, capsys):
    rc = main(["finetune", "--model", str(gpt2_dir), "--output-dir", str(tmp_path / "o"), *QUICK, "--seq-len", "65"])
    assert rc == 2 and "exceeds the model's 64 learned positions" in one_line_error(capsys.readouterr().err)
