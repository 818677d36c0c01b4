"""lorakit.train.checkpoint: atomic writes, keep-last-K, a crash mid-write leaves the previous one loadable."""

from __future__ import annotations

import random

from pathlib import Path

import pytest
import torch

import lorakit
from _tiny_lm import tiny_causal_lm
from lorakit.train import checkpoint as ck


def setup_run(seed=0):
    model = tiny_causal_lm(64, seed=0)
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    params = list(lorakit.adapter_parameters(model))
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, params, opt, sched


def one_step(model, opt, sched):
    ids = torch.randint(0, 64, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def adapter_tensors(model):
    return {k: v.clone() for k, v in lorakit.lora_state_dict(model).items()}


def test_keep_last_k_and_latest(tmp_path):
    model, _, opt, sched = setup_run()
    for step in range(1, 5):
        one_step(model, opt, sched)
        ck.save_checkpoint(tmp_path, step, model, "default", opt, sched, {"epoch": 0, "index": step}, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.step == 4 and latest.info["data"] == {"epoch": 0, "index": 4}
    assert (latest.path / "adapter_config.json").is_file() and (latest.path / "adapter_model.safetensors").is_file()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_restore_puts_everything_back(tmp_path):
    model, _, opt, sched = setup_run()
    one_step(model, opt, sched)
    random.seed(5)
    ck.save_checkpoint(tmp_path, 1, model, "default", opt, sched, {})
    saved = adapter_tensors(model)
    expected_rand, expected_py = torch.rand(3), random.random()
    one_step(model, opt, sched)                            # move everything on
    ck.restore(ck.latest_checkpoint(tmp_path), model, "default", opt, sched)
    assert all(torch.equal(v, saved[k]) for k, v in adapter_tensors(model).items())
    assert sched.last_epoch == 1 and opt.state_dict()["state"][0]["step"].item() == 1
    assert torch.equal(torch.rand(3), expected_rand) and random.random() == expected_py


def test_crash_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model, _, opt, sched = setup_run()
    one_step(model, opt, sched)
    ck.save_checkpoint(tmp_path, 1, model, "default", opt, sched, {"index": 1})
    good = adapter_tensors(model)
    one_step(model, opt, sched)

    import lorakit.atomic as atomic
    real_write = atomic.write_new_file

    def dies_half_way(path, data):
        if Path(path).name == ck.STATE_JSON:    # the optimizer state is already written: crash now
            Path(path).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt("power cut")
        real_write(path, data)

    monkeypatch.setattr(atomic, "write_new_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, model, "default", opt, sched, {"index": 2})
    monkeypatch.setattr(atomic, "write_new_file", real_write)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    latest = ck.latest_checkpoint(tmp_path)
    fresh, _, opt2, sched2 = setup_run(seed=1)
    ck.restore(latest, fresh, "default", opt2, sched2)
    assert all(torch.equal(v, good[k]) for k, v in adapter_tensors(fresh).items())


def test_leftovers_of_a_killed_process_are_ignored_then_removed(tmp_path):
    model, _, opt, sched = setup_run()
    ck.save_checkpoint(tmp_path, 1, model, "default", opt, sched, {})
    root = tmp_path / "checkpoints"
    half = root / ".step-000002.lorakit-new-999999999-abcd0123"   # what `kill -9` mid-save leaves
    half.mkdir()
    (half / "trainer_state.pt").write_bytes(b"garbage")
    (root / "step-000003").mkdir()                        # no trainer_state.json: incomplete
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    ck.save_checkpoint(tmp_path, 2, model, "default", opt, sched, {})
    assert not half.exists()
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 2]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, _, opt, sched = setup_run()
    ck.save_checkpoint(tmp_path, 1, model, "default", opt, sched, {"v": 1})
    ck.save_checkpoint(tmp_path, 1, model, "default", opt, sched, {"v": 2})
    assert ck.latest_checkpoint(tmp_path).info["data"] == {"v": 2}


def test_restore_refuses_an_adapter_of_another_shape(tmp_path):
    model, _, opt, sched = setup_run()
    ck.save_checkpoint(tmp_path, 1, model, "default", opt, sched, {})
    other = tiny_causal_lm(64)
    lorakit.inject(other, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    opt2 = torch.optim.AdamW(list(lorakit.adapter_parameters(other)))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    with pytest.raises(ck.CheckpointError, match="shape mismatch"):
        ck.restore(ck.latest_checkpoint(tmp_path), other, "default", opt2, sched2)


def test_unreadable_checkpoint_names_the_folder(tmp_path):
    model, _, opt, sched = setup_run()
    path = ck.save_checkpoint(tmp_path, 1, model, "default", opt, sched, {})
    (path / ck.STATE_PT).write_bytes(b"not a torch file")
    with pytest.raises(ck.CheckpointError, match="step-000001"):
        ck.read_checkpoint(path)
