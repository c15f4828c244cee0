"""Trustworthy runs, below the CLI: adapter saves that survive a crash at any step, a used output directory
refused or cleared on request, bounded evaluation, Ctrl-C at a step boundary, a finished run left alone, the
CPU thread choice, device and sequence-length checks."""
import json
import os
import shutil
import signal
import stat
import types

import pytest
import torch

import lora_kernels as lk
from lora_kernels import persistence
from lora_kernels.data import DEMO_PATH, load_packed, split_eval
from lora_kernels.models import build_tiny_model, check_seq_len
from lora_kernels.training import TrainConfig, Trainer, TrainingInterrupted
from lora_kernels.training.resources import SMALL_MODEL_WIDTH, choose_threads, model_width, resolve_device
from tiny_models import tiny_llama

SEQ = 32


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


# -- save_adapter: a crash at every step ---------------------------------------------------------------

class Crash(BaseException):
    """A simulated power cut: BaseException, so no `except Exception` handler hides it."""


def _adapter(r, seed):
    torch.manual_seed(seed)
    return lk.inject_lora(tiny_llama(), lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))


def _tensors(model):
    return {k: v.detach().clone() for k, v in persistence.adapter_state_dict(model).items()}


def _loads_as(path, candidates):
    """Which of `candidates` ({name: tensors}) the adapter directory `path` loads as; None where a file is
    missing (load_adapter then says so); AssertionError / ValueError for anything else."""
    if not all(os.path.isfile(os.path.join(path, f)) for f in (persistence.CONFIG_NAME, persistence.WEIGHTS_NAME)):
        return None
    got = _tensors(lk.load_adapter(tiny_llama(), path))  # raises on a config / weights mix (shapes differ)
    for name, want in candidates.items():
        if got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want):
            return name
    raise AssertionError(f"{path} loads as neither of {sorted(candidates)}")


def _crash_at(monkeypatch, k):
    """Make the k-th filesystem step of save_adapter (mkdir, link, unlink, rename, replace, rmtree, copy, the
    weights write) raise Crash; after it, every step raises too, as on a dead machine (so no cleanup runs)."""
    count = {"n": 0}

    def step(fn):
        def wrapped(*a, **kw):
            count["n"] += 1
            if count["n"] >= k:
                raise Crash(f"step {count['n']}")
            return fn(*a, **kw)
        return wrapped

    fake_os = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if not n.startswith("__")})
    for name in ("mkdir", "link", "unlink", "remove", "rename", "replace"):
        setattr(fake_os, name, step(getattr(os, name)))
    fake_shutil = types.SimpleNamespace(rmtree=step(shutil.rmtree), copy2=step(shutil.copy2))
    monkeypatch.setattr(persistence.write, "os", fake_os)  # save_adapter lives in persistence/write.py
    monkeypatch.setattr(persistence.write, "shutil", fake_shutil)
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", step(safetensors.torch.save_file))
    return count


@pytest.mark.parametrize("existing", [True, False], ids=["replace-existing", "new-directory"])
def test_a_crash_at_any_step_of_a_save_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, existing):
    old_model, new_model = _adapter(8, seed=1), _adapter(4, seed=2)  # r=8 then r=4: a mix cannot load
    old, new = _tensors(old_model), _tensors(new_model)
    template = tmp_path / "template"
    template.mkdir()
    if existing:  # a run's output directory: the adapter at the top, other outputs beside it
        lk.save_adapter(old_model, template)
        (template / "checkpoints").mkdir()
        (template / "checkpoints" / "keep.txt").write_text("not the adapter's")
    k, completed = 0, False
    while not completed:
        k += 1
        path = tmp_path / f"crash-{k}" / "run"
        shutil.copytree(template, path) if existing else path.parent.mkdir()
        with monkeypatch.context() as mp:
            _crash_at(mp, k)
            try:
                lk.save_adapter(new_model, path)
                completed = True
            except Crash:
                pass
        places = {"at path": str(path), "old kept aside": str(path / persistence.PREVIOUS),
                  "new staged": str(path / persistence.STAGING)}
        found = {where: _loads_as(p, {"old": old, "new": new}) for where, p in places.items() if os.path.isdir(p)}
        if completed:
            assert found["at path"] == "new"
            assert sorted(os.listdir(path)) == (["adapter_config.json", "adapter_model.safetensors"]
                                                 + (["checkpoints"] if existing else []))
        elif existing:
            assert found["at path"] in ("old", "new", None), k  # never a mix: that raises in _loads_as
            assert {"old", "new"} & set(found.values()), (k, found)  # a complete adapter survives
            assert (path / "checkpoints" / "keep.txt").read_text() == "not the adapter's"
            lk.save_adapter(new_model, path)  # the next save succeeds and clears what the crash left
            assert _loads_as(str(path), {"new": new}) == "new"
            assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors", "checkpoints"]
        else:
            assert not path.exists() or found["at path"] == "new", k  # a new folder appears complete or not at all
    assert k >= (8 if existing else 4)  # the steps were really walked through


def test_adapter_folders_get_the_umasks_mode(tmp_path):
    old = os.umask(0o027)
    try:
        lk.save_adapter(_adapter(2, seed=0), tmp_path / "a")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o750  # not mkdtemp's 0700


