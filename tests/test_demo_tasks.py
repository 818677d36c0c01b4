"""lorakit.demos.tasks (the main job) at tiny scale, and its committed data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from _tiny_lm import save_tiny_model, sql_records, tiny_causal_lm, tiny_tokenizer, write_jsonl
from lorakit.demos import tasks
from lorakit.models import load_base
from lorakit.train.data import IGNORE, Example, read_jsonl

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: see conftest.one_thread


# ------------------------------------------------------------------------------ the committed data
def test_data_files_are_what_the_script_generates():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tasks.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("task", tasks.TASKS)
def test_test_questions_are_never_trained_on(task):
    train = [r for _, r in read_jsonl(tasks.DATA / task / "train.jsonl")]
    test = [r for _, r in read_jsonl(tasks.DATA / task / "test.jsonl")]
    assert len(train) >= 2000 and len(test) >= 100
    question = lambda r: r["messages"][1]["content"]              # noqa: E731
    assert not {question(r) for r in train} & {question(r) for r in test}
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in train + test)


def test_answers_follow_the_fixed_formats():
    for _, r in read_jsonl(tasks.DATA / "json" / "test.jsonl"):
        answer = r["messages"][2]["content"]
        assert list(json.loads(answer)) == ["name", "age", "job", "city"] and " " not in answer.replace(
            json.loads(answer)["name"], "")
    for _, r in read_jsonl(tasks.DATA / "sql" / "test.jsonl"):
        query = r["messages"][2]["content"]
        assert query.startswith("SELECT ") and not query.endswith(";")


# ------------------------------------------------------------------------------ exact match
def test_exact_match_is_greedy_decoding():
    """exact_match says True exactly when greedy generation reproduces the labelled tokens."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm(len(tok), seed=3)
    prompts = [[5, 9, 17], [30, 31, 32, 33]]
    examples = []
    for p in prompts:
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                               pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        examples.append(Example(p + g, [IGNORE] * len(p) + g))
    assert tasks.exact_match(model, tok, examples) == [True, True]
    wrong = Example(list(examples[1].input_ids), list(examples[1].labels))
    last = wrong.input_ids[-1]
    wrong.input_ids[-1] = wrong.labels[-1] = (last + 1) % len(tok)
    assert tasks.exact_match(model, tok, [examples[0], wrong]) == [True, False]


# ------------------------------------------------------------------------------ the job at tiny scale
@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    save_tiny_model(root / "model")
    for i, task in enumerate(tasks.TASKS):
        recs = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["completion"].strip()}]}
                for r in sql_records(24, seed=i)]
        (root / "data" / task).mkdir(parents=True)
        write_jsonl(root / "data" / task / "train.jsonl", recs[:18])
        write_jsonl(root / "data" / task / "test.jsonl", recs[18:])
    lm = load_base(str(root / "model"))
    cfg = tasks.DemoConfig(out=str(root / "out"), steps=3, batch_size=4, test_examples=4, generate_check=2,
                           progress=False, lr=1e-2)
    lines: list[str] = []
    summary = tasks.run_demo(cfg, loaded=lm, data_dir=root / "data", log=lines.append)
    return root, lm, summary, "\n".join(lines)


def test_summary_has_the_promised_shape(tiny_job):
    root, _, summary, _ = tiny_job
    on_disk = json.loads((root / "out" / "summary.json").read_text())
    assert on_disk == summary
    assert set(summary) == {"tasks", "base_model_bytes", "switch_ms"}
    assert set(summary["tasks"]) == set(tasks.TASKS)
    for task, t in summary["tasks"].items():
        assert set(t) == {"base_exact_match", "adapter_exact_match", "adapter_bytes", "train_seconds",
                          "test_examples"}
        assert 0.0 <= t["base_exact_match"] <= 1.0 and 0.0 <= t["adapter_exact_match"] <= 1.0
        assert t["adapter_bytes"] == (root / "out" / task / "adapter" / "adapter_model.safetensors").stat().st_size
        assert t["test_examples"] == 4 and t["train_seconds"] > 0
    assert summary["base_model_bytes"] == (root / "model" / "model.safetensors").stat().st_size
    assert 0 <= summary["switch_ms"] < 10


def test_one_base_holds_both_adapters_and_the_log_shows_switching(tiny_job):
    _, lm, _, log = tiny_job
    assert lorakit.adapter_names(lm.model) == list(tasks.TASKS)
    assert not any(p.requires_grad for p in lm.model.parameters())
    for task in tasks.TASKS:
        assert f"set_adapter({task!r}) took" in log and f"with {task:<5} |" in log
    assert "base       |" in log and "adapter switch (lorakit.set_adapter)" in log
    details = json.loads((Path(tiny_job[0]) / "out" / "details.json").read_text())
    for task in tasks.TASKS:
        assert details["generate_check"][task]["agree"] == details["generate_check"][task]["examples"] == 2


def test_demo_config_is_validated():
    with pytest.raises(lorakit.ConfigError, match="tasks must be"):
        tasks.DemoConfig(tasks=["poetry"])
    with pytest.raises(lorakit.ConfigError, match="steps must be"):
        tasks.DemoConfig(steps=0)


def test_demo_command_parses_its_flags():
    from lorakit.cli import build_parser
    args = build_parser().parse_args(["demo", "tasks", "--steps", "5", "--tasks", "sql", "--no-progress"])
    assert args.steps == 5 and args.tasks == ["sql"] and args.progress is False
    assert args._demo_module == "lorakit.demos.tasks"
