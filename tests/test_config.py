"""LoraConfig: validation on construction and the PEFT adapter_config.json round trip."""
import peft
import pytest

from lora_kernels import LoraConfig


@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "r"),
    ({"r": 2.5}, "r"),
    ({"r": True}, "r"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_alpha": "16"}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": ["q_proj", ""]}, "target_modules"),
    ({"target_modules": "(unclosed"}, "target_modules"),
    ({"target_modules": 3}, "target_modules"),
    ({"exclude_modules": "all-linear"}, "exclude_modules"),
    ({"bias": "some"}, "bias"),
    ({"use_rslora": 1}, "use_rslora"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    ({"alpha_pattern": {"(": 2}}, "alpha_pattern"),
    ({"modules_to_save": "lm_head"}, "modules_to_save"),
])
def test_bad_field_raises_naming_it(kwargs, field):
    args = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ValueError, match=field):
        LoraConfig(**args)


def test_normalises_targets():
    assert LoraConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"
    assert LoraConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]
    assert LoraConfig(target_modules=("q_proj",)).target_modules == ["q_proj"]


def test_pattern_lookup_follows_peft():
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                     rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 2}, alpha_pattern={"v_proj": 3})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.rank_for("model.layers.1.self_attn.v_proj") == 2
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 8
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 3
    assert cfg.alpha_for("model.layers.0.self_attn.q_proj") == 16
    # "proj" must match a whole dotted component suffix, as in PEFT's get_pattern_key
    assert LoraConfig(target_modules=["q_proj"], rank_pattern={"proj": 2}).rank_for("a.q_proj") == 8


def test_peft_dict_round_trip_and_peft_accepts_it():
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                     exclude_modules=["lm_head"], bias="lora_only", use_rslora=True, init_lora_weights="gaussian",
                     rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4}, modules_to_save=["score"])
    d = cfg.to_peft_dict()
    assert d["peft_type"] == "LORA"
    assert LoraConfig.from_peft_dict(d) == cfg
    p = peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})
    for key in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "init_lora_weights", "rank_pattern",
                "alpha_pattern", "modules_to_save"):
        assert getattr(p, key) == getattr(cfg, key), key
    assert set(p.target_modules) == set(cfg.target_modules)


def test_from_peft_config_written_by_peft():
    p = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.q_proj", bias="all")
    d = p.to_dict()
    d["peft_type"] = "LORA"
    cfg = LoraConfig.from_peft_dict(d)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.bias) == (4, 8, r".*\.q_proj", "all")


@pytest.mark.parametrize("change, key", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"peft_type": None}, "peft_type"),
    ({"use_dora": "yes"}, "use_dora must be a bool"),
    ({"lora_bias": True}, "lora_bias"),
    ({"fan_in_fan_out": "yes"}, "fan_in_fan_out must be a bool"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"r": -1}, "r"),
])
def test_from_peft_dict_rejects(change, key):
    d = LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    d.update(change)
    with pytest.raises(ValueError, match=f"cfg.json.*{key}"):
        LoraConfig.from_peft_dict(d, source="cfg.json")
