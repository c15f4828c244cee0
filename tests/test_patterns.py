"""Issue 22, item 4: target_modules / exclude_modules regexes and rank_pattern / alpha_pattern keys are matched in
linear time (lora_kernels/patterns.py), as Python's re would match them; what cannot be is refused, naming the key."""
import json
import random
import re
import time

import pytest
import torch

import lora_kernels as lk
from lora_kernels import patterns

HOSTILE = "(.|.)*Z"  # backtracking re: time doubles per character of a name that does not end in Z

SAFE = [r".*q_proj", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r"(?i)MODEL.*", r"a{2,4}b?", r"(ab|a)*c$",
        r"^x\b.*", r"[^.]+\.[a-z_]+", r"(a|b)*?c+", r"\w+\s?\d{0,2}", r"(.*\.)?(q_proj)$", r"(^|.*\.)lm_head($|\..*)",
        r"x*", r"", r"a|", r"[\d.]+\Z", r"(a|ab)(c|bcd)(d*)", r"\Bq.*", r"[a-c]{1,3}?x|q"]


@pytest.mark.parametrize("pattern", SAFE)
def test_matches_as_pythons_re_does(pattern):
    rx = re.compile(pattern)
    rng = random.Random(0)
    names = ["model.layers.1.self_attn.q_proj", "lm_head", "x.q_proj", "aab", "abababc", "aaaac\n", "MODEL.x", ""]
    names += ["".join(rng.choice("abcqxZ_.\n 0123lmpvroj") for _ in range(rng.randint(0, 12))) for _ in range(400)]
    for name in names:
        assert patterns.fullmatch(pattern, name) == (rx.fullmatch(name) is not None), (pattern, name)
        assert patterns.match(pattern, name) == (rx.match(name) is not None), (pattern, name)


def test_the_hostile_pattern_is_answered_at_once():
    name = "model.layers.10.self_attn.q_proj" * 8  # Python's re would take longer than the universe's age
    t0 = time.perf_counter()
    assert not patterns.fullmatch(HOSTILE, name) and not patterns.match(rf"(.*\.)?({HOSTILE})$", name)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("pattern, reason", [
    (r"(a)\1", "backreferences"), (r"(?=a)a", "lookaround"), (r"(?>a)", "atomic groups"),
    (r"a++", "possessive repeats"), (r"(a{100}){100}", "more than"), ("a" * 3000, "longer than"),
])
def test_what_a_linear_engine_cannot_do_is_refused_with_the_reason(pattern, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        patterns.check_pattern(pattern, "target_modules")


def _model():
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])


def _adapter(tmp_path, **config):
    model = lk.inject_lora(_model(), lk.LoraConfig(r=2, target_modules=["0"]))
    lk.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(config)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_a_hostile_target_modules_in_adapter_config_is_an_error_in_under_a_second(tmp_path):
    path = _adapter(tmp_path, target_modules=HOSTILE)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="matched no module"):
        lk.load_adapter(_model(), path)
    assert time.perf_counter() - t0 < 1.0


def test_a_hostile_rank_pattern_key_is_bounded_too(tmp_path):
    model = _model()
    t0 = time.perf_counter()
    cfg = lk.LoraConfig(r=2, target_modules=["0"], rank_pattern={HOSTILE: 4})
    lk.inject_lora(model, cfg)
    assert model[0].lora_A.shape[0] == 2 and time.perf_counter() - t0 < 1.0


def test_a_refused_pattern_names_the_file_and_the_key(tmp_path):
    path = _adapter(tmp_path, rank_pattern={r"(a)\1": 4})
    with pytest.raises(ValueError) as info:
        lk.load_adapter(_model(), path)
    msg = str(info.value)
    assert "adapter_config.json" in msg and "rank_pattern key" in msg and "backreferences" in msg


def test_a_hostile_target_modules_flag_is_an_error_at_once(tmp_path, capsys, cli_defaults):
    from helpers import one_line_error
    from lora_kernels.cli import main

    t0 = time.perf_counter()
    rc = main(["finetune", "--output-dir", str(tmp_path / "o"), "--target-modules", HOSTILE, "--max-steps", "1",
               "--seq-len", "16", "--no-progress"])
    assert rc == 2 and "matched no module" in one_line_error(capsys.readouterr().err)
    assert time.perf_counter() - t0 < 20  # building the tiny model included; re would hang here for minutes
