"""`lorakit analyze` and `lorakit extract`: tables, PNG, JSON, adapter folder, errors."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from conftest import MLP
from lorakit.commands import analyze, extract


def parse(module, *argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


@pytest.fixture
def checkpoints(tmp_path):
    """base.safetensors and tuned.safetensors of an MLP whose every weight got an exact rank-2 update."""
    torch.manual_seed(0)
    base = MLP((16, 32, 24, 10))
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in tuned.layers:
            d, k = layer.weight.shape
            layer.weight += 0.1 * torch.randn(d, 2, generator=g) @ torch.randn(2, k, generator=g)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


def test_analyze_prints_table_and_writes_png_and_json(tmp_path, checkpoints, capsys):
    b, t, *_ = checkpoints
    args = parse(analyze, "--base", b, "--tuned", t, "--png", tmp_path / "s.png", "--json", tmp_path / "a.json",
                 "--ranks", "1,2,64")
    assert analyze.run(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(line for line in lines if line.startswith("layer"))
    for col in ("shape", "full rank", "num. rank", "eff@0.9", "eff@0.99", "err@r=1", "err@r=2", "err@r=64"):
        assert col in head
    row = next(line for line in lines if line.startswith("layers.1 "))
    assert row.split()[:5] == ["layers.1", "linear", "24x32", "24", "2"]
    assert "effective rank at 0.99 energy" in out and "Spectra:" in out
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((tmp_path / "a.json").read_text())
    assert [x["numerical_rank"] for x in doc["layers"]] == [2, 2, 2]
    assert all(x["relative_error"]["2"] < 1e-5 and x["relative_error"]["64"] == 0.0 for x in doc["layers"])
    assert doc["ranks"] == [1, 2, 64] and doc["other_changed"] == []


def test_analyze_base_alone_quiet(tmp_path, checkpoints, capsys):
    b, *_ = checkpoints
    assert analyze.run(parse(analyze, "--base", b, "--no-png", "--quiet", "--json", tmp_path / "a.json")) == 0
    assert capsys.readouterr().out == ""
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["tuned"] is None and [x["numerical_rank"] for x in doc["layers"]] == [16, 24, 10]
    assert not (tmp_path / "spectra.png").exists()


def test_analyze_errors(tmp_path, checkpoints):
    b, t, base, _ = checkpoints
    with pytest.raises(lorakit.ConfigError, match="--ranks"):
        analyze.run(parse(analyze, "--base", b, "--tuned", t, "--ranks", "x", "--no-png"))
    with pytest.raises(lorakit.ConfigError, match="--include"):
        analyze.run(parse(analyze, "--base", b, "--include", "nothing-matches", "--no-png"))
    other = {k: v for k, v in base.state_dict().items() if not k.startswith("layers.2")}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(lorakit.LoraError, match="layers.2"):
        analyze.run(parse(analyze, "--base", b, "--tuned", tmp_path / "other.safetensors", "--no-png"))


def test_extract_writes_a_loadable_adapter(tmp_path, checkpoints, capsys):
    b, t, base, tuned = checkpoints
    args = parse(extract, "--base", b, "--tuned", t, "--rank", 2, "--out", tmp_path / "ad", "--json",
                 tmp_path / "r.json", "--exclude", r"\.2$")
    assert extract.run(args) == 0
    out = capsys.readouterr().out
    assert "layers.0" in out and "rel. error of dW" in out and "rank-2 adapter" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [x["name"] for x in report["layers"]] == ["layers.0", "layers.1"]
    assert report["max_relative_error"] < 1e-5 and report["alpha"] == 2
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path / "ad")
    with torch.no_grad():
        for layer, want in zip(model.layers[:2], tuned.layers[:2]):
            torch.testing.assert_close(layer.weight + layer.delta_weight("default"), want.weight, atol=1e-6, rtol=0)
        assert torch.equal(model.layers[2].weight, base.layers[2].weight)    # excluded: not adapted


def test_extract_dtype_and_identical_checkpoints(tmp_path, checkpoints):
    b, t, *_ = checkpoints
    assert extract.run(parse(extract, "--base", b, "--tuned", t, "--rank", 4, "--out", tmp_path / "ad",
                             "--dtype", "bfloat16", "--quiet")) == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert f.get_slice("base_model.model.layers.0.lora_A.weight").get_shape() == [4, 16]
    with pytest.raises(lorakit.LoraError, match="nothing to extract"):
        extract.run(parse(extract, "--base", b, "--tuned", b, "--rank", 2, "--out", tmp_path / "x", "--quiet"))


def test_plot_spectra_writes_png(tmp_path, checkpoints):
    from lorakit.analysis import analyze as run_analysis
    b, t, *_ = checkpoints
    out = analyze.plot_spectra(run_analysis(b, t), tmp_path / "fig" / "s.png", "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dispatch_through_the_lorakit_command(tmp_path, checkpoints, monkeypatch, capsys):
    """`lorakit analyze|extract|demo digits` through cli.main (only these commands registered here)."""
    from lorakit import cli
    from lorakit.commands import demo
    monkeypatch.setattr(cli, "COMMANDS", {k: cli.COMMANDS[k] for k in ("analyze", "extract", "demo")})
    monkeypatch.setattr(demo, "DEMOS", {"digits": demo.DEMOS["digits"]})
    b, t, *_ = checkpoints
    assert cli.main(["analyze", "--base", str(b), "--tuned", str(t), "--no-png"]) == 0
    assert cli.main(["extract", "--base", str(b), "--tuned", str(b), "--rank", "2", "--out", str(tmp_path / "x")]) == 2
    assert "lorakit extract: error:" in capsys.readouterr().err
    assert cli.main(["demo", "digits", "--hidden", "16", "--pretrain-steps", "5", "--steps", "2", "--quiet",
                     "--no-figure", "--out", str(tmp_path / "d"), "--json", str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["disabled_identical"] is True
