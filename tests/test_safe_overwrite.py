"""Issue 22, item 1: a run deletes and overwrites only what it made (its manifest), merge never writes over its
input, adapter names never leave their folder, and a failed start leaves nothing a retry trips over."""
import json
import os
import shutil

import pytest
import torch

import lora_kernels as lk
from helpers import copy_run, finished_run, one_line_error
from lora_kernels.cli import main
from lora_kernels.training.manifest import MANIFEST

QUICK = ["--max-steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--eval-fraction", "0",
         "--no-progress"]

pytestmark = pytest.mark.usefixtures("cli_defaults")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(tmp_path_factory, "safe", QUICK)


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_overwrite_deletes_only_what_the_run_wrote(run, tmp_path, capsys):
    run = copy_run(run, tmp_path)
    mine = {"checkpoints/other/model.pt": b"user", "base_model/README.md": b"notes", "notes.txt": b"mine"}
    for rel, data in mine.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    assert main(["finetune", "--output-dir", str(run), "--overwrite", *QUICK]) == 0
    for rel, data in mine.items():  # the old --overwrite removed checkpoints/ and base_model/ whole
        assert (run / rel).read_bytes() == data, rel
    assert sorted(os.listdir(run / "checkpoints")) == ["other", "step-0000001"]
    assert (run / "base_model" / "config.json").is_file() and (run / "adapter_config.json").is_file()


def test_a_folder_that_is_not_a_run_of_ours_is_refused_even_with_overwrite(tmp_path, capsys):
    folder = tmp_path / "theirs"
    (folder / "checkpoints" / "step-0000005").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _files(folder)
    rc = main(["finetune", "--output-dir", str(folder), "--overwrite", *QUICK])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 2 and f"no {MANIFEST}" in line and "not a lora_kernels run" in line
    assert _files(folder) == before and (folder / "checkpoints" / "step-0000005").is_dir()


def test_the_trainer_api_refuses_a_foreign_folder_too(tmp_path):
    from lora_kernels.data import PackedDataset
    from lora_kernels.training import TrainConfig, Trainer

    (tmp_path / "metrics.jsonl").write_text("theirs\n")
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    lk.inject_lora(model, lk.LoraConfig(r=2, target_modules=["1"]))
    ds = PackedDataset(torch.randint(0, 16, (4, 6)), torch.randint(0, 16, (4, 6)))
    with pytest.raises(ValueError, match="not a lora_kernels run"):
        Trainer(model, ds, TrainConfig(output_dir=str(tmp_path), max_steps=1, overwrite=True, progress=False,
                                       plot=False)).train()
    assert (tmp_path / "metrics.jsonl").read_text() == "theirs\n"


@pytest.mark.parametrize("flags, expected", [
    (["--weight-decay", "-1"], "weight_decay must be a finite number >= 0"),
    (["--max-grad-norm", "nan"], "max_grad_norm must be a finite number >= 0"),
    (["--target-modules", "no_such_proj"], "matched no module"),
    (["--resume"], "no checkpoint under"),
])
def test_a_failed_start_writes_nothing_and_the_retry_runs(tmp_path, capsys, flags, expected, monkeypatch):
    out = tmp_path / "o"
    rc = main(["finetune", "--output-dir", str(out), *QUICK, *flags])
    assert rc == 2 and expected in one_line_error(capsys.readouterr().err)
    assert not out.exists() or os.listdir(out) == []  # no base_model/ left to be taken for "a previous run"
    assert main(["finetune", "--output-dir", str(out), *QUICK]) == 0


def test_a_bad_backend_name_fails_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    out = tmp_path / "o"
    assert main(["finetune", "--output-dir", str(out), *QUICK]) == 2
    assert "LORA_KERNELS_BACKEND='bogus'" in one_line_error(capsys.readouterr().err)
    assert not out.exists() or os.listdir(out) == []


def test_a_data_error_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"nope": 1}\n')
    out = tmp_path / "o"
    assert main(["finetune", "--output-dir", str(out), "--data", str(bad), *QUICK]) == 2
    assert f"{bad}:2" in one_line_error(capsys.readouterr().err)
    assert not out.exists() or os.listdir(out) == []


def test_an_unfinished_start_is_reused(run, tmp_path, capsys):
    """What a start that died before its first checkpoint left (its manifest, the base) is replaced on retry."""
    out = tmp_path / "o"
    shutil.copytree(run / "base_model", out / "base_model")
    shutil.copy(run / MANIFEST, out / MANIFEST)
    (out / "mine.txt").write_text("kept")
    assert main(["finetune", "--output-dir", str(out), *QUICK]) == 0
    assert "reusing --output-dir" in capsys.readouterr().out
    assert (out / "mine.txt").read_text() == "kept" and (out / "checkpoints" / "step-0000001").is_dir()


# -- merge -------------------------------------------------------------------------------------------------------

def test_merge_never_writes_over_its_input_or_into_a_run(run, tmp_path, capsys):
    run = copy_run(run, tmp_path)
    base = run / "base_model"
    before = _files(run)
    for out, expected in [(base, "is --model"), (base / "sub", "is inside --model"),
                          (run, "holds an adapter or a finetune run")]:
        rc = main(["merge", "--model", str(base), "--adapter", str(run), "--output-dir", str(out)])
        line = one_line_error(capsys.readouterr().err, "merge")
        assert rc == 2 and expected in line, line
    assert _files(run) == before
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(run), "--output-dir", str(merged)]) == 0
    capsys.readouterr()
    rc = main(["merge", "--model", str(base), "--adapter", str(run), "--output-dir", str(merged)])
    assert rc == 2 and "already holds a model" in one_line_error(capsys.readouterr().err, "merge")
    assert main(["merge", "--model", str(base), "--adapter", str(run), "--output-dir", str(merged),
                 "--overwrite"]) == 0


# -- adapter names in the library ---------------------------------------------------------------------------------

def _tiny():
    return torch.nn.Sequential(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("name", ["/abs/dir", "a/b", "..", "a.b", "with space", "", "__base__"])
def test_adapter_names_are_checked_in_the_library(name):
    with pytest.raises(ValueError, match="adapter_name"):
        lk.inject_lora(_tiny(), lk.LoraConfig(r=2, target_modules=["0"]), adapter_name=name)


def test_saving_never_writes_outside_the_target_folder(tmp_path, monkeypatch):
    from lora_kernels.persistence import adapter_folder

    with pytest.raises(ValueError, match="adapter_name"):
        adapter_folder(str(tmp_path), "../escape")
    model = lk.inject_lora(_tiny(), lk.LoraConfig(r=2, target_modules=["0"]))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="path is empty"):
        lk.save_adapter(model, "")
    assert os.listdir(tmp_path) == ["work"] and os.listdir(work) == []


def test_the_cli_and_the_library_share_one_rule():
    from lora_kernels.cli import multi
    from lora_kernels.names import adapter_name_problem

    assert multi.adapter_name_problem is adapter_name_problem


def test_the_manifest_cannot_name_paths_outside_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000001").mkdir(parents=True)
    (run / "checkpoints" / "step-0000001" / "trainer_state.json").write_text("{}")
    (tmp_path / "victim.txt").write_text("safe")
    (run / MANIFEST).write_text(json.dumps({"format": "lora_kernels.run", "outputs": ["../victim.txt"]}))
    assert main(["finetune", "--output-dir", str(run), "--overwrite", *QUICK]) == 2
    assert "not a lora_kernels run manifest" in one_line_error(capsys.readouterr().err)
    assert (tmp_path / "victim.txt").read_text() == "safe"
