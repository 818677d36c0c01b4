"""inject: exact outputs right after, what trains and how much, base weights never change,
target matching (PEFT's rules), and bad input that leaves the model exactly as it was."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CNN, MLP, assert_unchanged, seeded, snapshot, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.layers import LoraLayer, SavedModule

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(model, x):
    out = model(x)
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out




# name: (model builder, LoraConfig kwargs, input)
CASES = {
    "llama-qv": (tiny_llama, dict(target_modules=["q_proj", "v_proj"]), IDS),
    "llama-all+embed": (tiny_llama, dict(target_modules=LLAMA_ALL + ["embed_tokens"]), IDS),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"]), IDS),
    "gpt2-wte": (tiny_gpt2, dict(target_modules=["wte"]), IDS),
    "bert": (tiny_bert, dict(target_modules=["query", "value", "dense"]), IDS),
    "mlp": (seeded(MLP), dict(target_modules="all-linear"), torch.randn(3, 16)),
    "cnn": (seeded(CNN), dict(target_modules=["conv1", "conv2", "seq", "head"]), torch.randn(2, 3, 8, 8)),
}






def expected_trainable(base_model: nn.Module, ranks: dict[str, int]) -> int:
    """sum over adapted layers of r * (d + k), from the *original* modules' shapes."""
    total = 0
    for path, r in ranks.items():
        m = base_model.get_submodule(path)
        if isinstance(m, nn.Embedding):
            total += r * (m.num_embeddings + m.embedding_dim)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            total += r * (m.in_channels * math.prod(m.kernel_size) + m.out_channels)
        elif isinstance(m, nn.Linear):
            total += r * (m.in_features + m.out_features)
        else:                                   # GPT-2 Conv1D: weight (k, d)
            total += r * (m.weight.shape[0] + m.weight.shape[1])
    return total


def adapted_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


# ---------------------------------------------------------------------------- exactness, counts
@pytest.mark.parametrize("case", CASES)
def test_inject_output_equals_base_exactly_and_counts_match(case):
    build, kwargs, x = CASES[case]
    model = build()
    base = build()                               # same seed: an untouched twin
    with torch.no_grad():
        expected = run(base, x)
    out = lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, **kwargs))
    assert out is model
    with torch.no_grad():
        assert torch.equal(run(model, x), expected)
    paths = adapted_paths(model)
    assert paths
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(paths)
    report = lorakit.parameter_report(model)
    assert report.trainable == expected_trainable(base, {p: 4 for p in paths})
    assert report.total == sum(p.numel() for p in base.parameters()) + report.trainable   # tied weights once


def test_rank_pattern_and_alpha_pattern_per_module():
    model, base = tiny_llama(), tiny_llama()
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                             rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                             alpha_pattern={"q_proj": 3})
    lorakit.inject(model, cfg)
    ranks = {p: model.get_submodule(p).adapters["default"].r for p in adapted_paths(model)}
    assert ranks == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 2,
                     "model.layers.1.self_attn.q_proj": 6, "model.layers.1.self_attn.v_proj": 2}
    scales = {p: model.get_submodule(p).adapters["default"].scale for p in ranks}
    assert scales == {"model.layers.0.self_attn.q_proj": 3 / 4, "model.layers.0.self_attn.v_proj": 8 / 2,
                      "model.layers.1.self_attn.q_proj": 3 / 6, "model.layers.1.self_attn.v_proj": 8 / 2}
    assert lorakit.parameter_report(model).trainable == expected_trainable(base, ranks)


def test_rslora_scale():
    model = lorakit.inject(MLP(), lorakit.LoraConfig(r=16, alpha=8, use_rslora=True, target_modules="all-linear"))
    assert {model.get_submodule(p).adapters["default"].scale for p in adapted_paths(model)} == {8 / 4}


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("case", ["llama-all+embed", "gpt2-conv1d", "cnn"])
def test_training_never_changes_base_weights(case):
    build, kwargs, x = CASES[case]
    model = build().train()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, dropout=0.1, **kwargs))
    base_before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    adapters_before = [p.detach().clone() for p in lorakit.adapter_parameters(model)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = run(model, x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        if ".adapters." not in k:
            assert torch.equal(v, base_before[k]), f"base tensor {k} changed"
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)
    changed = [not torch.equal(a, p) for a, p in zip(adapters_before, lorakit.adapter_parameters(model))]
    assert all(changed)


# ---------------------------------------------------------------------------- matching rules
def targets(model, **kwargs) -> list[str]:
    lorakit.inject(model, lorakit.LoraConfig(**kwargs))
    return adapted_paths(model)


class Names(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.xq_proj = nn.Linear(4, 4)
        self.block = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "out": nn.Linear(4, 4)})


