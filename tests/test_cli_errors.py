"""Issue 22, items 2 and 5-8: no code from a model folder; one-line errors, notices and refusals where a careless or
hostile input used to give a traceback, a hang or silent acceptance; README's claims about the CLI hold."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import lora_kernels as lk
from helpers import copy_run, finished_run, one_line_error
from lora_kernels.cli import main

QUICK = ["--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--eval-fraction", "0",
         "--save-every", "1", "--no-progress"]

pytestmark = pytest.mark.usefixtures("cli_defaults")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(tmp_path_factory, "errors", QUICK)


def _error(capsys, argv, command="finetune"):
    rc = main(argv)
    assert rc == 2, rc
    return one_line_error(capsys.readouterr().err, command)


# -- item 2: a model folder's code never runs ----------------------------------------------------------------------

def test_a_model_folder_with_its_own_code_is_refused_and_the_code_never_runs(run, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(run / "base_model", model)
    marker = tmp_path / "ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    line = _error(capsys, ["finetune", "--model", str(model), "--output-dir", str(tmp_path / "o"), *QUICK])
    assert "auto_map" in line and "modeling_evil.py" in line and "never runs" in line
    line = _error(capsys, ["merge", "--model", str(model), "--adapter", str(run), "--output-dir",
                           str(tmp_path / "m")], "merge")
    assert "auto_map" in line and not marker.exists()


def test_pickled_weights_are_a_one_line_error(run, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(run / "base_model", model)
    for f in model.glob("*.safetensors*"):
        f.unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    line = _error(capsys, ["finetune", "--model", str(model), "--output-dir", str(tmp_path / "o"), *QUICK])
    assert "pytorch_model.bin" in line and "pickles" in line


# -- item 5: one-line errors ---------------------------------------------------------------------------------------

def test_a_seed_beyond_64_bits_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--seed", str(2**64), "--output-dir", str(tmp_path)])
    assert "argument --seed: must be in [0, 2**64)" in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "nested too deeply"),
    ('{"text": "ok \\ud800 there"}\n', "lone surrogate"),
])
def test_hostile_data_lines_are_one_line_errors(tmp_path, capsys, content, expected):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a fine line"}\n' + content)
    line = _error(capsys, ["finetune", "--data", str(data), "--output-dir", str(tmp_path / "o"), *QUICK])
    assert f"{data}:2" in line and expected in line


def _craft(run, tmp_path, stem, edit):
    run = copy_run(run, tmp_path)
    path = run / "checkpoints" / "step-0000002" / f"{stem}.json"
    doc = json.loads(path.read_text())
    edit(doc["state"])
    path.write_text(json.dumps(doc))
    return run


@pytest.mark.parametrize("stem, edit, expected", [
    ("trainer_state", lambda s: s.pop("scheduler"), "has no 'scheduler'"),
    ("trainer_state", lambda s: s.update(step="2"), "'step' must be an integer >= 0, got '2'"),
    ("rank0", lambda s: s["rng"].update(python={"__tuple__": [3, "x"]}), "malformed state"),
    ("rank0", lambda s: s["rng"].update(numpy={"__tuple__": ["MT19937", 5]}), "malformed state"),
    ("rank0", lambda s: s["data"].update(pos=-1), "data cursor's 'pos' must be an integer >= 0, got -1"),
])
def test_crafted_checkpoint_state_is_a_one_line_error(run, tmp_path, capsys, stem, edit, expected):
    out = _craft(run, tmp_path, stem, edit)
    line = _error(capsys, ["finetune", "--output-dir", str(out), "--resume", *QUICK, "--max-steps", "3"])
    assert expected in line, line


def test_check_refuses_bfloat16_triton_on_cpu_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU runs bfloat16 Triton kernels")
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.cli", "check", "--backend", "triton", "--dtype",
                           "bfloat16"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert proc.returncode == 2 and "--backend triton --dtype bfloat16" in one_line_error(proc.stderr, "check")


def test_bench_refuses_what_cannot_run_here(capsys, monkeypatch):
    assert "needs about" in _error(capsys, ["bench", "--tokens", str(10**12)], "bench")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    assert "cuda" in _error(capsys, ["bench", "--tokens", "8", "--in-features", "8"], "bench").lower()
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    monkeypatch.setenv("LORA_KERNELS_GEMM", "bogus")
    assert "LORA_KERNELS_GEMM='bogus'" in _error(capsys, ["bench", "--tokens", "8"], "bench")


def test_a_deeply_nested_adapter_config_is_an_error_naming_the_file(tmp_path):
    model = lk.inject_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), lk.LoraConfig(r=2, target_modules=["0"]))
    lk.save_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="adapter_config.json: JSON nested too deeply"):
        lk.load_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path)


def test_meta_device_and_zero_width_inputs_are_value_errors(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    layer = lk.FusedLoraLinear(8, 8, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        layer(torch.randn(2, 8, device="meta"))
    with pytest.raises(ValueError, match="in_features and out_features must be >= 1"):
        lk.fused_lora_linear(torch.randn(2, 0), torch.randn(8, 0), None, torch.randn(4, 0), torch.randn(8, 4), 2.0)


# -- item 6: clear messages ----------------------------------------------------------------------------------------

def test_a_torn_last_metrics_line_does_not_block_resume(run, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert main(["finetune", "--output-dir", str(out), "--resume", *QUICK, "--max-steps", "3"]) == 0
    assert "ignoring a torn last line" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes('{"text": "hi"}\n'.encode("utf-16")), "the file is UTF-16"),
    (lambda p: p.mkdir(), "is a directory"),
])
def test_data_files_are_named_for_what_they_are(tmp_path, capsys, make, expected):
    data = tmp_path / "d.jsonl"
    make(data)
    assert expected in _error(capsys, ["finetune", "--data", str(data), "--output-dir", str(tmp_path / "o"), *QUICK])


def test_dev_null_as_data_says_what_it_is(tmp_path, capsys):
    line = _error(capsys, ["finetune", "--data", "/dev/null", "--output-dir", str(tmp_path / "o"), *QUICK])
    assert "is not a regular file" in line


def test_a_utf8_bom_is_accepted(tmp_path):
    from lora_kernels.data import read_records

    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b'{"text": "hi"}\n')
    assert [r.text for r in read_records(str(data))] == ["hi"]


def test_a_dangling_symlink_output_dir_says_so(tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    assert "symbolic link" in _error(capsys, ["finetune", "--output-dir", str(link), *QUICK])


def test_a_stray_step_folder_is_not_the_latest_checkpoint(run, tmp_path):
    from lora_kernels.training.checkpoint import latest_checkpoint

    out = copy_run(run, tmp_path)
    (out / "checkpoints" / "step-9").mkdir()
    assert latest_checkpoint(str(out)).endswith("step-0000002")


def test_meta_is_not_a_training_device(tmp_path, capsys):
    assert "meta is not a training device" in _error(capsys, ["finetune", "--device", "meta", "--output-dir",
                                                              str(tmp_path / "o"), *QUICK])


# -- item 7: no silent acceptance ----------------------------------------------------------------------------------

def test_a_diverged_run_stops_with_an_error_and_keeps_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "o"
    line = _error(capsys, ["finetune", "--output-dir", str(out), "--lora-alpha", "1e308", *QUICK,
                           "--max-steps", "4", "--save-every", "1", "--lr", "1"])
    assert "non-finite for 3 steps in a row" in line and "lower --lr or --lora-alpha" in line
    assert not (out / "adapter_config.json").exists()  # no NaN adapter written as the result


def test_warmup_at_or_beyond_max_steps_warns(tmp_path, capsys):
    assert main(["finetune", "--output-dir", str(tmp_path / "o"), *QUICK, "--warmup-steps", "5"]) == 0
    assert "warning: --warmup-steps 5 >= --max-steps 2" in capsys.readouterr().err


def test_a_target_modules_entry_that_matches_nothing_is_named(tmp_path, capsys):
    line = _error(capsys, ["finetune", "--output-dir", str(tmp_path / "o"), *QUICK, "--target-modules",
                           "q_proj,qproj"])
    assert "--target-modules entry 'qproj' matches no module" in line


def test_a_bogus_gemm_choice_is_refused_like_a_bogus_backend(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_GEMM", "bogus")
    assert "LORA_KERNELS_GEMM='bogus'" in _error(capsys, ["finetune", "--output-dir", str(tmp_path / "o"), *QUICK])


# -- item 8: README's claims -------------------------------------------------------------------------------------

def test_help_imports_no_torch_and_is_quick():
    code = "import sys, lora_kernels.cli as c; c.build_parser(); print('torch' in sys.modules)"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert proc.stdout.strip() == "False", proc.stderr
    assert time.perf_counter() - t0 < 3.0  # ~0.35 s measured; importing torch alone took ~2-4 s


def test_the_parsers_copies_of_library_values_agree():
    from lora_kernels.cli import common
    from lora_kernels.models.quantized import QUANT_TYPES
    from lora_kernels.training.loop import EVAL_MAX_BATCHES
    from lora_kernels.training.resources import SMALL_MODEL_WIDTH

    assert (common.QUANT_TYPES, common.EVAL_MAX_BATCHES, common.SMALL_MODEL_WIDTH) == \
        (QUANT_TYPES, EVAL_MAX_BATCHES, SMALL_MODEL_WIDTH)


def test_bench_on_cpu_says_it_times_the_plain_torch_backend(capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the fused layer runs the kernels")
    assert main(["bench", "--tokens", "16", "--in-features", "16", "--min-time", "0.01"]) == 0
    assert "plain-PyTorch backend" in capsys.readouterr().out
