"""Checkpoints hold no pickle: reading one cannot run code, old pickle checkpoints are refused, and a write
that dies half-way leaves the previous checkpoint to resume from, bit-exactly."""
import os
import pickle
import random
import re
import shutil

import numpy as np
import pytest
import torch

import lora_kernels as lk
from lora_kernels.data import DEMO_PATH, load_packed
from lora_kernels.models import build_tiny_model
from lora_kernels.training import TrainConfig, Trainer, trainable_state_dict
from lora_kernels.training import checkpoint as checkpoint_module
from lora_kernels.training.checkpoint import latest_checkpoint
from lora_kernels.training.safe_state import read_state, write_state

SEQ = 32
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lora_kernels")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


class _PlantsAFile:
    """Unpickling this object calls open(marker, "w"): the file appearing means the pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_pickle(marker) -> bytes:
    return pickle.dumps({"world_size": 1, "payload": _PlantsAFile(str(marker))})


def _trainer(out, **kw):
    torch.manual_seed(0)
    model, tok = build_tiny_model(SEQ, seed=0)
    lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear"))
    cfg = dict(output_dir=str(out), max_steps=2, batch_size=3, lr=2e-3, warmup_steps=1, eval_every=0,
               progress=False, plot=False)
    cfg.update(kw)
    return Trainer(model, load_packed(DEMO_PATH, tok, SEQ), TrainConfig(**cfg))


def test_malicious_payload_is_live(tmp_path):
    """The bait is real: plain unpickling of it does create the file (so its absence below means something)."""
    probe = tmp_path / "probe"
    pickle.loads(_malicious_pickle(probe))
    assert probe.exists()


def test_old_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    ckpt.mkdir(parents=True)
    for name in ("trainer_state.pt", "trainable.pt", "rank0.pt"):  # the layout older versions wrote
        torch.save({"world_size": 1, "payload": _PlantsAFile(str(marker))}, ckpt / name)
    for resume_from in ("latest", str(ckpt)):
        with pytest.raises(ValueError) as err:
            _trainer(tmp_path / "run").train(resume_from=resume_from)
        message = str(err.value)
        assert str(ckpt / "trainer_state.pt") in message and "arbitrary code" in message, message
        assert not marker.exists(), "loading the checkpoint ran code from it"


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_KERNELS_BACKEND", "torch")
        _trainer(out, max_steps=1).train()
    return latest_checkpoint(str(out))


def test_checkpoint_is_only_json_and_safetensors(real_checkpoint):
    files = sorted(f for f in os.listdir(real_checkpoint) if os.path.isfile(os.path.join(real_checkpoint, f)))
    assert files == ["rank0.json", "rank0.safetensors", "trainable.safetensors", "trainer_state.json",
                     "trainer_state.safetensors"]


@pytest.mark.parametrize("name", ["trainer_state.json", "trainer_state.safetensors", "trainable.safetensors",
                                  "rank0.json", "rank0.safetensors"])
def test_pickle_in_place_of_a_checkpoint_file_is_an_error_naming_it(tmp_path, real_checkpoint, name):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / os.path.basename(real_checkpoint)
    shutil.copytree(real_checkpoint, ckpt)
    (ckpt / name).write_bytes(_malicious_pickle(marker))
    with pytest.raises(ValueError, match=re.escape(str(ckpt / name))):
        _trainer(tmp_path / "run").train(resume_from="latest")
    assert not marker.exists()


def test_state_round_trip_is_exact(tmp_path):
    """What resuming depends on comes back with its types: tuples (random.setstate), int keys (optimizer
    state), numpy's uint32 key, 0-dim and bf16 tensors, NaN/inf floats."""
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    tree = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3).to(torch.bfloat16)}},
                          "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3, "foreach": None}]},
            "floats": [float("nan"), float("inf"), 0.1], "cursor": {"epoch": 1, "pos": 6},
            "tricky": {"__tuple__": "a user key that looks like a tag"}}
    write_state(str(tmp_path / "s"), tree)
    back = read_state(str(tmp_path / "s"))
    assert back["python"] == tree["python"] and isinstance(back["python"][1], tuple)
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32
    assert np.array_equal(back["numpy"][1], tree["numpy"][1]) and back["numpy"][2:] == tree["numpy"][2:]
    assert torch.equal(back["torch"], tree["torch"])
    st = back["optimizer"]["state"][0]
    assert st["step"].shape == () and st["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(st["exp_avg"], tree["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"] == tree["optimizer"]["param_groups"]
    assert np.isnan(back["floats"][0]) and back["floats"][1:] == [float("inf"), 0.1]
    assert back["cursor"] == tree["cursor"] and back["tricky"] == tree["tricky"]
    # The restored states continue the same streams.
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    torch.set_rng_state(back["torch"])
    after = (random.random(), np.random.rand(), torch.rand(1))
    random.setstate(tree["python"])
    np.random.set_state(tree["numpy"])
    torch.set_rng_state(tree["torch"])
    assert after == (random.random(), np.random.rand(), torch.rand(1))


def test_package_never_unpickles():
    """No torch.load / pickle anywhere in lora_kernels/: the only loaders are JSON and safetensors."""
    offenders = []
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                with open(path, encoding="utf-8") as fh:
                    for n, line in enumerate(fh, 1):
                        if re.search(r"torch\.load\(|\bpickle\b|weights_only=False", line):
                            offenders.append(f"{os.path.relpath(path, PACKAGE)}:{n}: {line.strip()}")
    assert not offenders, offenders


class _Killed(BaseException):
    """Stands in for SIGKILL mid-write: not an Exception, so nothing on the way up handles it."""


def test_write_killed_midway_resumes_from_previous_checkpoint_exactly(tmp_path, monkeypatch):
    full = _trainer(tmp_path / "full", max_steps=4, save_every=2)
    full.train()
    expected = trainable_state_dict(full.model)

    real_write_state, calls = checkpoint_module.write_state, []

    def dies_in_the_step_4_rank_file(stem, tree):
        calls.append(stem)
        if "step-0000004" in stem and os.path.basename(stem).startswith("rank"):
            raise _Killed()  # trainer_state of step 4 is on disk, rank0 is not
        real_write_state(stem, tree)

    monkeypatch.setattr(checkpoint_module, "write_state", dies_in_the_step_4_rank_file)
    with pytest.raises(_Killed):
        _trainer(tmp_path / "killed", max_steps=4, save_every=2).train()
    monkeypatch.setattr(checkpoint_module, "write_state", real_write_state)
    assert any("step-0000004" in c for c in calls)
    assert latest_checkpoint(str(tmp_path / "killed")).endswith("step-0000002")

    torch.manual_seed(999)  # a new process's RNG: the checkpoint must restore it
    resumed = _trainer(tmp_path / "killed", max_steps=4, save_every=2)
    assert resumed.train(resume_from="latest").step == 4
    got = trainable_state_dict(resumed.model)
    for n in expected:
        assert torch.equal(got[n], expected[n]), n
