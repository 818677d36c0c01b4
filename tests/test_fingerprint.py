"""lorakit.fingerprint: the base-model fingerprint recorded at save and checked at load (warn by
default, refuse with strict_base=True, naming what differs; files without one load silently)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import MLP, randomize_adapters, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.fingerprint import (METADATA_KEY, BaseModelMismatch, BaseModelWarning, base_fingerprint, compare,
                                 decode)
from lorakit.inject import find_state
from lorakit.io import read_metadata

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def saved_llama(folder, seed=0, dtype=torch.float32):
    model = tiny_llama(seed=seed).to(dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    randomize_adapters(model)
    lorakit.save_adapter(model, folder)
    return model


def fingerprint_of(folder):
    return decode(read_metadata(folder / "adapter_model.safetensors"), str(folder))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_save_records_architecture_shapes_and_samples(tmp_path):
    saved_llama(tmp_path)
    fp = fingerprint_of(tmp_path)
    assert fp["architecture"] == "LlamaForCausalLM" and fp["version"] == 1 and fp["samples"] == 64
    mods = fp["modules"]
    assert sorted(mods) == sorted(["model.embed_tokens"] + [f"model.layers.{i}.self_attn.{p}"
                                                           for i in range(2) for p in ("q_proj", "v_proj")])
    assert mods["model.layers.0.self_attn.v_proj"]["shape"] == [16, 32]
    assert mods["model.embed_tokens"] == {"shape": [64, 32], "dtype": "float32",
                                          "sample": mods["model.embed_tokens"]["sample"]}
    assert all(len(m["sample"]) == 12 for m in mods.values())
    again = base_fingerprint(tiny_llama(seed=0), mods)                 # deterministic: same base, same digest
    assert again["modules"] == mods


def test_same_base_loads_silently(tmp_path):
    saved_llama(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(tiny_llama(seed=0), tmp_path, strict_base=True)
        lorakit.load_adapter(tiny_llama(seed=0), tmp_path)


def test_another_checkpoint_of_the_same_architecture_warns_or_is_refused(tmp_path):
    saved_llama(tmp_path)
    other = tiny_llama(seed=1)                                          # same shapes, other values
    with pytest.warns(BaseModelWarning) as w:
        lorakit.load_adapter(other, tmp_path)
    msg = str(w[0].message)
    assert "adapter_model.safetensors" in msg and "saved on a different base model" in msg
    assert "weight values: the sampled values of 5 of 5 adapted weights differ" in msg
    assert "model.embed_tokens" in msg and "strict_base=True" in msg
    assert w[0].filename == __file__                                   # points at the caller's line
    strict = tiny_llama(seed=1)
    before = snapshot(strict)
    with pytest.raises(BaseModelMismatch, match="weight values") as e:
        lorakit.load_adapter(strict, tmp_path, strict_base=True)
    assert isinstance(e.value, lorakit.LoraError) and "strict_base=False" in str(e.value)
    assert find_state(strict) is None and snapshot(strict).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(strict).items())


def test_one_changed_weight_is_named(tmp_path):
    saved_llama(tmp_path)
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(1.001)      # a fine-tune's small change
    with pytest.raises(BaseModelMismatch) as e:
        lorakit.load_adapter(model, tmp_path, strict_base=True)
    assert "1 of 5 adapted weights differ ['model.layers.1.self_attn.q_proj']" in str(e.value)


def test_another_architecture_is_named(tmp_path):
    class OtherMLP(MLP):
        pass

    torch.manual_seed(0)
    src = MLP()
    lorakit.inject(src, lorakit.LoraConfig(r=2, target_modules=["layers.0"]))
    lorakit.save_adapter(src, tmp_path)
    torch.manual_seed(0)
    with pytest.raises(BaseModelMismatch, match="architecture: saved on MLP, this model is OtherMLP"):
        lorakit.load_adapter(OtherMLP(), tmp_path, strict_base=True)


def test_compare_names_shapes_and_missing_modules(tmp_path):
    saved_llama(tmp_path)
    fp = fingerprint_of(tmp_path)
    fp["modules"]["model.layers.0.self_attn.q_proj"]["shape"] = [32, 31]
    fp["modules"]["model.layers.9.self_attn.q_proj"] = {"shape": [32, 32], "dtype": "float32", "sample": None}
    diffs = compare(fp, tiny_llama(seed=0))
    assert diffs == ["modules missing from this model: ['model.layers.9.self_attn.q_proj']",
                     "weight shapes: ['model.layers.0.self_attn.q_proj.weight saved [32, 31], now [32, 32]']"]


def test_dtypes_upcast_matches_downcast_is_not_compared(tmp_path):
    saved_llama(tmp_path / "bf16", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the same bfloat16 checkpoint upcast to float32: values are exactly comparable, and equal
        lorakit.load_adapter(tiny_llama(seed=0).to(torch.bfloat16).float(), tmp_path / "bf16")
        # an adapter saved on a float32 base, loaded on its bfloat16 copy: shapes checked, values not
        saved_llama(tmp_path / "f32")
        lorakit.load_adapter(tiny_llama(seed=0).to(torch.bfloat16), tmp_path / "f32")
    with pytest.warns(BaseModelWarning, match="weight values"):
        lorakit.load_adapter(tiny_llama(seed=1).float(), tmp_path / "bf16")


def test_files_without_a_fingerprint_load_silently(tmp_path):
    saved_llama(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})     # as PEFT writes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(tiny_llama(seed=1), tmp_path, strict_base=True)


@pytest.mark.parametrize("value,fragment", [
    ("{not json", "not valid JSON"),
    (json.dumps({"version": 99}), "expected an object with version 1"),
    (json.dumps({"version": 1, "architecture": "X", "modules": {}, "samples": 0}), "'samples' must be"),
    (json.dumps({"version": 1, "architecture": "X", "samples": 4, "modules": {"a": {"shape": "x"}}}),
     "module 'a'"),
])
def test_a_malformed_fingerprint_is_a_format_error(tmp_path, value, fragment):
    saved_llama(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={METADATA_KEY: value})
    model = tiny_llama(seed=0)
    with pytest.raises(lorakit.AdapterFormatError, match=f"__metadata__\\['lorakit.base'\\].*{fragment}"):
        lorakit.load_adapter(model, tmp_path)
    assert find_state(model) is None


def test_saving_while_merged_records_no_samples_for_merged_weights(tmp_path):
    model = tiny_gpt2(seed=0)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    randomize_adapters(model)
    lorakit.merge(model)
    lorakit.save_adapter(model, tmp_path)
    fp = fingerprint_of(tmp_path)
    assert fp["architecture"] == "GPT2LMHeadModel" and fp["modules"]["transformer.h.0.attn.c_attn"]["shape"] == [32, 96]
    assert all(m["sample"] is None for m in fp["modules"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(tiny_gpt2(seed=0), tmp_path, strict_base=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fingerprint_does_not_depend_on_the_device(tmp_path):
    model = tiny_llama(seed=0).cuda()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "gpu")
    saved_llama(tmp_path / "cpu")
    assert fingerprint_of(tmp_path / "gpu") == fingerprint_of(tmp_path / "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(tiny_llama(seed=0), tmp_path / "gpu", strict_base=True)
        lorakit.load_adapter(tiny_llama(seed=0).cuda(), tmp_path / "cpu", strict_base=True)
    with pytest.raises(BaseModelMismatch, match="weight values"):
        lorakit.load_adapter(tiny_llama(seed=1).cuda(), tmp_path / "cpu", strict_base=True)
