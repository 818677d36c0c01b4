"""parameter_report: the counts (the README's d = k = 5000, r = 5 example) and the printed table."""

from __future__ import annotations

import torch
from conftest import tiny_gpt2
from torch import nn

import lorakit


def test_readme_example_5000_by_5000_rank_5():
    # One nn.Linear(5000, 5000, bias=False), in a container (inject adapts submodules); on the
    # meta device, so no 100 MB of weights are allocated: the counts need shapes only.
    model = nn.Sequential(nn.Linear(5000, 5000, bias=False, device="meta"))
    lorakit.inject(model, lorakit.LoraConfig(r=5, alpha=5, target_modules="all-linear"))
    report = lorakit.parameter_report(model)
    assert report.trainable == 50_000 == 5 * (5000 + 5000)
    assert report.base == 25_000_000
    assert report.total == 25_050_000 and report.lora == 50_000
    assert abs(report.trainable_percent - 100 * 50_000 / 25_050_000) < 1e-12
    text = str(report)
    assert text.splitlines()[-1] == (
        "trainable: 50,000 of 25,050,000 (0.200%) | base 25,000,000 | LoRA adds 50,000 (+0.200%)")
    assert [(r.module, r.parameter, r.adapter, r.shape, r.numel, r.trainable) for r in report.rows] == [
        ("0", "weight", None, (5000, 5000), 25_000_000, False),
        ("0", "lora_A", "default", (5, 5000), 25_000, True),
        ("0", "lora_B", "default", (5000, 5), 25_000, True)]


def test_table_columns_and_alignment():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    lines = lorakit.parameter_report(model).table().splitlines()
    assert lines[0].split() == ["module", "parameter", "adapter", "shape", "params", "trainable"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = [line.split() for line in lines[2:]]
    assert rows == [["0", "weight", "-", "4x8", "32", "no"], ["0", "bias", "-", "4", "4", "no"],
                    ["0", "lora_A", "default", "2x8", "16", "yes"], ["0", "lora_B", "default", "4x2", "8", "yes"],
                    ["2", "weight", "-", "2x4", "8", "no"], ["2", "bias", "-", "2", "2", "no"]]
    widths = {len(line) for line in lines}
    assert len(widths) == 1                               # every row padded to the same width
    params_col = lines[0].index("params") + len("params")
    assert all(line[params_col - 1] != " " for line in lines[2:])   # numbers right-aligned


def test_user_modules_named_base_or_adapters_keep_their_names():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(4, 4)
            self.adapters = nn.ModuleDict({"x": nn.Linear(4, 2)})
            self.head = nn.Linear(2, 3)
    model = Net()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["base", "x"], modules_to_save=["head"]), name="a")
    rows = {(r.module, r.parameter, r.adapter) for r in lorakit.parameter_report(model).rows}
    assert rows == {("base", "weight", None), ("base", "bias", None), ("base", "lora_A", "a"), ("base", "lora_B", "a"),
                    ("adapters.x", "weight", None), ("adapters.x", "bias", None), ("adapters.x", "lora_A", "a"),
                    ("adapters.x", "lora_B", "a"), ("head", "weight", None), ("head", "bias", None),
                    ("head", "weight", "a"), ("head", "bias", "a")}


def test_tied_weights_count_once_and_long_tables_are_shortened():
    model = tiny_gpt2()                                   # wte.weight is lm_head.weight
    plain = lorakit.parameter_report(model)
    assert plain.total == sum(p.numel() for p in model.parameters()) and plain.trainable == plain.total
    assert not any(r.module == "lm_head" for r in plain.rows)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    report = lorakit.parameter_report(model)
    assert report.base == plain.total and report.trainable == 2 * 2 * (32 + 96)
    lines = report.table(max_rows=10).splitlines()
    assert len(lines) == 2 + 10 + 1 and "rows)" in lines[2 + 5]
    assert f"({len(report.rows) - 10} rows)" in lines[2 + 5]


def test_two_adapters_and_frozen_loaded_ones(tmp_path):
    model = nn.Sequential(nn.Linear(6, 6))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]), name="a")
    lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["0"]), name="b")
    lorakit.set_trainable(model, "b", False)
    report = lorakit.parameter_report(model)
    assert report.lora == 2 * 12 + 3 * 12 and report.trainable == 2 * 12
    by_adapter = {}
    for r in report.rows:
        by_adapter[r.adapter] = by_adapter.get(r.adapter, 0) + r.numel
    assert by_adapter == {None: 42, "a": 24, "b": 36}
    assert torch.Size(report.rows[0].shape) == model[0].weight.shape
