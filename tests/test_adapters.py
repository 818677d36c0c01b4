"""Model-level verbs: several adapters, set_adapter, delete_adapter, disable_adapters, merge,
unmerge, unload, modules_to_save switching."""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import CNN, randomize_adapters, run, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.layers import LoraLayer, SavedModule

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))




def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def two_adapters():
    """tiny Llama with "a" (r=2 on q, v) and "b" (r=6 on q, v, o, up), random A and B; the base twin."""
    model, base = tiny_llama(), tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), name="a")
    lorakit.inject(model, lorakit.LoraConfig(r=6, alpha=3, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]),
                   name="b")
    randomize_adapters(model)
    return model, base


# ---------------------------------------------------------------------------- several adapters
def test_several_adapters_of_different_ranks_switch_by_pointer():
    model, base = two_adapters()
    q = model.model.layers[0].self_attn.q_proj
    assert q.adapters["a"].lora_A.shape == (2, 32) and q.adapters["b"].lora_A.shape == (6, 32)
    assert lorakit.adapter_names(model) == ["a", "b"] and lorakit.active_adapter(model) == "a"
    out_a = run(model)
    tensors = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    lorakit.set_adapter(model, "b")
    assert lorakit.active_adapter(model) == "b"
    for k, v in model.state_dict().items():            # nothing copied, nothing changed
        assert v.data_ptr() == tensors[k][0] and torch.equal(v, tensors[k][1])
    out_b = run(model)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_b, run(base))
    lorakit.set_adapter(model, "a")
    assert torch.equal(run(model), out_a)
    # each adapter computes what it computes alone: drop the other one and compare
    only_a = copy.deepcopy(model)
    lorakit.delete_adapter(only_a, "b")
    assert torch.equal(run(only_a), out_a)
    only_b = copy.deepcopy(model)
    lorakit.delete_adapter(only_b, "a")
    assert lorakit.active_adapter(only_b) == "b" and torch.equal(run(only_b), out_b)


def test_unknown_names_list_the_available_ones():
    model, _ = two_adapters()
    for verb in (lorakit.set_adapter, lorakit.delete_adapter, lorakit.get_config, lorakit.set_trainable,
                 lambda m, n: lorakit.merge(m, n), lambda m, n: list(lorakit.adapter_parameters(m, n))):
        with pytest.raises(lorakit.AdapterNotFound, match=r"no adapter named 'c'; available adapters: \['a', 'b'\]"):
            verb(model, "c")
    assert lorakit.active_adapter(model) == "a"
    plain = tiny_llama()
    with pytest.raises(lorakit.AdapterNotFound, match="has no LoRA adapters"):
        lorakit.set_adapter(plain, "a")
    assert lorakit.adapter_names(plain) == [] and lorakit.active_adapter(plain) is None


def test_delete_adapter_restores_plain_modules_where_none_is_left():
    model, base = two_adapters()
    lorakit.delete_adapter(model, "a")                  # the active one: "b" takes over
    assert lorakit.adapter_names(model) == ["b"] and lorakit.active_adapter(model) == "b"
    assert "a" not in model.model.layers[0].self_attn.q_proj.adapters
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == [] and lorakit.active_adapter(model) is None
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    sd, base_sd = model.state_dict(), base.state_dict()
    assert sd.keys() == base_sd.keys() and all(torch.equal(sd[k], base_sd[k]) for k in sd)
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]), name="again")   # usable again
    assert lorakit.active_adapter(model) == "again"


def test_delete_keeps_layers_other_adapters_still_use():
    model, _ = two_adapters()
    lorakit.delete_adapter(model, "b")
    layer0 = model.model.layers[0]
    assert isinstance(layer0.self_attn.q_proj, LoraLayer) and isinstance(layer0.self_attn.o_proj, nn.Linear)
    assert isinstance(layer0.mlp.up_proj, nn.Linear)


# ---------------------------------------------------------------------------- disable_adapters
def test_disable_adapters_is_exactly_the_base_and_restores_on_error():
    model, base = two_adapters()
    expected_base, out_a = run(base), run(model)
    with lorakit.disable_adapters(model) as m:
        assert m is model and torch.equal(run(model), expected_base)
        with lorakit.disable_adapters(model):           # nested
            assert torch.equal(run(model), expected_base)
        assert torch.equal(run(model), expected_base)
    assert torch.equal(run(model), out_a)
    with pytest.raises(KeyError, match="boom"):
        with lorakit.disable_adapters(model):
            raise KeyError("boom")
    assert torch.equal(run(model), out_a) and lorakit.active_adapter(model) == "a"


