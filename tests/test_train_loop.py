"""lorakit.train.loop: the loss goes down, only adapters train, exact resume, accumulation, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorakit
from _tiny_lm import save_tiny_model, sql_records, tiny_causal_lm, tiny_tokenizer, write_jsonl
from lorakit.io import read_tensors
from lorakit.models import load_base
from lorakit.train import TrainConfig, TrainingError, train
from lorakit.train.loop import causal_lm_loss, lr_factor, split_head


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    save_tiny_model(root / "model")
    write_jsonl(root / "train.jsonl", sql_records(48))
    return root


def config(files, out, **run):
    return TrainConfig.from_dict({
        "model": {"model": str(files / "model")},
        "data": {"train_file": str(files / "train.jsonl"), "valid_fraction": 0.1},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.1},
        "optim": {"lr": 1e-2, "batch_size": 4, "warmup_steps": 2},
        "run": {"out_dir": str(out), "steps": 12, "progress": False, "eval_every": 4, **run},
    })


def test_loss_goes_down_and_outputs_are_written(files, tmp_path):
    result = train(config(files, tmp_path / "run", steps=30, save_every=10))
    assert len(result.losses) == 30
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.5, (first, last)
    out = tmp_path / "run"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)
    assert [r["step"] for r in rows if r["eval_loss"] is not None] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert (out / "metrics.csv").read_text().startswith("step,loss,eval_loss,lr")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert TrainConfig.load(str(out / "train_config.yaml")).run.steps == 30
    adapter = out / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(files / "model")
    readme = (adapter / "README.md").read_text()
    assert str(files / "model") in readme and "30" in readme and f"{result.final_loss:.4f}" in readme
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000010", "step-000020"]


def test_only_the_adapter_changes_and_the_saved_adapter_reproduces_it(files, tmp_path):
    lm = load_base(str(files / "model"))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    train(config(files, tmp_path / "run", steps=4), loaded=lm)
    after = lm.model.state_dict()
    for k, v in before.items():                     # base weights bit-identical (keys as wrapped now)
        match = [a for a in after if a.replace(".base.", ".") == k and "adapters" not in a]
        assert len(match) == 1 and torch.equal(after[match[0]], v), k
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        trained = lm.model(ids).logits
    fresh = load_base(str(files / "model"))
    lorakit.load_adapter(fresh.model, tmp_path / "run" / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh.model(ids).logits, trained)


def test_resume_is_bit_identical(files, tmp_path):
    full = train(config(files, tmp_path / "a", steps=8, save_every=2))

    class Crash(Exception):
        pass

    def crash_at_5(step, row):
        if step == 5:
            raise Crash()

    with pytest.raises(Crash):
        train(config(files, tmp_path / "b", steps=8, save_every=2), callbacks=(crash_at_5,))
    resumed = train(config(files, tmp_path / "b", steps=8, save_every=2, resume=True))
    assert resumed.resumed_from == 4 and len(resumed.losses) == 4
    assert resumed.losses == full.losses[4:]                           # exact float equality
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))              # the crashed step 5 row was dropped
    assert [r["loss"] for r in rows] == full.losses
    a = read_tensors(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = read_tensors(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_an_error(files, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(config(files, tmp_path / "c", resume=True))


def test_gradient_accumulation_matches_one_big_batch(files, tmp_path):
    def first_step(batch_size, accum):
        cfg = config(files, tmp_path / f"g{batch_size}", steps=1)
        cfg.optim.batch_size, cfg.optim.grad_accum = batch_size, accum
        cfg.lora.dropout = 0.0
        lm = load_base(str(files / "model"))
        res = train(cfg, loaded=lm)
        return res.losses[0], read_tensors(tmp_path / f"g{batch_size}" / "adapter" / "adapter_model.safetensors")

    big_loss, big = first_step(4, 1)
    acc_loss, acc = first_step(2, 2)
    assert math.isclose(big_loss, acc_loss, rel_tol=1e-5)
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-6)


def test_fast_loss_equals_the_full_logits_loss():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(len(tok))
    ids = torch.randint(0, len(tok), (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 6:] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    assert split_head(model)[0] is model.model
    loss_sum, n = causal_lm_loss(model, batch)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss             # HF: shifted, mean over labels
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-6, atol=1e-6)


def test_schedule():
    assert [round(lr_factor(s, 10, 2, "constant", 0.0), 3) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 10, 0, "cosine", 0.1) for s in range(10)]
    assert cos[0] == 1.0 and all(a > b for a, b in zip(cos, cos[1:])) and cos[-1] > 0.1
    lin = [lr_factor(s, 10, 0, "linear", 0.0) for s in range(10)]
    assert lin[5] == pytest.approx(0.5)


def test_a_fresh_run_refuses_to_mix_with_an_earlier_runs_checkpoints(files, tmp_path):
    train(config(files, tmp_path / "r", steps=4, save_every=2))
    with pytest.raises(TrainingError, match=r"checkpoints of an earlier run \(steps \[2\]\); pass --resume"):
        train(config(files, tmp_path / "r", steps=4, save_every=2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_adamw_fused_matches_default():
    from lorakit.train.loop import adamw
    g = torch.Generator(device="cuda").manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 16, device="cuda", generator=g)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fused, plain = adamw(ps, lr=1e-2, weight_decay=0.1), torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for a, b in zip(ps, qs):
            a.grad = torch.randn(a.shape, device="cuda", generator=g)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for a, b in zip(ps, qs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_training_matches_eager_and_hands_back_an_eager_model(files, tmp_path):
    """run.compile: each decoder layer compiled (one graph for all), the same losses as eager
    (dropout 0: a compiled random mask differs), and the model uncompiled afterwards."""
    def run(compile_: bool):
        cfg = TrainConfig.from_dict({
            "model": {"model": str(files / "model")},
            "data": {"train_file": str(files / "train.jsonl"), "valid_fraction": 0.0},
            "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0},
            "optim": {"lr": 1e-2, "batch_size": 4, "warmup_steps": 0},
            "run": {"out_dir": str(tmp_path / f"c{int(compile_)}"), "steps": 3, "progress": False,
                    "compile": compile_},
        })
        lm = load_base(str(files / "model"))
        return train(cfg, loaded=lm), lm
    torch._dynamo.reset()
    eager, _ = run(False)
    compiled_run, lm = run(True)
    torch._dynamo.reset()
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in lm.model.modules())
    for a, b in zip(compiled_run.losses, eager.losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (compiled_run.losses, eager.losses)


def test_compile_blocks_finds_the_decoder_layers():
    from lorakit.compiled import compile_blocks, repeated_blocks, uncompile
    model = tiny_causal_lm(64)
    layers = repeated_blocks(model)
    assert layers is model.model.layers
    assert compile_blocks(model, backend="eager") == len(layers)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert uncompile(model) == len(layers) and all(layer._compiled_call_impl is None for layer in layers)
    experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(8))   # more members, fewer parameters
    model.model.layers[0].add_module("experts", experts)
    assert repeated_blocks(model) is model.model.layers