def test_list_entries_match_exactly_or_as_dotted_suffix():
    assert targets(Names(), target_modules=["q_proj"]) == ["q_proj", "block.q_proj"]       # not xq_proj
    assert targets(Names(), target_modules=["block.q_proj"]) == ["block.q_proj"]
    assert targets(tiny_llama(), target_modules=["self_attn.q_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert targets(tiny_llama(), target_modules=["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]


def test_string_is_a_full_match_regex():
    assert targets(tiny_llama(), target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    assert targets(Names(), target_modules=r".*q_proj") == ["q_proj", "xq_proj", "block.q_proj"]
    with pytest.raises(lorakit.TargetNotFound):          # full match: "q_proj" is not a substring search
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules="q_proj"))


def test_all_linear_skips_the_output_head():
    llama = targets(tiny_llama(), target_modules="all-linear")
    assert len(llama) == 2 * 7 and "lm_head" not in llama
    gpt2 = targets(tiny_gpt2(), target_modules="ALL-LINEAR")     # any case, as PEFT
    assert sorted({p.split(".", 3)[-1] for p in gpt2}) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert "lm_head" not in gpt2
    assert targets(MLP(), target_modules="all-linear") == ["layers.0", "layers.1", "layers.2"]   # no head to skip


def test_all_linear_skips_seq_cls_head_and_multihead_attention_out_proj():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.attn = nn.MultiheadAttention(4, 2)
            self.classifier = nn.Linear(4, 2)
    assert targets(Classifier(), target_modules="all-linear", task_type="SEQ_CLS") == ["body"]
    assert targets(Classifier(), target_modules="all-linear") == ["body", "classifier"]


def test_exclude_modules_list_and_regex():
    paths = targets(tiny_llama(), target_modules="all-linear", exclude_modules=["down_proj", "self_attn.o_proj"])
    assert len(paths) == 2 * 5 and not any(p.endswith(("down_proj", "o_proj")) for p in paths)
    paths = targets(tiny_llama(), target_modules=["q_proj", "v_proj"], exclude_modules=r"model\.layers\.0\..*")
    assert paths == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_modules_to_save_are_never_adapted_and_train_in_full():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["dense"], modules_to_save=["pooler"]))
    assert isinstance(model.pooler, SavedModule)
    assert not any(p.startswith("pooler") for p in adapted_paths(model))
    assert all(p.requires_grad for p in model.pooler.copies["default"].parameters())
    assert not any(p.requires_grad for p in model.pooler.base.parameters())


def test_default_targets_for_known_models():
    assert targets(tiny_llama(), target_modules=None)[:2] == ["model.layers.0.self_attn.q_proj",
                                                              "model.layers.0.self_attn.v_proj"]
    assert {p.rsplit(".", 1)[-1] for p in targets(tiny_gpt2())} == {"c_attn"}
    assert {p.rsplit(".", 1)[-1] for p in targets(tiny_bert())} == {"query", "value"}
    with pytest.raises(lorakit.ConfigError, match="target_modules is not set"):
        lorakit.inject(MLP(), lorakit.LoraConfig())


def test_second_adapter_reuses_layers_and_never_switches():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="a")
    q = model.model.layers[0].self_attn.q_proj
    lorakit.inject(model, lorakit.LoraConfig(r=5, target_modules=["q_proj", "v_proj"]), name="b")
    assert model.model.layers[0].self_attn.q_proj is q and list(q.adapters) == ["a", "b"]
    assert q.adapters["b"].r == 5 and lorakit.active_adapter(model) == "a"
    assert lorakit.adapter_names(model) == ["a", "b"]
    assert lorakit.get_config(model, "b").target_modules == ["q_proj", "v_proj"]


