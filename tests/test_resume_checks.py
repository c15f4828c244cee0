"""Issue 22, items 3 and 8: --resume compares the run's recorded settings (each differing flag with both values),
notices what may change, and says a finished run is finished before loading anything."""
import json

import pytest

from helpers import copy_run, finished_run, one_line_error
from lora_kernels.cli import main
from lora_kernels.training.manifest import MANIFEST

QUICK = ["--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--eval-fraction", "0",
         "--save-every", "1", "--no-progress"]

pytestmark = pytest.mark.usefixtures("cli_defaults")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(tmp_path_factory, "resume", QUICK)


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "0.001"], ["--lr 0.002 (the run) vs 0.001 (now)"]),
    (["--lora-alpha", "32"], ["--lora-alpha 16.0 (the run) vs 32.0 (now)"]),
    (["--seed", "7", "--r", "4"], ["--r 8 (the run) vs 4 (now)", "--seed 0 (the run) vs 7 (now)"]),
    (["--batch-size", "4", "--seq-len", "24"], ["--seq-len 16 (the run) vs 24 (now)",
                                                "--batch-size 2 (the run) vs 4 (now)"]),
    (["--target-modules", "q_proj,v_proj"], ['--target-modules "all-linear" (the run) vs ["q_proj", "v_proj"]']),
])
def test_a_resume_with_other_settings_lists_every_difference(run, tmp_path, capsys, flags, expected):
    run = copy_run(run, tmp_path)
    rc = main(["finetune", "--output-dir", str(run), "--resume", *QUICK, "--max-steps", "3", *flags])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 2 and "was started with other settings" in line
    for text in expected:
        assert text in line, (text, line)


def test_a_quantized_run_is_not_resumed_dense(run, tmp_path, capsys):
    run = copy_run(run, tmp_path)
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["settings"]["--quantize"] = "nf4"  # as a --quantize nf4 run records it
    (run / MANIFEST).write_text(json.dumps(manifest))
    rc = main(["finetune", "--output-dir", str(run), "--resume", *QUICK, "--max-steps", "3"])
    assert rc == 2 and '--quantize "nf4" (the run) vs unset (now)' in one_line_error(capsys.readouterr().err)


def test_changeable_flags_are_a_notice_and_recorded(run, tmp_path, capsys):
    run = copy_run(run, tmp_path)
    assert main(["finetune", "--output-dir", str(run), "--resume", *QUICK, "--max-steps", "3",
                 "--eval-every", "5"]) == 0
    out = capsys.readouterr().out
    assert "notice: resuming with --max-steps 2 (the run) vs 3 (now)" in out
    assert "notice: resuming with --eval-every 0 (the run) vs 5 (now)" in out
    settings = json.loads((run / MANIFEST).read_text())["settings"]
    assert settings["--max-steps"] == 3 and settings["--eval-every"] == 5


def test_a_finished_run_says_so_before_loading_anything(run, tmp_path, capsys, monkeypatch):
    import lora_kernels.cli.finetune as finetune

    run = copy_run(run, tmp_path)

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(finetune, "_base_model", no_loading)
    assert main(["finetune", "--output-dir", str(run), "--resume", *QUICK]) == 0
    assert "is finished" in capsys.readouterr().out
