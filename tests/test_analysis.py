"""lorakit.analysis: spectra of constructed matrices, checkpoint loading, LoRA extraction round trips."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit import analysis as an
from conftest import CNN, MLP, tiny_gpt2, tiny_llama


def with_spectrum(s, d: int, k: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T (float64) with random orthonormal U (d, m), V (k, m): singular values exactly s."""
    g = torch.Generator().manual_seed(seed)
    m = len(s)
    U, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, m, generator=g, dtype=torch.float64))
    return (U * torch.tensor(s, dtype=torch.float64)) @ V.T


def low_rank(d: int, k: int, r: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, r, generator=g) @ torch.randn(r, k, generator=g)) * scale


# ------------------------------------------------------------------------------ spectra
def test_singular_values_of_constructed_matrix():
    s = [5.0, 3.0, 2.0, 0.5, 0.0]
    w = with_spectrum(s, 12, 7)
    got = an.singular_values(w)
    assert got.dtype == torch.float64 and got.shape == (7,)           # min(d, k) values, descending
    torch.testing.assert_close(got, torch.tensor(s + [0.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    assert an.numerical_rank(w) == 4
    assert an.singular_values(w.float()).dtype == torch.float32


@pytest.mark.parametrize("threshold,expected", [(0.5, 1), (0.53, 1), (0.54, 2), (0.9, 3), (29 / 30, 3),
                                                (0.99, 4), (1.0, 4)])
def test_effective_rank_exact(threshold, expected):
    # energies 16, 9, 4, 1 of 30: cumulative 0.533, 0.833, 0.967, 1
    w = with_spectrum([4.0, 3.0, 2.0, 1.0], 20, 10)
    assert an.effective_rank(w, threshold) == expected
    assert an.effective_rank(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64), threshold) == expected


def test_effective_rank_boundary_and_zero():
    assert an.effective_rank(torch.tensor([3.0, 1.0], dtype=torch.float64), 0.9) == 1   # 9 / 10 exactly
    assert an.effective_rank(torch.zeros(6, 4), 0.9) == 0
    assert an.relative_error(torch.zeros(6, 4), 1) == 0.0
    assert an.numerical_rank(torch.zeros(6, 4)) == 0
    with pytest.raises(lorakit.LoraError, match="threshold"):
        an.effective_rank(torch.ones(3, 3), 0.0)


def test_relative_error_is_sqrt_of_dropped_energy():
    s = [6.0, 4.0, 2.0, 1.0, 0.5]
    w = with_spectrum(s, 16, 9, seed=3)
    total = sum(v * v for v in s)
    for r in range(0, 7):
        expected = math.sqrt(sum(v * v for v in s[r:]) / total)
        assert an.relative_error(w, r) == pytest.approx(expected, abs=1e-12)
        if r >= 1:
            low = an.truncated_svd(w, r)
            assert low.error == pytest.approx(expected, abs=1e-12)
            actual = float(torch.linalg.matrix_norm(w - low.matrix()) / torch.linalg.matrix_norm(w))
            assert actual == pytest.approx(expected, abs=1e-12)     # Eckart-Young: the error is attained


def test_truncated_svd_random_matrix_and_factors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 20, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    low = an.truncated_svd(w, 5)
    assert low.U.shape == (30, 5) and low.S.shape == (5,) and low.Vh.shape == (5, 20)
    assert low.error == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-12)
    B, A = low.lora_factors()
    assert B.shape == (30, 5) and A.shape == (5, 20)
    torch.testing.assert_close(B @ A, low.matrix(), atol=1e-12, rtol=0)
    # asking for more than min(d, k) caps the rank; factors are zero-padded to the requested rank
    full = an.truncated_svd(w, 50)
    assert full.S.numel() == 20 and full.error == 0.0
    B, A = full.lora_factors(24)
    assert B.shape == (30, 24) and A.shape == (24, 20)
    assert torch.all(B[:, 20:] == 0) and torch.all(A[20:] == 0)
    torch.testing.assert_close(B @ A, w, atol=1e-10, rtol=0)
    with pytest.raises(lorakit.LoraError):
        an.truncated_svd(w, 0)


def test_random_matrix_is_full_rank_and_products_are_not():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 25, generator=g)
    assert an.numerical_rank(w) == 25
    assert an.effective_rank(w, 0.5) <= an.effective_rank(w, 0.9) <= an.effective_rank(w, 0.99) <= 25
    assert an.numerical_rank(low_rank(40, 25, 3, seed=2)) == 3
    c = an.energy(w)
    assert torch.all(c[1:] >= c[:-1]) and float(c[-1]) == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------ analyze
def tuned_mlp(rank: int, seed: int = 0):
    torch.manual_seed(seed)
    base = MLP((16, 32, 24, 10))
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for i, layer in enumerate(tuned.layers):
            layer.weight += low_rank(*layer.weight.shape, rank, seed=10 + i)
    return base, tuned


