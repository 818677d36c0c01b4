"""Property-based tests (hypothesis) over shapes, ranks, alphas and options: the forward is the
formula, merge equals the unmerged forward, unmerge restores W0, the trainable count is
r (d + k), files round-trip exactly, and target matching agrees with PEFT's on any pattern list."""

from __future__ import annotations

import math
import tempfile

import torch
import torch.nn.functional as F
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from lorakit.inject import resolve_targets

# Bounded and deterministic: the suite stays fast and a failure reproduces on every run.
FAST = settings(max_examples=30, deadline=None, derandomize=True)

dims = st.integers(1, 24)
ranks = st.integers(1, 8)
alphas = st.floats(0.25, 64.0, allow_nan=False, allow_infinity=False)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return ((a - b).norm() <= rel * b.norm() + 1e-6).item()


def randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))


def gpt2_conv1d(k: int, d: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D
    m = Conv1D(d, k)
    nn.init.normal_(m.weight)
    return m


@FAST
@given(d=dims, k=dims, r=ranks, alpha=alphas, rslora=st.booleans(), bias=st.booleans(), conv1d=st.booleans(),
       lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), seed=st.integers(0, 2**16))
def test_linear_forward_merge_unmerge_and_count(d, k, r, alpha, rslora, bias, conv1d, lead, seed):
    torch.manual_seed(seed)
    base = gpt2_conv1d(k, d) if conv1d else nn.Linear(k, d, bias=bias)
    model = nn.Sequential(base)
    x = torch.randn(*lead, k)
    expected_base = model(x)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, use_rslora=rslora, target_modules=["0"]))
    assert torch.equal(model(x), expected_base)                       # B = 0: exact
    assert lorakit.parameter_report(model).trainable == r * (d + k)
    randomize(model, seed)
    a = model[0].adapters["default"]
    s = alpha / math.sqrt(r) if rslora else alpha / r
    assert a.scale == s
    w0 = base.weight.detach().clone()
    w_dk = w0.t() if conv1d else w0
    b = base.bias if base.bias is not None else 0
    expected = x @ w_dk.t() + b + s * (x @ a.lora_A.t() @ a.lora_B.t())
    y = model(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4 * max(1.0, s))
    lorakit.merge(model)
    assert close(model(x), y)
    lorakit.unmerge(model)
    torch.testing.assert_close(base.weight.detach(), w0, rtol=0, atol=1e-6 * max(1.0, s) * r)


@FAST
@given(n=dims, dim=dims, r=ranks, alpha=alphas, padding=st.booleans(), seed=st.integers(0, 2**16))
def test_embedding_forward_merge_and_count(n, dim, r, alpha, padding, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(n, dim, padding_idx=0 if padding else None))
    ids = torch.randint(0, n, (2, 5))
    expected_base = model(ids)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, target_modules=["0"]))
    assert torch.equal(model(ids), expected_base)
    assert lorakit.parameter_report(model).trainable == r * (n + dim)
    randomize(model, seed)
    a = model[0].adapters["default"]
    y = model(ids)
    torch.testing.assert_close(y, expected_base + (alpha / r) * (a.lora_A.t()[ids] @ a.lora_B.t()),
                               rtol=1e-4, atol=1e-4 * max(1.0, alpha / r))
    lorakit.merge(model)
    assert close(model(ids), y)


@FAST
@given(cin=st.integers(1, 5), cout=st.integers(1, 5), kernel=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.integers(0, 1), two_d=st.booleans(), r=ranks, alpha=alphas, seed=st.integers(0, 2**16))
def test_conv_merge_equals_unmerged(cin, cout, kernel, stride, padding, two_d, r, alpha, seed):
    torch.manual_seed(seed)
    conv = (nn.Conv2d if two_d else nn.Conv1d)(cin, cout, kernel, stride=stride, padding=padding)
    model = nn.Sequential(conv)
    x = torch.randn(2, cin, *([6] * (2 if two_d else 1)))
    expected_base = model(x)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, target_modules=["0"]))
    assert torch.equal(model(x), expected_base)
    assert lorakit.parameter_report(model).trainable == r * (cin * kernel ** (2 if two_d else 1) + cout)
    randomize(model, seed)
    y = model(x)
    fn = F.conv2d if two_d else F.conv1d
    merged_w = conv.weight + model[0].delta_weight("default")
    assert close(fn(x, merged_w, conv.bias, stride, padding), y)
    lorakit.merge(model)
    assert close(model(x), y)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(r=ranks, alpha=alphas, rslora=st.booleans(), v_rank=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_save_load_round_trip_is_exact(r, alpha, rslora, v_rank, seed):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Embedding(7, 6))
    cfg = lorakit.LoraConfig(r=r, alpha=alpha, use_rslora=rslora, target_modules=["0", "2", "3"],
                             rank_pattern={"2": v_rank})
    lorakit.inject(model, cfg)
    randomize(model, seed)
    fresh = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Embedding(7, 6))
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items()
                           if ".adapters." not in k})
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(model, tmp)
        lorakit.load_adapter(fresh, tmp)
    x = torch.randn(3, 6)
    assert torch.equal(fresh[2](fresh[1](fresh[0](x))), model[2](model[1](model[0](x))))
    for i in (0, 2, 3):
        a, b = model[i].adapters["default"], fresh[i].adapters["default"]
        assert (a.r, a.scale) == (b.r, b.scale) and torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


LLAMA = tiny_llama()
LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head",
          "self_attn.q_proj", "mlp.down_proj", "layers.1.mlp.up_proj", "model.layers.0.self_attn.v_proj", "proj",
          "layers.0.self_attn.k_proj"]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(targets=st.lists(st.sampled_from(LEAVES), min_size=1, max_size=4, unique=True),
       excluded=st.lists(st.sampled_from(LEAVES), max_size=2, unique=True))
def test_target_matching_agrees_with_peft(targets, excluded):
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists
    peft_cfg = peft.LoraConfig(target_modules=targets, exclude_modules=excluded or None)
    theirs = [n for n, _ in LLAMA.named_modules()
              if n and check_target_module_exists(peft_cfg, n) is True]
    try:
        ours = resolve_targets(LLAMA, lorakit.LoraConfig(target_modules=targets, exclude_modules=excluded or None))
    except lorakit.TargetNotFound:
        ours = []
    assert ours == theirs


@FAST
@given(r=ranks, alpha=alphas, dropout=st.floats(0, 0.9), rslora=st.booleans(),
       targets=st.lists(st.sampled_from(LEAVES[:7]), min_size=1, max_size=3, unique=True),
       rank_pattern=st.dictionaries(st.sampled_from(LEAVES[:7]), ranks, max_size=2),
       alpha_pattern=st.dictionaries(st.sampled_from(LEAVES[:7]), alphas, max_size=2))
def test_config_round_trips_through_peft_dict(r, alpha, dropout, rslora, targets, rank_pattern, alpha_pattern):
    cfg = lorakit.LoraConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=rslora, target_modules=targets,
                             rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    assert lorakit.LoraConfig.from_peft_dict(cfg.to_peft_dict()) == cfg
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert cfg.scale_for(path) == (cfg.alpha_for(path) / (math.sqrt(cfg.rank_for(path)) if rslora
                                                                else cfg.rank_for(path)))