def test_disable_adapters_also_covers_modules_to_save():
    model, base = tiny_bert(), tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["query"], modules_to_save=["pooler"]))
    randomize_adapters(model)
    with torch.no_grad():
        for p in model.pooler.copies["default"].parameters():
            p.add_(0.3)
    adapted = model(IDS).pooler_output
    with lorakit.disable_adapters(model):
        assert torch.equal(model(IDS).pooler_output, base(IDS).pooler_output)
    assert torch.equal(model(IDS).pooler_output, adapted)


# ---------------------------------------------------------------------------- merge / unmerge
MERGE_CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], IDS),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "wpe"], IDS),
    "bert": (tiny_bert, ["query", "value", "dense"], IDS),
    "cnn": (CNN, ["conv1", "conv2", "seq", "head"],
            torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_matches_unmerged_and_unmerge_restores(case):
    build, targets, x = MERGE_CASES[case]
    model = build()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize_adapters(model, std=0.3)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = run(model, x)
    lorakit.merge(model)
    assert all(layer.merged_name == "default" for layer in model.modules() if isinstance(layer, LoraLayer))
    assert rel_err(run(model, x), unmerged) < 1e-5
    merged_w = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(merged_w[k], w0[k]) for k in w0)
    with pytest.raises(lorakit.MergedStateError, match="'default' is already merged"):
        lorakit.merge(model)                            # refused, not a silent double add
    assert all(torch.equal(v, merged_w[k]) for k, v in model.state_dict().items())
    lorakit.unmerge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, w0[k], rtol=0, atol=2e-6)
    assert rel_err(run(model, x), unmerged) < 1e-6
    lorakit.unmerge(model)                              # nothing merged: a no-op
    lorakit.merge(model)                                # and merging again after unmerge is fine
    assert rel_err(run(model, x), unmerged) < 1e-5


def test_merging_into_a_tied_weight_is_refused():
    model = tiny_gpt2()                                 # wte.weight is lm_head.weight
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["c_attn", "wte"]))
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.LoraError, match=r"transformer\.wte\.weight is tied to lm_head\.weight"):
        lorakit.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.merged_name for m in model.modules() if isinstance(m, LoraLayer))
    with pytest.raises(lorakit.LoraError, match="tied"):
        lorakit.unload(model, merge=True)
    assert isinstance(model.transformer.wte, LoraLayer)


def test_while_merged_switching_disabling_deleting_loading_is_refused():
    model, _ = two_adapters()
    lorakit.merge(model, "b")                          # merging a named adapter makes it active
    assert lorakit.active_adapter(model) == "b"
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.MergedStateError, match="unmerge"):
        lorakit.set_adapter(model, "a")
    with pytest.raises(lorakit.MergedStateError, match="unmerge"):
        with lorakit.disable_adapters(model):
            pass
    with pytest.raises(lorakit.MergedStateError, match="unmerge"):
        lorakit.delete_adapter(model, "b")
    lorakit.set_adapter(model, "b")                    # already the merged one: fine
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    assert lorakit.active_adapter(model) == "b" and lorakit.adapter_names(model) == ["a", "b"]
    lorakit.delete_adapter(model, "a")                 # not the merged one: allowed


def test_merge_failure_half_way_is_undone(monkeypatch):
    model, _ = two_adapters()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    original = LoraLayer.merge

    def flaky(self, name):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return original(self, name)
    monkeypatch.setattr(LoraLayer, "merge", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        lorakit.merge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-6)
    assert not any(m.merged_name for m in model.modules() if isinstance(m, LoraLayer))
    monkeypatch.undo()
    lorakit.merge(model)                                # the state allows a normal merge afterwards


# ---------------------------------------------------------------------------- unload
def test_unload_without_merge_gives_back_the_base_model():
    model, base = two_adapters()
    plain = lorakit.unload(model)
    assert plain is model and lorakit.adapter_names(plain) == []
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    sd, base_sd = plain.state_dict(), base.state_dict()
    assert sd.keys() == base_sd.keys() and all(torch.equal(sd[k], base_sd[k]) for k in sd)
    with pytest.raises(lorakit.LoraError, match="no lorakit layers"):
        lorakit.unload(plain)


def test_unload_with_merge_keeps_the_adapted_function():
    model, base = tiny_bert(), tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["query", "value"], modules_to_save=["pooler"]))
    randomize_adapters(model, std=0.3)
    with torch.no_grad():
        for p in model.pooler.copies["default"].parameters():
            p.mul_(1.5)
    expected = model(IDS)
    plain = lorakit.unload(model, merge=True)
    assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    assert plain.state_dict().keys() == base.state_dict().keys()
    got = plain(IDS)
    assert rel_err(got.last_hidden_state, expected.last_hidden_state) < 1e-5
    assert rel_err(got.pooler_output, expected.pooler_output) < 1e-5