def test_analyze_exact_rank_updates():
    base, tuned = tuned_mlp(rank=2)
    layers = an.analyze(base, tuned, ranks=(1, 2, 4), thresholds=(0.9, 1.0))
    assert [x.name for x in layers] == ["layers.0", "layers.1", "layers.2"]
    for x, b, t in zip(layers, base.layers, tuned.layers):
        assert x.kind == "linear" and x.shape == tuple(b.weight.shape) and x.full_rank == min(b.weight.shape)
        assert x.numerical_rank == 2
        assert x.effective_rank[1.0] == 2 and x.effective_rank[0.9] <= 2
        assert x.relative_error[1] > 0.05 and x.relative_error[2] < 1e-5 and x.relative_error[4] < 1e-5
        dw = (t.weight - b.weight).detach().double()
        assert x.norm == pytest.approx(float(dw.norm()), rel=1e-5)
        assert x.relative_norm == pytest.approx(float(dw.norm() / b.weight.detach().double().norm()), rel=1e-5)
    d = layers[0].to_dict()
    assert d["effective_rank"]["1.0"] == 2 and d["numerical_rank"] == 2 and len(d["top_singular_values"]) == 16


def test_analyze_weights_alone_and_filters():
    base, _ = tuned_mlp(rank=1)
    layers = an.analyze(base)
    assert [x.numerical_rank for x in layers] == [16, 24, 10]
    assert all(x.relative_norm is None for x in layers)
    assert [x.name for x in an.analyze(base, include=r"layers\.[01]", exclude=r"\.0$")] == ["layers.1"]
    with pytest.raises(lorakit.LoraError, match="regular expression"):
        an.analyze(base, include="(")


# ------------------------------------------------------------------------------ checkpoints
def save_sd(path, model_or_sd):
    from safetensors.torch import save_file
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_load_checkpoint_file_kinds_and_errors(tmp_path):
    sd = {"enc.weight": torch.randn(4, 3), "enc.bias": torch.randn(4), "proj": torch.randn(2, 5),
          "conv.weight": torch.randn(2, 3, 3, 3)}
    ck = an.load_checkpoint(save_sd(tmp_path / "m.safetensors", sd))
    assert ck.modules == {"enc": ("linear", "enc.weight"), "proj": ("matrix", "proj")}
    torch.testing.assert_close(ck.matrix("enc"), sd["enc.weight"])
    # a folder of shards is one checkpoint
    shards = tmp_path / "shards"
    shards.mkdir()
    save_sd(shards / "a.safetensors", {"x.weight": torch.ones(2, 2)})
    save_sd(shards / "b.safetensors", {"y.weight": torch.ones(3, 2)})
    assert set(an.load_checkpoint(shards).modules) == {"x", "y"}
    (tmp_path / "model.bin").write_bytes(b"not read")
    with pytest.raises(an.CheckpointError, match="pickle"):
        an.load_checkpoint(tmp_path / "model.bin")
    with pytest.raises(an.CheckpointError, match="no such file"):
        an.load_checkpoint(tmp_path / "missing")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(an.CheckpointError, match="bad.safetensors"):
        an.load_checkpoint(tmp_path / "bad.safetensors")


def test_pair_checkpoints_reports_every_mismatch(tmp_path):
    z = torch.zeros
    a = an.load_checkpoint({"l1.weight": z(4, 3), "l2.weight": z(2, 4), "x.weight": z(1, 1)})
    b = an.load_checkpoint({"l1.weight": z(4, 3), "l2.weight": z(3, 4), "y.weight": z(1, 1)})
    with pytest.raises(an.CheckpointError) as e:
        an.pair_checkpoints(a, b)
    msg = str(e.value)
    assert "'x'" in msg and "'y'" in msg and "l2: [2, 4] vs [3, 4]" in msg


def test_model_with_adapters_is_refused():
    base, _ = tuned_mlp(rank=1)
    lorakit.inject(base, lorakit.LoraConfig(r=2, target_modules=["layers.0"]))
    with pytest.raises(an.CheckpointError, match="unload"):
        an.load_checkpoint(base)


# ------------------------------------------------------------------------------ extraction
def test_extract_exact_rank_from_files_round_trips(tmp_path):
    base, tuned = tuned_mlp(rank=3, seed=1)
    with torch.no_grad():
        tuned.layers[2].weight.copy_(base.layers[2].weight)     # unchanged layer: not adapted
        tuned.layers[1].bias += 0.5                              # a bias cannot be carried by LoRA
    b_file, t_file = save_sd(tmp_path / "base.safetensors", base), save_sd(tmp_path / "tuned.safetensors", tuned)
    res = an.extract_lora(b_file, t_file, 3, tmp_path / "adapter")
    assert [x.name for x in res.layers] == ["layers.0", "layers.1"]
    assert all(x.rank == 3 and x.relative_error < 1e-5 and x.relative_weight_error < 1e-6 for x in res.layers)
    assert res.unchanged == ["layers.2"] and res.not_captured == ["layers.1.bias"]
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3 and cfg["target_modules"] == ["layers.0", "layers.1"]
    report = json.loads((tmp_path / "adapter" / "extraction_report.json").read_text())
    assert report["layers"][0]["name"] == "layers.0" and report["not_captured"] == ["layers.1.bias"]

    with torch.no_grad():
        tuned.layers[1].bias.copy_(base.layers[1].bias)          # compare the part LoRA can carry
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path / "adapter")
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), tuned(x), atol=1e-5, rtol=1e-5)
        for layer, t in zip(model.layers[:2], tuned.layers[:2]):   # delta = scale * B A = W_tuned - W_base
            torch.testing.assert_close(layer.weight + layer.delta_weight("default"), t.weight, atol=1e-6, rtol=0)


