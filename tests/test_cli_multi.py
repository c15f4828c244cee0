"""`lora-kernels finetune --adapter NAME=FILE ...`: several adapters in one run, each a PEFT folder; resume; merge;
bad input."""
import contextlib
import io
import json
import shutil

import pytest
import torch

import lora_kernels as lk
from helpers import one_line_error
from lora_kernels.cli import main

QUICK = ["--max-steps", "4", "--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--save-every", "2",
         "--no-progress"]


pytestmark = pytest.mark.usefixtures("cli_defaults")


def _write_data(directory):
    """Two small sets that differ: plain prose and question/answer pairs."""
    prose = directory / "prose.jsonl"
    qa = directory / "qa.jsonl"
    words = "the fused kernel reads each tile once and keeps only the input for the backward pass".split()
    prose.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) + "\n" for i in range(16)))
    qa.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}? ", "response": f"{2 * i}."}) + "\n"
                          for i in range(40)))
    return prose, qa


def _flags(prose, qa):
    return ["--adapter", f"prose={prose}", "--adapter", f"qa={qa}"]


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    prose, qa = _write_data(root)
    out = root / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_KERNELS_BACKEND", "torch")
    n = torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            rc = main(["finetune", "--output-dir", str(out), *_flags(prose, qa), *QUICK])
    finally:
        mp.undo()
        torch.set_num_threads(n)
    assert rc == 0
    return out, (prose, qa), stdout.getvalue()