# -- the trainer ------------------------------------------------------------------------------------------

def _setup(tmp_path, **kw):
    model, tok = build_tiny_model(SEQ, seed=0)
    lk.inject_lora(model, lk.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules="all-linear"))
    train, ev = split_eval(load_packed(DEMO_PATH, tok, SEQ), 0.1)
    base = dict(output_dir=str(tmp_path), max_steps=4, batch_size=2, eval_every=0, progress=False, plot=False)
    base.update(kw)
    return Trainer(model, train, TrainConfig(**base), eval_data=ev,
                   save_adapter=lambda m, d: lk.save_adapter(m, d))


def _files(directory):
    return {os.path.relpath(os.path.join(r, f), directory): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(directory) for f in fs}


def test_a_new_run_in_a_used_directory_is_refused_unless_overwrite(tmp_path):
    _setup(tmp_path, max_steps=2).train()
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"previous run.*--resume.*--overwrite"):
        _setup(tmp_path, max_steps=2).train()
    assert _files(tmp_path) == before  # nothing touched
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoints" / "step-0000999").mkdir()
    _setup(tmp_path, max_steps=1, overwrite=True).train()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-0000001"]  # the old run's are gone
    assert (tmp_path / "notes.txt").read_text() == "mine"  # what is not a run output stays


def test_eval_is_capped_reports_its_rows_and_progress(tmp_path):
    trainer = _setup(tmp_path, eval_batches=3)
    assert len(trainer.eval_data) > 6
    seen = []
    result = trainer.evaluate(progress=lambda done, total: seen.append((done, total)))
    assert result["eval_rows"] == 6 and seen == [(1, 3), (2, 3), (3, 3)]
    trainer.cfg.eval_batches = 0
    assert trainer.evaluate()["eval_rows"] == len(trainer.eval_data)
    assert TrainConfig(output_dir=str(tmp_path)).eval_batches > 0  # capped by default


def test_metrics_record_the_rows_each_eval_covered(tmp_path):
    _setup(tmp_path, max_steps=2, eval_every=1, eval_batches=2).train()
    with open(tmp_path / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert [r["eval_rows"] for r in recs] == [4, 4]  # the final eval too, under the same cap


def _sigint_on_step(trainer, step, times=1):
    orig = trainer._train_step

    def step_fn():
        if trainer.step + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return orig()

    trainer._train_step = step_fn


def test_ctrl_c_stops_at_the_step_boundary_with_a_checkpoint(tmp_path):
    trainer = _setup(tmp_path, max_steps=6)
    _sigint_on_step(trainer, 3)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.train()
    assert info.value.step == 3 and info.value.checkpoint.endswith("step-0000003")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed = _setup(tmp_path, max_steps=6)
    assert resumed.train(resume_from="latest").step == 6


def test_a_second_ctrl_c_aborts_without_a_checkpoint(tmp_path):
    trainer = _setup(tmp_path, max_steps=6, save_every=2)
    _sigint_on_step(trainer, 3, times=2)
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.train()
    assert not isinstance(info.value, TrainingInterrupted)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-0000002"]  # nothing half-done recorded


def test_resuming_a_finished_run_trains_and_writes_nothing(tmp_path):
    _setup(tmp_path, max_steps=2).train()
    before = _files(tmp_path)
    result = _setup(tmp_path, max_steps=2).train(resume_from="latest")
    assert result.already_finished and result.step == 2
    assert result.loss == result.history[-1]["loss"]  # the run's last loss, not NaN
    assert _files(tmp_path) == before


# -- threads, devices, sequence length ----------------------------------------------------------------------

def test_thread_choice():
    assert choose_threads(128, env={}) == 1  # the tiny default: one thread (docs/finetune.md, "CPU threads")
    assert choose_threads(SMALL_MODEL_WIDTH - 1, env={}) == 1
    assert choose_threads(896, env={}) == 1  # a 0.5B-class width: measured no faster on 2 threads
    assert choose_threads(SMALL_MODEL_WIDTH, env={}) is None  # wider: torch's default, one per core
    assert choose_threads(128, env={"OMP_NUM_THREADS": "2"}) is None  # the user's setting stands
    assert choose_threads(128, requested=2, env={"OMP_NUM_THREADS": "1"}) == 2  # --threads wins
    assert model_width(build_tiny_model(SEQ)[0]) == 128


@pytest.mark.parametrize("spec, message", [
    ("foo", "not a device name torch knows"),
    pytest.param("cuda", "not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_unusable_devices_are_value_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(spec)
    assert resolve_device("cpu") == torch.device("cpu")


def test_seq_len_beyond_the_models_positions():
    tiny, _ = build_tiny_model(100_000)
    assert "above the model's 2048 positions" in check_seq_len(tiny, 100_000)
    assert check_seq_len(tiny, 2048) is None
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16,
                                                                n_layer=1, n_head=2))
    assert check_seq_len(gpt2, 32) is None
    with pytest.raises(ValueError, match="exceeds the model's 32 learned positions"):
        check_seq_len(gpt2, 33)