def test_extract_low_rank_reports_the_error_it_makes(tmp_path):
    base, tuned = tuned_mlp(rank=6, seed=2)
    res = an.extract_lora(base, tuned, 2, tmp_path / "a")
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path / "a")
    for x, layer, b, t in zip(res.layers, model.layers, base.layers, tuned.layers):
        dw = (t.weight - b.weight).detach().double()
        err = float((dw - layer.delta_weight("default").double()).norm() / dw.norm())
        assert x.relative_error == pytest.approx(err, rel=1e-4)
        assert x.relative_error == pytest.approx(an.relative_error(dw, 2), rel=1e-4)
        assert 0.05 < x.relative_error < 1


def test_extract_error_includes_the_saved_dtype(tmp_path):
    from safetensors.torch import load_file
    base, tuned = tuned_mlp(rank=2, seed=3)
    res = an.extract_lora(base, tuned, 2, tmp_path / "a", dtype=torch.bfloat16)
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    for x, b, t in zip(res.layers, base.layers, tuned.layers):
        B = sd[f"base_model.model.{x.name}.lora_B.weight"]
        A = sd[f"base_model.model.{x.name}.lora_A.weight"]
        assert A.dtype == B.dtype == torch.bfloat16
        dw = (t.weight - b.weight).detach().double()
        err = float((dw - B.double() @ A.double()).norm() / dw.norm())
        assert x.relative_error == pytest.approx(err, rel=1e-3)
        assert 1e-4 < x.relative_error < 2e-2                       # bf16 rounding, not the SVD, dominates


def test_extract_conv_from_module(tmp_path):
    torch.manual_seed(0)
    base = CNN()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            w = getattr(tuned, name).weight                      # (out, in, kh, kw): rank 2 as (out, in*kh*kw)
            w += low_rank(w.shape[0], w[0].numel(), 2, seed=5).reshape(w.shape)
    res = an.extract_lora(base, tuned, 2, tmp_path / "a", dtype=torch.float32)
    assert {x.name: x.kind for x in res.layers} == {"conv1": "conv", "conv2": "conv"}
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path / "a")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), tuned(x), atol=1e-5, rtol=1e-5)


def perturb_hf(model, rank: int, skip=()):
    """Add an exact rank-``rank`` update (in the (d, k) view) to every 2-D weight not in ``skip``."""
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(tuned.named_parameters())):
            if p.dim() == 2 and not any(s in name for s in skip):
                p += low_rank(*p.shape, rank, seed=100 + i, scale=0.05)
    return tuned


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
def test_extract_from_hf_folders_reproduces_tuned_model(tmp_path, build):
    base = build()
    tuned = perturb_hf(base, rank=3)          # every Linear / Conv1D / Embedding, tied ones included
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    res = an.extract_lora(tmp_path / "base", tmp_path / "tuned", 3, tmp_path / "adapter")
    kinds = {x.kind for x in res.layers}
    assert kinds == ({"conv1d", "embedding", "linear"} if build is tiny_gpt2 else {"embedding", "linear"})
    assert max(x.relative_error for x in res.layers) < 1e-5 and not res.not_captured
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (build is tiny_gpt2) and cfg["task_type"] == "CAUSAL_LM"

    model = build()
    lorakit.load_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tuned(ids).logits
        torch.testing.assert_close(model(ids).logits, want, atol=2e-5, rtol=1e-5)
        assert (base(ids).logits - want).abs().max() > 1e-2         # the update matters


def test_extracted_adapter_loads_in_peft(tmp_path):
    import peft
    base = tiny_gpt2()
    tuned = perturb_hf(base, rank=2, skip=("wte", "wpe"))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    an.extract_lora(tmp_path / "base", tmp_path / "tuned", 2, tmp_path / "adapter", exclude="lm_head")
    model = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "adapter"))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tuned(ids).logits, atol=2e-5, rtol=1e-5)


def test_extract_errors(tmp_path):
    base, _ = tuned_mlp(rank=1)
    with pytest.raises(an.CheckpointError, match="nothing to extract"):
        an.extract_lora(base, copy.deepcopy(base), 2, tmp_path / "a")
    with pytest.raises(lorakit.LoraError, match="rank"):
        an.extract_lora(base, base, 0, tmp_path / "a")
    assert not (tmp_path / "a").exists()