def test_unload_merged_model_without_merge_unmerges_first():
    model, base = two_adapters()
    lorakit.merge(model)
    plain = lorakit.unload(model, merge=False)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, base.state_dict()[k], rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------- parameters, configs
def test_adapter_parameters_set_trainable_and_get_config():
    model, _ = two_adapters()
    a_params = list(lorakit.adapter_parameters(model, "a"))
    assert len(a_params) == 2 * 4 and all(p.requires_grad for p in a_params)
    assert len(list(lorakit.adapter_parameters(model))) == 2 * 4            # the active one
    lorakit.set_trainable(model, "b", False)
    assert not any(p.requires_grad for p in lorakit.adapter_parameters(model, "b"))
    assert all(p.requires_grad for p in lorakit.adapter_parameters(model, "a"))
    lorakit.set_trainable(model, "b")
    assert all(p.requires_grad for p in lorakit.adapter_parameters(model, "b"))
    cfg = lorakit.get_config(model, "b")
    assert (cfg.r, cfg.alpha, cfg.target_modules) == (6, 3, ["o_proj", "q_proj", "up_proj", "v_proj"])
    assert lorakit.get_config(model).r == 2


def test_modules_to_save_switch_with_the_adapter():
    model = tiny_bert()
    for name, shift in (("a", 0.1), ("b", -0.2)):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["query"], modules_to_save=["pooler"]), name=name)
        with torch.no_grad():
            for p in model.pooler.copies[name].parameters():
                p.add_(shift)
    assert list(model.pooler.copies) == ["a", "b"]
    assert model.pooler.current() is model.pooler.copies["a"]
    pooled_a = model(IDS).pooler_output
    lorakit.set_adapter(model, "b")
    assert model.pooler.current() is model.pooler.copies["b"]
    assert not torch.allclose(model(IDS).pooler_output, pooled_a)
    lorakit.delete_adapter(model, "a")
    lorakit.delete_adapter(model, "b")
    assert isinstance(model.pooler, nn.Module) and not isinstance(model.pooler, SavedModule)


# ---------------------------------------------------------------------------- the API guide runs
def test_api_guide_examples_run(tmp_path, monkeypatch):
    """docs/api.md: every ```python block, in order, as one script (so the guide cannot rot)."""
    guide = Path(__file__).resolve().parent.parent / "docs" / "api.md"
    blocks = re.findall(r"^```python\n(.*?)^```", guide.read_text(), flags=re.S | re.M)
    assert len(blocks) >= 12
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace = {"__name__": "api_guide"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{guide}:block{i}", "exec"), namespace)


# ---------------------------------------------------------------------------- copies, casts, devices
def test_deepcopy_is_independent_and_casts_follow_the_model():
    model, base = two_adapters()
    twin = copy.deepcopy(model)
    lorakit.set_adapter(twin, "b")
    lorakit.delete_adapter(twin, "a")
    assert lorakit.active_adapter(model) == "a" and lorakit.adapter_names(model) == ["a", "b"]
    assert lorakit.adapter_names(twin) == ["b"]
    out = run(model)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in lorakit.adapter_parameters(model))
    torch.testing.assert_close(run(model).float(), out, rtol=1e-5, atol=1e-5)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(run(model).float(), run(base), rtol=1e-5, atol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_inject_disable_merge_unmerge(dtype):
    base, model = tiny_llama().to("cuda", dtype), tiny_llama().to("cuda", dtype)
    ids = IDS.cuda()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", adapter_dtype="float32"))
    assert all(p.is_cuda and p.dtype == torch.float32 for p in lorakit.adapter_parameters(model))
    # B = 0: the base function. Few rows run the one-launch kernel (lorakit.kernels.skinny), whose
    # x W0^T is summed in another order than cuBLAS's: equal to rounding, not bit for bit.
    assert rel_err(run(model, ids).float(), run(base, ids).float()) < (1e-6 if dtype == torch.float32 else 1e-2)
    randomize_adapters(model, std=0.1)
    out = run(model, ids)
    with lorakit.disable_adapters(model):
        assert torch.equal(run(model, ids), run(base, ids))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.merge(model)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(run(model, ids).float(), out.float()) < tol
    lorakit.unmerge(model)
    for k, v in model.state_dict().items():
        # float32: rounding only; bfloat16: W0 + d rounds once on merge and once on unmerge
        torch.testing.assert_close(v, w0[k], rtol=0 if dtype == torch.float32 else 1e-2,
                                   atol=2e-6 if dtype == torch.float32 else 1e-2)
