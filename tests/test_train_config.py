"""lorakit.train.config: defaults < YAML < flags, typed coercion, validation naming the field."""

from __future__ import annotations

import argparse

import pytest

from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig, add_flags, flag_overrides


def parse(argv):
    p = argparse.ArgumentParser()
    add_flags(p)
    return flag_overrides(p.parse_args(argv))


def test_defaults_need_only_a_train_file():
    cfg = TrainConfig.load(None, {"data": {"train_file": "t.jsonl"}})
    assert cfg.optim.lr == 2e-4 and cfg.lora.r == 8 and cfg.run.steps == 100 and cfg.data.max_length == 512
    with pytest.raises(ConfigError, match="data.train_file is required"):
        TrainConfig.load(None, {})


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  train_file: a.jsonl\noptim:\n  lr: 1e-3\n  batch_size: 4\nlora:\n  r: 4\n"
                 "  target_modules: [q_proj, v_proj]\nrun:\n  steps: 10\n")
    cfg = TrainConfig.load(str(y), parse(["--lr", "5e-4", "--steps", "20", "--no-progress"]))
    assert cfg.optim.lr == 5e-4                 # flag
    assert cfg.run.steps == 20                  # flag
    assert cfg.optim.batch_size == 4            # YAML
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.run.progress is False
    assert cfg.optim.warmup_steps == 0          # default
    assert isinstance(cfg.optim.lr, float)      # YAML's "1e-3" is a string; it is coerced


def test_list_and_choice_flags():
    over = parse(["--train-file", "t.jsonl", "--target-modules", "q_proj", "v_proj", "--schedule", "linear",
                  "--max-grad-norm", "null", "--packing"])
    cfg = TrainConfig.load(None, over)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.optim.schedule == "linear"
    assert cfg.optim.max_grad_norm is None and cfg.data.packing is True
    assert cfg.lora.to_lora_config().target_modules == ["q_proj", "v_proj"]
    all_linear = TrainConfig.load(None, parse(["--train-file", "t", "--target-modules", "all-linear"]))
    assert all_linear.lora.to_lora_config().target_modules == "all-linear"
    with pytest.raises(SystemExit):
        parse(["--schedule", "exponential"])


def test_errors_name_every_bad_field_at_once():
    with pytest.raises(ConfigError) as e:
        TrainConfig.load(None, {"data": {"train_file": "t", "max_length": 1}, "optim": {"lr": -1.0},
                                "lora": {"dropout": 1.5}, "run": {"keep_last": 0}})
    msg = str(e.value)
    for field in ("data.max_length", "optim.lr", "lora.dropout", "run.keep_last"):
        assert field in msg


def test_wrong_types_and_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.batch_size: 'eight' is not a valid int"):
        TrainConfig.load(None, {"data": {"train_file": "t"}, "optim": {"batch_size": "eight"}})
    with pytest.raises(ConfigError, match=r"unknown key optim\.learning_rate"):
        TrainConfig.load(None, {"data": {"train_file": "t"}, "optim": {"learning_rate": 1.0}})
    y = tmp_path / "c.yaml"
    y.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown section 'trainer'"):
        TrainConfig.load(str(y))
    y.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.load(str(y))
    with pytest.raises(ConfigError, match="cannot read"):
        TrainConfig.load(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"run\.steps: True is not a valid int"):
        TrainConfig.load(None, {"data": {"train_file": "t"}, "run": {"steps": True}})


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig.load(None, parse(["--train-file", "t.jsonl", "--lr", "3e-4", "--target-modules", "q_proj"]))
    y = tmp_path / "resolved.yaml"
    y.write_text(cfg.to_yaml())
    assert TrainConfig.load(str(y)) == cfg
