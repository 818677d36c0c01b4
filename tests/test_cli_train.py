"""The commands end to end on a tiny Llama: lorakit train / generate / merge / info."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny_lm import save_tiny_model, sql_records, write_jsonl
from lorakit.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model folder, data, and two trained adapters (sql on all-linear, other on q/v)."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "model")
    write_jsonl(root / "train.jsonl", sql_records(40))
    (root / "c.yaml").write_text(f"model:\n  model: {root / 'model'}\ndata:\n  train_file: {root / 'train.jsonl'}\n"
                                 "optim:\n  lr: 1e-2\n  batch_size: 4\nrun:\n  steps: 6\n  progress: false\n")
    assert main(["train", "--config", str(root / "c.yaml"), "--out-dir", str(root / "sql"),
                 "--target-modules", "all-linear", "--r", "4", "--save-every", "3", "--eval-every", "3"]) == 0
    assert main(["train", "--config", str(root / "c.yaml"), "--out-dir", str(root / "other"), "--seed", "1",
                 "--steps", "3"]) == 0
    return root


def test_train_writes_the_run(run_dir, capsys):
    out = run_dir / "sql"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
                 "metrics.jsonl", "metrics.csv", "loss.png", "train_config.yaml", "checkpoints/step-000003"):
        assert (out / name).exists(), name
    resolved = (out / "train_config.yaml").read_text()
    assert "lr: 0.01" in resolved and "all-linear" in resolved and "steps: 6" in resolved


def test_train_resume_and_print_config(run_dir, capsys):
    assert main(["train", "--config", str(run_dir / "c.yaml"), "--out-dir", str(run_dir / "sql"),
                 "--target-modules", "all-linear", "--r", "4", "--save-every", "3", "--resume"]) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    assert main(["train", "--config", str(run_dir / "c.yaml"), "--lr", "0.5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.5" in printed and "batch_size: 4" in printed


def test_train_errors_name_the_field_or_line(run_dir, tmp_path, capsys):
    assert main(["train", "--train-file", str(run_dir / "train.jsonl"), "--lr", "-1"]) == 2
    assert "optim.lr must be a number > 0" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n')
    assert main(["train", "--model", str(run_dir / "model"), "--train-file", str(bad), "--out-dir",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["train", "--model", str(run_dir / "model"), "--train-file", str(run_dir / "train.jsonl"),
                 "--out-dir", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_generate_side_by_side(run_dir, capsys):
    args = ["generate", "--model", str(run_dir / "model"), "--adapter", str(run_dir / "sql" / "adapter"),
            "--adapter", f"qv={run_dir / 'other' / 'adapter'}", "--prompt", "How many employees?",
            "--prompt", "Count the HR staff", "--max-new-tokens", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1] How many employees?" in out and "[2] Count the HR staff" in out
    for label in ("base", "sql", "qv"):
        assert f"    {label:<4} | " in out
    assert main(args + ["--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [sorted(r["answers"]) for r in rows] == [["base", "qv", "sql"]] * 2
    assert main(args + ["--json"]) == 0                                 # greedy: the same answers again
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == rows


def test_generate_prompts_file_and_errors(run_dir, tmp_path, capsys):
    pf = tmp_path / "p.jsonl"
    write_jsonl(pf, [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}])
    assert main(["generate", "--model", str(run_dir / "model"), "--prompts-file", str(pf), "--max-new-tokens",
                 "3", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["generate", "--model", str(run_dir / "model")]) == 2
    assert "no prompt given" in capsys.readouterr().err
    assert main(["generate", "--model", str(run_dir / "model"), "--prompt", "x", "--adapter",
                 f"base={run_dir / 'sql' / 'adapter'}"]) == 2
    assert "taken" in capsys.readouterr().err


def test_merge_writes_a_folder_plain_transformers_loads(run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.models import load_base
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(run_dir / "model"), "--adapter", str(run_dir / "sql" / "adapter"),
                 "--out", str(out), "--prompt", "How many", "--prompt", "the quick brown fox"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "lorakit_merge.json").read_text())
    assert report["max_abs_diff"] < 1e-4 and report["max_abs_diff_reloaded"] < 1e-4
    assert "max |logits difference|" in printed
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in plain.state_dict())
    lm = load_base(str(run_dir / "model"))
    lorakit.load_adapter(lm.model, run_dir / "sql" / "adapter")
    ids = torch.tensor([[5, 9, 17, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, lm.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["merge", "--model", str(run_dir / "model"), "--adapter", str(run_dir / "sql" / "adapter"),
                 "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_info(run_dir, capsys):
    assert main(["info", str(run_dir / "sql")]) == 0
    out = capsys.readouterr().out
    assert f"base model:       {run_dir / 'model'}" in out
    assert "r=4, alpha=16.0" in out and "target modules:" in out and "q_proj" in out
    # 2 layers x 7 linear modules; hidden 32, intermediate 64; K/V width 16 (2 of 4 heads x 8)
    per_layer = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    assert f"trainable params: {2 * per_layer:,} (14 adapted layers)" in out
    assert "model.layers.1.mlp.down_proj" in out and "training:" in out
    assert main(["info", str(run_dir / "other" / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["r"] == 8 and sorted(info["target_modules"]) == ["q_proj", "v_proj"]
    assert info["file_bytes"] == (run_dir / "other" / "adapter" / "adapter_model.safetensors").stat().st_size
    assert {row["r"] for row in info["layers"]} == {8} and len(info["layers"]) == 4
    assert main(["info", str(run_dir)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
