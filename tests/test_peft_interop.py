"""The files are the contract: adapters lorakit saves load in PEFT (no missing or unexpected key,
same outputs), adapters PEFT saves load in lorakit, both write the same adapter_config.json
fields, and "all-linear" selects the same modules in both."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import CNN, MLP, randomize_adapters, run, seeded, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import lorakit

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
IMG = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))






def peft_lora_keys(peft_model, name="default") -> dict:
    """What PEFT would save for adapter ``name`` (its own get_peft_model_state_dict)."""
    from peft.utils import get_peft_model_state_dict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)


# ---------------------------------------------------------------------------- lorakit -> PEFT
TO_PEFT = {
    "llama-qv-embed": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"]), IDS),
    "llama-patterns-rslora": (tiny_llama, dict(target_modules="all-linear", use_rslora=True,
                                               rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 7},
                                               alpha_pattern={"q_proj": 3}), IDS),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"]), IDS),
    "bert-modules-to-save": (tiny_bert, dict(target_modules=["query", "value"], modules_to_save=["pooler"]), IDS),
    "cnn-conv": (seeded(CNN), dict(target_modules=["conv1", "conv2", "seq", "head"]), IMG),
}


@pytest.mark.parametrize("case", TO_PEFT)
def test_lorakit_adapter_loads_in_peft(case, tmp_path):
    build, kwargs, x = TO_PEFT[case]
    model = build()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, **kwargs))
    randomize_adapters(model, std=0.3)
    with torch.no_grad():
        for saved in (m for m in model.modules() if isinstance(m, lorakit.SavedModule)):
            for p in saved.copies["default"].parameters():
                p.add_(0.2)
    expected = run(model, x)
    lorakit.save_adapter(model, tmp_path)
    file = load_file(tmp_path / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(build(), tmp_path)
    pm.eval()
    got = peft_lora_keys(pm)
    assert sorted(got) == sorted(file), "PEFT's adapter has other keys than lorakit's file (missing/unexpected)"
    assert all(torch.equal(got[k], file[k]) for k in file)
    torch.testing.assert_close(run(pm, x), expected, rtol=0, atol=1e-6)


def test_lorakit_merge_equals_peft_merge_and_unload(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    randomize_adapters(model, std=0.3)
    lorakit.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).merge_and_unload()
    merged = lorakit.unload(model, merge=True)
    sd, ref = merged.state_dict(), merged_peft.state_dict()
    assert sd.keys() == ref.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- PEFT -> lorakit
FROM_PEFT = {
    "plain": (tiny_llama, dict(target_modules=["q_proj", "v_proj"]), IDS),
    "rslora": (tiny_llama, dict(target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True, r=16), IDS),
    "rank-alpha-pattern": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "up_proj"],
                                            rank_pattern={"v_proj": 2, r"layers\.0\.mlp\.up_proj": 6},
                                            alpha_pattern={"up_proj": 2, "q_proj": 32}), IDS),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), IDS),
    "embedding": (tiny_llama, dict(target_modules=["embed_tokens", "o_proj"]), IDS),
    "modules-to-save": (tiny_bert, dict(target_modules=["query"], modules_to_save=["pooler"]), IDS),
    "all-linear": (tiny_llama, dict(target_modules="all-linear"), IDS),
    "conv": (seeded(CNN), dict(target_modules=["conv1", "seq"]), IMG),
}


@pytest.mark.parametrize("case", FROM_PEFT)
def test_peft_adapter_loads_in_lorakit(case, tmp_path):
    build, kwargs, x = FROM_PEFT[case]
    kwargs = {"r": 4, "lora_alpha": 8, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
        randomize_adapters(pm, std=0.3)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(0.2)
        pm.eval()
        expected = run(pm, x)
        pm.save_pretrained(tmp_path)
    model = build()
    lorakit.load_adapter(model, tmp_path)
    torch.testing.assert_close(run(model, x), expected, rtol=0, atol=1e-6)
    ours = lorakit.lora_state_dict(model)
    theirs = peft_lora_keys(pm)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_peft_non_default_adapter_name_in_subfolder(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
        pm.add_adapter("js", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"]))
        randomize_adapters(pm, std=0.3)
        pm.set_adapter("js")
        pm.eval()
        expected_js = run(pm)
        pm.save_pretrained(tmp_path)                       # default at the top, "js" in tmp_path/js
    assert (tmp_path / "js" / "adapter_model.safetensors").exists()
    model = tiny_llama()
    assert lorakit.load_adapter(model, tmp_path, name="js") == "js"
    lorakit.load_adapter(model, tmp_path)                  # the default one, next to it
    assert lorakit.adapter_names(model) == ["js", "default"] and lorakit.active_adapter(model) == "js"
    torch.testing.assert_close(run(model), expected_js, rtol=0, atol=1e-6)
    lorakit.set_adapter(model, "default")
    pm.set_adapter("default")
    torch.testing.assert_close(run(model), run(pm), rtol=0, atol=1e-6)
    # the top-level adapter under another name: point at its file
    lorakit.load_adapter(model, tmp_path / "adapter_model.safetensors", name="js2")
    assert lorakit.get_config(model, "js2").target_modules == ["q_proj"]


# ---------------------------------------------------------------------------- the config file
ISSUE_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora",
                "rank_pattern", "alpha_pattern", "fan_in_fan_out", "modules_to_save", "base_model_name_or_path",
                "task_type", "init_lora_weights", "use_dora", "exclude_modules", "inference_mode",
                "layers_to_transform", "layers_pattern", "revision")


@pytest.mark.parametrize("build, kwargs", [
    (tiny_llama, dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True,
                      rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4}, task_type="CAUSAL_LM")),
    (tiny_gpt2, dict(r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True)),
    (tiny_bert, dict(r=8, lora_alpha=16, target_modules=["query"], modules_to_save=["pooler"])),
], ids=["llama", "gpt2", "bert"])
def test_adapter_config_fields_match_peft(build, kwargs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
        pm.save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours_kwargs = dict(r=kwargs["r"], alpha=kwargs["lora_alpha"], dropout=kwargs.get("lora_dropout", 0.0),
                       target_modules=kwargs["target_modules"], use_rslora=kwargs.get("use_rslora", False),
                       rank_pattern=kwargs.get("rank_pattern", {}), alpha_pattern=kwargs.get("alpha_pattern", {}),
                       modules_to_save=kwargs.get("modules_to_save"), task_type=kwargs.get("task_type"))
    model = lorakit.inject(build(), lorakit.LoraConfig(**ours_kwargs))
    lorakit.save_adapter(model, tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ours) <= set(theirs), f"fields PEFT does not know: {set(ours) - set(theirs)}"
    for field in ISSUE_FIELDS:
        a, b = ours[field], theirs[field]
        if field == "target_modules":
            a, b = sorted(a), sorted(b)
        assert a == b, (field, a, b)
    # and PEFT builds its own LoraConfig from our file
    loaded = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert loaded.peft_type == peft.PeftType.LORA and loaded.r == kwargs["r"]


# ---------------------------------------------------------------------------- all-linear
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert, MLP, seeded(CNN)],
                         ids=["llama", "gpt2", "bert", "mlp", "cnn"])
def test_all_linear_selects_the_same_modules_as_peft(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build(), peft.LoraConfig(target_modules="all-linear"))
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer))
    model = lorakit.inject(build(), lorakit.LoraConfig(target_modules="all-linear"))
    ours = sorted(n for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer))
    assert ours == theirs