def _records(run):
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_each_adapter_gets_a_peft_folder_and_its_own_losses(multi_run):
    run, _, stdout = multi_run
    for name in ("prose", "qa"):
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert (run / name / f).is_file() and (run / "checkpoints/step-0000004/adapter" / name / f).is_file()
        cfg = json.loads((run / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(run / "base_model")
    assert not (run / "adapter_config.json").exists()
    recs = _records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert r["loss"] == pytest.approx((r["loss/prose"] + r["loss/qa"]) / 2)
        assert r["grad_norm"] == pytest.approx((r["grad_norm/prose"] ** 2 + r["grad_norm/qa"] ** 2) ** 0.5)
    for r in (recs[1], recs[3]):
        assert r["eval_loss"] == pytest.approx((r["eval_loss/prose"] + r["eval_loss/qa"]) / 2)
    assert "data: adapter prose:" in stdout and "data: adapter qa:" in stdout
    assert "prose: loss" in stdout and f"-> {run / 'qa'}/" in stdout


def test_peft_loads_each_folder_with_our_logits_and_the_adapters_differ(multi_run):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    run, _, _ = multi_run
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = AutoModelForCausalLM.from_pretrained(str(run / "base_model")).eval()
    lk.load_adapter(ours, str(run / "prose"), adapter_name="prose")
    lk.load_adapter(ours, str(run / "qa"), adapter_name="qa")
    with torch.no_grad(), lk.batch_adapters(ours, ["prose", "qa"]):
        mixed = ours(ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(run / "base_model")).eval()(ids).logits
    fresh = AutoModelForCausalLM.from_pretrained(str(run / "base_model"))
    model = peft.PeftModel.from_pretrained(fresh, str(run / "prose"), adapter_name="prose").eval()
    model.load_adapter(str(run / "qa"), adapter_name="qa")
    with torch.no_grad():
        for row, name in enumerate(("prose", "qa")):
            model.set_adapter(name)
            torch.testing.assert_close(mixed[row], model(ids[row:row + 1]).logits[0], rtol=1e-4, atol=1e-5)
        model.set_adapter("prose")
        prose_on_row1 = model(ids[1:]).logits[0]
    assert (prose_on_row1 - mixed[1]).abs().max() > 1e-3  # the two adapters learned different things
    assert (mixed - base).abs().max() > 1e-3


def test_resume_is_exact(multi_run, tmp_path):
    """Resumed at step 2 (every adapter's tensors, optimizer state, data cursor, RNG): the same adapters, byte for
    byte, and the same per-adapter losses as the uninterrupted run."""
    run, (prose, qa), _ = multi_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000004")
    for name in ("prose", "qa"):
        shutil.rmtree(resumed / name)
    assert main(["finetune", "--output-dir", str(resumed), *_flags(prose, qa), "--resume", *QUICK]) == 0
    for name in ("prose", "qa"):
        assert ((resumed / name / "adapter_model.safetensors").read_bytes()
                == (run / name / "adapter_model.safetensors").read_bytes()), name
    keys = ("loss/prose", "loss/qa", "grad_norm/prose", "grad_norm/qa", "eval_loss/prose", "eval_loss/qa")
    assert [[r.get(k) for k in keys] for r in _records(resumed)] == [[r.get(k) for k in keys] for r in _records(run)]


def test_resume_with_other_adapters_is_refused(multi_run, tmp_path, capsys):
    run, (prose, qa), _ = multi_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    rc = main(["finetune", "--output-dir", str(resumed), "--adapter", f"prose={prose}", "--adapter", f"other={qa}",
               "--resume", *QUICK])
    err = one_line_error(capsys.readouterr().err)  # the run's recorded settings name both adapter sets
    assert rc == 2 and "other settings: --adapter" in err and '"qa"' in err and '"other"' in err, err
    # Resuming it as a single-adapter run is refused the same way.
    rc = main(["finetune", "--output-dir", str(resumed), "--data", str(prose), "--resume", *QUICK])
    err = one_line_error(capsys.readouterr().err)
    assert rc == 2 and "--data unset (the run)" in err and "--adapter" in err, err


def test_merge_takes_one_adapter_folder_of_the_run(multi_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run, _, _ = multi_run
    rc = main(["merge", "--model", str(run / "base_model"), "--adapter", str(run), "--output-dir", str(tmp_path / "m")])
    line = one_line_error(capsys.readouterr().err, "merge")
    assert rc == 2 and "holds several adapters (prose, qa)" in line and f"--adapter {run / 'prose'}" in line
    assert main(["merge", "--model", str(run / "base_model"), "--adapter", str(run / "qa"),
                 "--output-dir", str(tmp_path / "m")]) == 0
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    ours = AutoModelForCausalLM.from_pretrained(str(run / "base_model")).eval()
    lk.load_adapter(ours, str(run / "qa"))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))(ids).logits,
                                   ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_bad_adapter_flags_are_one_line_errors(tmp_path, capsys):
    prose, qa = _write_data(tmp_path)
    used = tmp_path / "used"
    (used / "qa").mkdir(parents=True)
    (used / "qa" / "adapter_config.json").write_text("{}")
    (used / "qa" / "notes.txt").write_text("the user's")
    cases = [
        (["--adapter", str(prose)], "expected NAME=FILE"),
        (["--adapter", f"={prose}"], "the adapter name before '=' is empty"),
        (["--adapter", f"a/b={prose}"], "only letters, digits, '_' and '-'"),
        (["--adapter", f"..={prose}"], "only letters, digits, '_' and '-'"),
        (["--adapter", f"checkpoints={prose}"], "'checkpoints' is reserved"),
        (["--adapter", f"base_model={prose}"], "'base_model' is reserved"),
        (["--adapter", f"a={prose}", "--adapter", f"a={qa}"], "the name 'a' is already given"),
        (["--adapter", f"a={prose}", "--adapter", f"A={qa}"], "the name 'A' is already given ('a')"),
        (["--adapter", "a="], "no data file after '='"),
        (["--adapter", f"a={tmp_path / 'missing.jsonl'}"], "no such file"),
        (["--adapter", f"a={prose}", "--data", str(qa)], "--adapter and --data both give training data"),
        (["--adapter", f"a={prose}", "--eval-data", str(qa)], "--eval-data is for a --data run"),
        (["--adapter", f"a={prose}", "--quantize", "nf4"], "--adapter with --quantize is not supported"),
    ]
    for flags, expected in cases:
        rc = main(["finetune", "--output-dir", str(tmp_path / "o"), *QUICK, *flags])
        line = one_line_error(capsys.readouterr().err)
        assert rc == 2 and expected in line, (flags, line)
    # A folder holding an adapter but no run manifest is not a run of ours: refused, --overwrite or not.
    for extra in ([], ["--overwrite"]):
        rc = main(["finetune", "--output-dir", str(used), *QUICK, *_flags(prose, qa), *extra])
        line = one_line_error(capsys.readouterr().err)
        assert rc == 2 and "holds qa/adapter_config.json but no lora_kernels_run.json" in line, line
        assert sorted(p.name for p in used.rglob("*")) == ["adapter_config.json", "notes.txt", "qa"]
    # The same folder as a run of ours (its manifest lists the adapter): a previous run, refused without --overwrite.
    from lora_kernels.training.manifest import write_manifest
    from lora_kernels.training.rundir import adapter_folder_outputs
    write_manifest(str(used), adapter_folder_outputs("qa"))
    rc = main(["finetune", "--output-dir", str(used), *QUICK, *_flags(prose, qa)])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 2 and "previous run (qa/adapter_config.json)" in line and "--overwrite" in line
    # --overwrite replaces the run's own files in OUTPUT_DIR/NAME/ and nothing else there.
    assert main(["finetune", "--output-dir", str(used), *QUICK, "--max-steps", "1", "--overwrite",
                 *_flags(prose, qa)]) == 0
    assert (used / "qa" / "notes.txt").read_text() == "the user's"
    assert json.loads((used / "qa" / "adapter_config.json").read_text())["peft_type"] == "LORA"