# ---------------------------------------------------------------------------- bad input
def test_target_matching_nothing_lists_patterns_and_existing_names():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(lorakit.TargetNotFound) as e:
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["qproj", "attn.v"]))
    msg = str(e.value)
    assert "qproj" in msg and "attn.v" in msg and "q_proj" in msg and "down_proj" in msg
    assert isinstance(e.value, lorakit.LoraError) and isinstance(e.value, ValueError)
    assert_unchanged(model, before)


def test_single_layer_model_needs_a_container():
    with pytest.raises(lorakit.TargetNotFound, match="nn.Sequential"):
        lorakit.inject(nn.Linear(4, 4), lorakit.LoraConfig(target_modules="all-linear"))


@pytest.mark.parametrize("targets_, fragment", [
    (["mlp"], "model.layers.0.mlp (LlamaMLP"),
    (r".*_proj|.*input_layernorm", "model.layers.1.input_layernorm (LlamaRMSNorm"),
])
def test_unsupported_module_matched_names_path_and_type(targets_, fragment):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(lorakit.UnsupportedModule) as e:
        lorakit.inject(model, lorakit.LoraConfig(target_modules=targets_))
    assert fragment in str(e.value)
    assert_unchanged(model, before)


def test_unsupported_conv_or_attention_leaves_earlier_targets_untouched():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.grouped = nn.Conv1d(4, 4, 3, groups=2)
            self.attn = nn.MultiheadAttention(4, 2)
    for pattern, fragment in ((["a", "grouped"], "grouped (Conv1d: grouped convolutions (groups=2)"),
                              (["a", "out_proj"], "attn.out_proj (NonDynamicallyQuantizableLinear: nn.Multihead")):
        model = Net()
        before = snapshot(model)
        with pytest.raises(lorakit.UnsupportedModule) as e:
            lorakit.inject(model, lorakit.LoraConfig(target_modules=pattern))
        assert fragment in str(e.value)
        assert_unchanged(model, before)


def test_duplicate_and_invalid_names_and_bad_config():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]), name="a")
    before = snapshot(model)
    with pytest.raises(lorakit.AdapterExists, match="'a' already exists"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["v_proj"]), name="a")
    for bad in ("", "a b", "../x", "x" * 65, "-a", None):
        with pytest.raises(lorakit.ConfigError, match="invalid adapter name"):
            lorakit.inject(model, lorakit.LoraConfig(target_modules=["v_proj"]), name=bad)
    with pytest.raises(lorakit.ConfigError, match="must be a lorakit.LoraConfig"):
        lorakit.inject(model, {"r": 8, "target_modules": ["v_proj"]}, name="b")
    with pytest.raises(lorakit.ConfigError, match="r must be an integer >= 1, got 0"):
        lorakit.LoraConfig(r=0)
    assert_unchanged(model, before)


def test_modules_to_save_conflicts_are_refused_before_any_change():
    model = tiny_bert()
    with pytest.raises(lorakit.TargetNotFound, match="modules_to_save \\['classifier'\\]"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["pooler.dense"]), name="a")
    before = snapshot(model)
    with pytest.raises(lorakit.ConfigError, match="hold LoRA layers"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["query"], modules_to_save=["pooler"]), name="b")
    assert_unchanged(model, before)
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["query"], modules_to_save=["pooler"]), name="a")
    before = snapshot(model)
    with pytest.raises(lorakit.UnsupportedModule, match="pooler .*modules_to_save"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["pooler"]), name="b")
    assert_unchanged(model, before)


def test_failure_half_way_is_rolled_back(monkeypatch):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]), name="a")
    before = snapshot(model)
    calls = []
    original = LoraLayer.add_adapter

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return original(self, *args, **kwargs)
    monkeypatch.setattr(LoraLayer, "add_adapter", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj", "v_proj"]), name="b")
    assert_unchanged(model, before)


def test_inject_while_merged_is_refused():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]))
    lorakit.merge(model)
    before = snapshot(model)
    with pytest.raises(lorakit.MergedStateError, match="unmerge"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["v_proj"]), name="b")
    assert_unchanged(model, before)
