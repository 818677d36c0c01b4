"""LoraConfig: validation (all problems in one message), per-module rank / alpha / scale with
PEFT's pattern rule, and the adapter_config.json round trip."""

from __future__ import annotations

import math

import pytest

import lorakit
from lorakit import ConfigError, LoraConfig


def test_defaults_and_scale():
    cfg = LoraConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.bias, cfg.init, cfg.use_rslora) == (8, 8.0, 0.0, "none", "kaiming",
                                                                                   False)
    assert LoraConfig(r=8, alpha=16).scale_for("x") == 2.0
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scale_for("x") == 8 / math.sqrt(16)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(r=0), "r must be an integer >= 1, got 0"),
    (dict(r=-3), "r must be an integer >= 1, got -3"),
    (dict(r=2.5), "r must be an integer >= 1, got 2.5"),
    (dict(r=True), "r must be an integer >= 1, got True"),
    (dict(alpha=0), "alpha must be a finite number > 0, got 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0, got nan"),
    (dict(alpha="16"), "alpha must be a finite number > 0, got '16'"),
    (dict(dropout=1.0), "dropout must be a number in [0, 1), got 1.0"),
    (dict(dropout=-0.1), "dropout must be a number in [0, 1), got -0.1"),
    (dict(bias="all"), "bias must be 'none'"),
    (dict(init="xavier"), "init must be one of ('kaiming', 'gaussian'), got 'xavier'"),
    (dict(adapter_dtype="fp8"), "adapter_dtype must be one of"),
    (dict(use_rslora=1), "use_rslora must be a bool, got 1"),
    (dict(target_modules="q_proj("), "target_modules regex 'q_proj(' does not compile"),
    (dict(target_modules=[]), "target_modules is an empty list"),
    (dict(target_modules=["q", 3]), "target_modules must be a list of module names or a regex string"),
    (dict(exclude_modules=5), "exclude_modules must be a list of module names or a regex string"),
    (dict(modules_to_save="classifier"), "modules_to_save must be a list of module names, got 'classifier'"),
    (dict(rank_pattern={"q": 0}), "rank_pattern values must be an integer >= 1: 'q': 0"),
    (dict(rank_pattern={"(": 2}), "rank_pattern key '(' is not a valid regex"),
    (dict(alpha_pattern={"q": -1.0}), "alpha_pattern values must be a finite number > 0: 'q': -1.0"),
    (dict(rank_pattern=[("q", 2)]), "rank_pattern must be a dict"),
])
def test_invalid_values_are_config_errors_naming_the_field(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        LoraConfig(**kwargs)
    assert fragment in str(e.value)
    assert isinstance(e.value, lorakit.LoraError) and isinstance(e.value, ValueError)


def test_all_problems_in_one_message():
    with pytest.raises(ConfigError) as e:
        LoraConfig(r=0, alpha=-1, dropout=2, bias="lora_only")
    msg = str(e.value)
    assert all(f in msg for f in ("r must", "alpha must", "dropout must", "bias must"))


def test_normalisation_and_replace():
    cfg = LoraConfig(target_modules=("v_proj", "q_proj", "q_proj"), modules_to_save=("head",))
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.modules_to_save == ["head"]
    assert LoraConfig(target_modules="All-Linear").target_modules == "all-linear"
    assert cfg.replace(r=4).r == 4 and cfg.r == 8
    with pytest.raises(ConfigError, match="r must"):
        cfg.replace(r=0)


def test_rank_and_alpha_patterns_follow_peft():
    from peft.utils.other import get_pattern_key
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 2, "mlp.*": 12},
                     alpha_pattern={"v_proj": 3})
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.xq_proj", "q_proj",
             "model.layers.11.self_attn.v_proj"]
    for path in paths:
        key = get_pattern_key(cfg.rank_pattern.keys(), path)
        assert cfg.rank_for(path) == cfg.rank_pattern.get(key, cfg.r), path
        key = get_pattern_key(cfg.alpha_pattern.keys(), path)
        assert cfg.alpha_for(path) == cfg.alpha_pattern.get(key, cfg.alpha), path
    assert [cfg.rank_for(p) for p in paths] == [4, 2, 8, 12, 8, 4, 8]
    assert cfg.scale_for(paths[1]) == 3 / 2 and cfg.scale_for(paths[0]) == 16 / 4


def test_peft_dict_round_trip():
    cfg = LoraConfig(r=4, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"], init="gaussian",
                     use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 8},
                     modules_to_save=["lm_head"], base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    d = cfg.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["lora_alpha"] == 32 and d["lora_dropout"] == 0.05
    assert d["init_lora_weights"] == "gaussian" and d["use_rslora"] is True
    assert LoraConfig.from_peft_dict(d) == cfg
    assert LoraConfig.from_peft_dict(LoraConfig(target_modules=["a"]).to_peft_dict()).init == "kaiming"
    resolved = cfg.to_peft_dict(target_modules=["model.layers.0.q_proj", "a"], fan_in_fan_out=True)
    assert resolved["target_modules"] == ["a", "model.layers.0.q_proj"] and resolved["fan_in_fan_out"] is True


@pytest.mark.parametrize("data, fragment", [
    ({"peft_type": "PREFIX_TUNING", "r": 8}, "peft_type must be 'LORA', got 'PREFIX_TUNING'"),
    ({"r": 8}, "peft_type must be 'LORA', got None"),
    ({"peft_type": "LORA", "r": 0}, "r must be an integer >= 1, got 0"),
    ({"peft_type": "LORA", "r": 8, "use_dora": True}, "use_dora=True"),
    ({"peft_type": "LORA", "r": 8, "layers_to_transform": [0]}, "layers_to_transform=[0]"),
    ({"peft_type": "LORA", "alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens=[1, 2]"),
    ({"peft_type": "LORA", "kasa_config": {"x": 1}}, "kasa_config="),
    ({"peft_type": "LORA", "r": 8, "bias": "all"}, "bias must be 'none'"),
    ({"peft_type": "LORA", "fan_in_fan_out": "yes"}, "fan_in_fan_out must be a bool"),
    ([1, 2], "expected a JSON object, got list"),
])
def test_bad_adapter_config_names_the_source(data, fragment):
    with pytest.raises(ConfigError) as e:
        LoraConfig.from_peft_dict(data, source="some/dir/adapter_config.json")
    assert str(e.value).startswith("some/dir/adapter_config.json: ") and fragment in str(e.value)


def test_peft_defaults_and_unknown_fields_are_tolerated():
    cfg = LoraConfig.from_peft_dict({"peft_type": "LORA", "target_modules": ["q"], "megatron_config": None,
                                     "some_future_field": 1, "init_lora_weights": False})
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules) == (8, 8, 0.0, ["q"])
