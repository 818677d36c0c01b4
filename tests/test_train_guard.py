"""lorakit.train: the non-finite guard (skip, count, stop after K in a row with a good checkpoint)
and resume refusing a checkpoint of another base model or adapter config."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
import lorakit.train.loop as loop
from _tiny_lm import save_tiny_model, sql_records, write_jsonl
from lorakit.io import read_tensors
from lorakit.train import TrainConfig, TrainingError, train
from lorakit.train.checkpoint import CheckpointError, list_checkpoints


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    save_tiny_model(root / "model")
    save_tiny_model(root / "other", seed=7)
    write_jsonl(root / "train.jsonl", sql_records(32))
    return root


def config(files, out, model="model", lora=None, **run):
    return TrainConfig.from_dict({
        "model": {"model": str(files / model)},
        "data": {"train_file": str(files / "train.jsonl"), "valid_fraction": 0.0},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], **(lora or {})},
        "optim": {"lr": 1e-2, "batch_size": 4, "warmup_steps": 0},
        "run": {"out_dir": str(out), "steps": 8, "progress": False, **run},
    })


def poison(monkeypatch, steps: set, kind: str):
    """Make the given 1-based steps produce a NaN loss ("loss") or an Inf gradient ("grad")."""
    real = loop.train_step
    counter = {"step": 0}

    def step(model, micro, precision, scaler=None):
        counter["step"] += 1
        loss, n = real(model, micro, precision, scaler)
        if counter["step"] in steps:
            if kind == "loss":
                return float("nan"), n
            p = next(p for p in model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("inf")
        return loss, n

    monkeypatch.setattr(loop, "train_step", step)


def snapshots(model_holder):
    seen = []

    def cb(step, row):
        seen.append({k: v.clone() for k, v in lorakit.lora_state_dict(model_holder["model"]).items()})
    return seen, cb


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_and_counted(files, tmp_path, monkeypatch, kind):
    from lorakit.models import load_base
    loaded = load_base(str(files / "model"), "float32", "cpu")
    seen, cb = snapshots({"model": loaded.model})
    poison(monkeypatch, {3, 5}, kind)
    result = train(config(files, tmp_path / "run"), loaded=loaded, callbacks=(cb,))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 1, 0, 0, 0]
    assert [r["bad_steps"] for r in rows] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert result.bad_steps == 2
    for skipped in (3, 5):                 # the weights after a skipped step are those before it
        before, after = seen[skipped - 2], seen[skipped - 1]
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])   # good steps do move them
    final = read_tensors(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())
    assert "skipped" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]


def test_k_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(files, tmp_path, monkeypatch):
    from lorakit.models import load_base
    loaded = load_base(str(files / "model"), "float32", "cpu")
    seen, cb = snapshots({"model": loaded.model})
    poison(monkeypatch, {4, 5, 6, 7, 8}, "grad")
    with pytest.raises(TrainingError, match=r"step 6: 3 steps in a row had a non-finite loss or gradient.*"
                                            r"step-000006.*--resume"):
        train(config(files, tmp_path / "run", max_bad_steps=3, save_every=2), loaded=loaded, callbacks=(cb,))
    steps = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert steps[-1] == 6
    saved = read_tensors(tmp_path / "run" / "checkpoints" / "step-000006" / "adapter_model.safetensors")
    good = seen[2]                          # after step 3, the last step that changed the weights
    assert saved.keys() == good.keys() and all(torch.equal(saved[k], good[k]) for k in saved)


def test_max_bad_steps_is_validated():
    with pytest.raises(lorakit.LoraError, match="run.max_bad_steps"):
        TrainConfig.from_dict({"model": {"model": "x"}, "data": {"train_file": "t.jsonl"},
                               "run": {"max_bad_steps": 0}})


def test_resume_refuses_another_adapter_config(files, tmp_path):
    train(config(files, tmp_path / "run", steps=4, save_every=2))
    with pytest.raises(CheckpointError, match=r"lora\.r: checkpoint 4, this run 8"):
        train(config(files, tmp_path / "run", lora={"r": 8}, steps=6, resume=True))


def test_resume_refuses_another_base_model(files, tmp_path):
    train(config(files, tmp_path / "run", steps=4, save_every=2))
    cfg = config(files, tmp_path / "run", steps=6, resume=True)
    with pytest.raises(CheckpointError, match=r"model\.model: checkpoint .*model', this run .*other'"):
        train(config(files, tmp_path / "run", model="other", steps=6, resume=True))
    # the same model name but different weights: the adapter's base fingerprint differs
    save_tiny_model(files / "model_copy", seed=7)
    (files / "model").rename(files / "model_orig")
    (files / "model_copy").rename(files / "model")
    try:
        with pytest.raises(CheckpointError, match="cannot resume on this base model"):
            train(cfg)
    finally:
        (files / "model").rename(files / "model_copy")
        (files / "model_orig").rename(files / "model")
