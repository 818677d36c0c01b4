"""save_adapter / load_adapter / lora_state_dict: PEFT's layout, exact round trips, and strict
validation: every bad file gives a LoraError naming the problem and leaves the model as it was."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest
import torch
from conftest import CNN, assert_unchanged, randomize_adapters, run, snapshot, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.layers import LoraLayer

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
P = "base_model.model."








def save_llama(folder, **cfg) -> nn.Module:
    """A tiny Llama with a random adapter on q_proj, v_proj and embed_tokens, saved to ``folder``."""
    model = tiny_llama()
    kwargs = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    kwargs.update(cfg)
    lorakit.inject(model, lorakit.LoraConfig(**kwargs))
    randomize_adapters(model)
    lorakit.save_adapter(model, folder)
    return model


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "ad"
    return folder, save_llama(folder)


# ---------------------------------------------------------------------------- the files
def test_files_follow_peft_layout(saved):
    folder, model = saved
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]   # no temp files
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
    tensors = load_file(folder / "adapter_model.safetensors")
    expected = {}
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            d = 32 if proj == "q_proj" else 16                 # 2 KV heads of 8
            expected[f"{P}model.layers.{i}.self_attn.{proj}.lora_A.weight"] = (4, 32)
            expected[f"{P}model.layers.{i}.self_attn.{proj}.lora_B.weight"] = (d, 4)
    expected[f"{P}model.embed_tokens.lora_embedding_A"] = (4, 64)
    expected[f"{P}model.embed_tokens.lora_embedding_B"] = (32, 4)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    sd = lorakit.lora_state_dict(model)
    assert sd.keys() == tensors.keys() and all(torch.equal(sd[k], tensors[k]) for k in sd)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["embed_tokens", "q_proj", "v_proj"]
    assert (cfg["bias"], cfg["use_rslora"], cfg["fan_in_fan_out"], cfg["lora_dropout"]) == ("none", False, False, 0.0)
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["modules_to_save"] is None


def test_gpt2_config_records_fan_in_fan_out(tmp_path):
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(target_modules=["c_attn"]))
    lorakit.save_adapter(model, tmp_path, base_model_name_or_path="tiny/gpt2")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["base_model_name_or_path"] == "tiny/gpt2"


def test_resolved_targets_are_saved_explicitly(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg["exclude_modules"] is None
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=r"model\.layers\.1\.self_attn\.q_proj"))
    lorakit.save_adapter(model, tmp_path / "b")       # a leaf name would select layer 0 too: full path
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj"]


# ---------------------------------------------------------------------------- round trips
ROUND_TRIPS = {
    "llama-rank-alpha-pattern": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                                                  rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 7},
                                                  alpha_pattern={"q_proj": 5}), IDS),
    "llama-rslora-all-linear": (tiny_llama, dict(target_modules="all-linear", use_rslora=True), IDS),
    "gpt2-conv1d-and-wte": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "wte"]), IDS),
    "bert-modules-to-save": (tiny_bert, dict(target_modules=["query", "value"], modules_to_save=["pooler"]), IDS),
    "cnn": (CNN, dict(target_modules=["conv1", "conv2", "seq"], modules_to_save=["head"]),
            torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_save_then_load_into_a_fresh_base_gives_identical_outputs(case, tmp_path):
    build, kwargs, x = ROUND_TRIPS[case]
    torch.manual_seed(0)
    model = build()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, **kwargs))
    randomize_adapters(model)
    with torch.no_grad():
        for saved in (m for m in model.modules() if isinstance(m, lorakit.SavedModule)):
            for p in saved.copies["default"].parameters():
                p.add_(0.25)
    expected = run(model, x)
    lorakit.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = build()
    assert lorakit.load_adapter(fresh, tmp_path) == "default"
    assert torch.equal(run(fresh, x), expected)
    sd, sd2 = lorakit.lora_state_dict(model), lorakit.lora_state_dict(fresh)
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for path, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)):
        a, b = layer.adapters["default"], fresh.get_submodule(path).adapters["default"]
        assert (a.r, a.alpha, a.scale) == (b.r, b.alpha, b.scale)


def test_first_loaded_adapter_is_active_and_later_ones_never_switch(saved, tmp_path):
    folder, _ = saved
    other = tmp_path / "other"
    save_llama(other, r=2, target_modules=["o_proj"])
    model = tiny_llama()
    assert lorakit.load_adapter(model, folder, name="one") == "one"
    out_one = run(model)
    assert lorakit.load_adapter(model, other, name="two") == "two"
    assert lorakit.active_adapter(model) == "one" and torch.equal(run(model), out_one)
    lorakit.set_adapter(model, "two")
    assert not torch.equal(run(model), out_one)


def test_loaded_adapters_are_frozen_unless_trainable(saved):
    folder, _ = saved
    frozen = tiny_llama()
    lorakit.load_adapter(frozen, folder)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert lorakit.parameter_report(frozen).trainable == 0
    model = tiny_llama()
    lorakit.load_adapter(model, folder, trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    before = [p.detach().clone() for p in lorakit.adapter_parameters(model)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(IDS).logits.pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, lorakit.adapter_parameters(model)))
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if ".adapters." not in k)


def test_saving_while_merged_saves_the_adapter(tmp_path):
    model = save_llama(tmp_path / "before")
    unmerged = run(model)
    lorakit.merge(model)
    lorakit.save_adapter(model, tmp_path / "merged")
    a, b = load_file(tmp_path / "before" / "adapter_model.safetensors"), load_file(tmp_path / "merged" /
                                                                                  "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "merged")
    assert torch.equal(run(fresh), unmerged)


def test_save_by_name_overwrites_atomically_and_loads_from_file_or_subfolder(tmp_path):
    model = save_llama(tmp_path / "x")
    lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["k_proj"]), name="js")
    lorakit.save_adapter(model, tmp_path / "multi" / "js", name="js")
    lorakit.save_adapter(model, tmp_path / "multi" / "js", name="js")          # overwrite in place
    assert sorted(os.listdir(tmp_path / "multi" / "js")) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_llama()
    assert lorakit.load_adapter(fresh, tmp_path / "multi", name="js") == "js"      # PEFT's subfolder layout
    assert lorakit.get_config(fresh, "js").target_modules == ["k_proj"]
    lorakit.load_adapter(fresh, tmp_path / "x" / "adapter_model.safetensors", name="file")
    with pytest.raises(lorakit.AdapterFormatError, match=r"subfolders with adapters: \['js'\] \(pass name="):
        lorakit.load_adapter(tiny_llama(), tmp_path / "multi", name="other")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(lorakit.AdapterFormatError, match="is not a folder"):
        lorakit.save_adapter(model, tmp_path / "afile")


def test_load_dtype_and_non_strict(saved):
    folder, _ = saved
    model = tiny_llama()
    lorakit.load_adapter(model, folder, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.dtype == torch.bfloat16
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors[f"{P}model.layers.1.self_attn.v_proj.lora_B.weight"]
    tensors[f"{P}model.layers.0.self_attn.extra.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, folder / "adapter_model.safetensors")
    loose = tiny_llama()
    lorakit.load_adapter(loose, folder, strict=False)
    v1 = loose.model.layers[1].self_attn.v_proj.adapters["default"]
    assert torch.equal(v1.lora_B, torch.zeros_like(v1.lora_B))          # missing B keeps init: adds nothing
    host = tiny_llama()                                                 # the same, kept in host memory
    lorakit.load_adapter(host, folder, strict=False, device="cpu")
    lorakit.adapter_cache(host).fetch(["default"])
    for (k, p), (k2, q) in zip(lorakit.lora_state_dict(loose).items(), lorakit.lora_state_dict(host).items()):
        assert k == k2 and torch.equal(p, q)


def test_tensors_at_offsets_that_are_not_multiples_of_their_item_size_read_exactly(tmp_path):
    """Another writer may lay out mixed dtypes without padding; such tensors are read exactly."""
    from lorakit.io import read_tensors
    from lorakit.tensorfile import serialize
    want = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.randn(2, 3), "c": torch.randn(5).to(torch.bfloat16),
            "d": torch.empty(0, 4), "e": torch.tensor(0.5, dtype=torch.float64)}      # b at byte 3, c at 27, e at 37
    (tmp_path / "t.safetensors").write_bytes(serialize(want))
    got = read_tensors(tmp_path / "t.safetensors")
    assert list(got) == list(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t)


# ---------------------------------------------------------------------------- bad input
def _edit_tensors(fn):
    def corrupt(folder):
        tensors = load_file(folder / "adapter_model.safetensors")
        fn(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
    return corrupt


def _edit_config(**changes):
    def corrupt(folder):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return corrupt


Q0A = f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"
V1B = f"{P}model.layers.1.self_attn.v_proj.lora_B.weight"
BAD = {
    "shape": (_edit_tensors(lambda t: t.__setitem__(Q0A, torch.zeros(4, 31))), lorakit.ShapeMismatch,
              [Q0A, "expected shape [4, 32], got [4, 31]"]),
    "missing": (_edit_tensors(lambda t: (t.pop(Q0A), t.pop(V1B))), lorakit.AdapterFormatError,
                ["2 missing keys", Q0A, V1B]),
    "unexpected": (_edit_tensors(lambda t: t.update({f"{P}lm_head.lora_A.weight": torch.zeros(4, 32),
                                                     f"{P}model.norm.lora_B.weight": torch.zeros(32, 4)})),
                   lorakit.AdapterFormatError, ["2 unexpected keys", "lm_head.lora_A.weight", "model.norm.lora_B"]),
    "nan": (_edit_tensors(lambda t: t[V1B].fill_(float("nan"))), lorakit.AdapterFormatError, [V1B, "NaN"]),
    "int-dtype": (_edit_tensors(lambda t: t.__setitem__(V1B, torch.zeros(16, 4, dtype=torch.int32))),
                  lorakit.AdapterFormatError, [V1B, "torch.int32"]),
    "peft-type": (_edit_config(peft_type="PREFIX_TUNING"), lorakit.ConfigError,
                  ["adapter_config.json", "peft_type must be 'LORA', got 'PREFIX_TUNING'"]),
    "rank-zero": (_edit_config(r=0), lorakit.ConfigError, ["adapter_config.json", "r must be an integer >= 1, got 0"]),
    "dora": (_edit_config(use_dora=True), lorakit.ConfigError, ["use_dora=True"]),
    "target-absent": (_edit_config(target_modules=["q_proj", "wq"]), lorakit.AdapterFormatError,
                      ["unexpected keys"]),
    "target-nothing": (_edit_config(target_modules=["wq"]), lorakit.TargetNotFound, ["['wq']", "q_proj"]),
    "bad-json": (lambda f: (f / "adapter_config.json").write_text("{r: 4"), lorakit.AdapterFormatError,
                 ["adapter_config.json", "cannot read"]),
    "bad-safetensors": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00garbage!"),
                        lorakit.AdapterFormatError, ["adapter_model.safetensors", "not a readable safetensors"]),
    "no-weights": (lambda f: (f / "adapter_model.safetensors").unlink(), lorakit.AdapterFormatError,
                   ["no adapter_model.safetensors"]),
    "no-config": (lambda f: (f / "adapter_config.json").unlink(), lorakit.AdapterFormatError,
                  ["no adapter_config.json"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_is_refused_and_model_left_as_it_was(case, saved):
    folder, _ = saved
    corrupt, error, fragments = BAD[case]
    corrupt(folder)
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="keep")
    randomize_adapters(model)
    before = snapshot(model)
    with pytest.raises(error) as e:
        lorakit.load_adapter(model, folder, name="new")
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))
    assert isinstance(e.value, lorakit.LoraError) and isinstance(e.value, ValueError)
    assert_unchanged(model, before)
    plain = tiny_llama()                                 # and onto a model without any adapter
    before = snapshot(plain)
    with pytest.raises(error):
        lorakit.load_adapter(plain, folder, name="new")
    assert_unchanged(plain, before)


def test_adapter_for_another_model_size_names_keys_and_shapes(saved):
    folder, _ = saved
    bigger = tiny_llama(hidden=48)
    before = snapshot(bigger)
    with pytest.raises(lorakit.ShapeMismatch) as e:
        lorakit.load_adapter(bigger, folder)
    assert f"{Q0A}: expected shape [4, 48], got [4, 32]" in str(e.value)
    assert f"{P}model.embed_tokens.lora_embedding_B: expected shape [48, 4], got [32, 4]" in str(e.value)
    assert_unchanged(bigger, before)


class _Canary:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_adapter_is_refused_and_never_unpickled(tmp_path, saved):
    folder, _ = saved
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Canary(proof)))             # the payload is live: unpickling creates a file
    assert proof.exists()
    canary = tmp_path / "canary"
    payload = pickle.dumps(_Canary(canary))
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(payload)
    model = tiny_llama()
    before = snapshot(model)
    for path in (folder, folder / "adapter_model.bin"):
        with pytest.raises(lorakit.AdapterFormatError) as e:
            lorakit.load_adapter(model, path)
        assert "adapter_model.bin" in str(e.value) and "pickle" in str(e.value)
        assert "save_file" in str(e.value)                 # the hint: convert to safetensors
    (folder / "adapter_model.safetensors").write_bytes(payload)    # a pickle under the right name
    with pytest.raises(lorakit.AdapterFormatError, match="not a readable safetensors"):
        lorakit.load_adapter(model, folder)
    assert not canary.exists()
    assert_unchanged(model, before)


def test_duplicate_name_missing_folder_and_merged_model(saved, tmp_path):
    folder, _ = saved
    model = tiny_llama()
    lorakit.load_adapter(model, folder, name="a")
    before = snapshot(model)
    with pytest.raises(lorakit.AdapterExists, match=r"'a' already exists on this model \(\['a'\]\)"):
        lorakit.load_adapter(model, folder, name="a")
    with pytest.raises(lorakit.AdapterFormatError, match="no such adapter folder"):
        lorakit.load_adapter(model, tmp_path / "nowhere", name="b")
    with pytest.raises(lorakit.ConfigError, match="invalid adapter name"):
        lorakit.load_adapter(model, folder, name="a/b")
    assert_unchanged(model, before)
    lorakit.merge(model)
    before = snapshot(model)
    with pytest.raises(lorakit.MergedStateError, match="unmerge"):
        lorakit.load_adapter(model, folder, name="b")
    assert_unchanged(model, before)
    with pytest.raises(lorakit.AdapterNotFound, match=r"available adapters: \['a'\]"):
        lorakit.save_adapter(model, tmp_path / "x", name="zz")
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_save_and_load_across_devices(tmp_path):
    model = tiny_llama().cuda()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    randomize_adapters(model)
    expected = run(model, IDS.cuda())
    lorakit.save_adapter(model, tmp_path)
    on_gpu = tiny_llama().cuda()
    lorakit.load_adapter(on_gpu, tmp_path)
    assert all(p.is_cuda for p in lorakit.adapter_parameters(on_gpu))
    assert torch.equal(run(on_gpu, IDS.cuda()), expected)
    on_cpu = tiny_llama()
    lorakit.load_adapter(on_cpu, tmp_path)
    torch.testing.assert_close(run(on_cpu), expected.cpu(), rtol=1e-4, atol=1e-4)
    before = snapshot(on_gpu)                            # a failing load on a GPU model changes nothing
    with pytest.raises(lorakit.ShapeMismatch):
        lorakit.load_adapter(tiny_llama(hidden=48).cuda(), tmp_path)
    with pytest.raises(lorakit.AdapterExists):
        lorakit.load_adapter(on_gpu, tmp_path)
    assert_unchanged(on_gpu, before)


# ---------------------------------------------------------------------------- issue 7: loading details
def test_a_failing_cache_hook_rolls_the_whole_load_back(saved, monkeypatch):
    """load_adapter(device="cpu") registers the adapter with the cache inside the all-or-nothing add."""
    import lorakit.cache
    folder, _ = saved
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["o_proj"]), name="keep")
    before = snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("pinning failed")

    monkeypatch.setattr(lorakit.cache, "place_loaded_adapter", broken)
    with pytest.raises(RuntimeError, match="pinning failed"):
        lorakit.load_adapter(model, folder, name="new", device="cpu")
    assert_unchanged(model, before)
    monkeypatch.undo()
    assert lorakit.load_adapter(model, folder, name="new", device="cpu") == "new"


def test_non_finite_weights_are_never_saved(saved):
    folder, model = saved
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B[0, 0] = float("inf")
    with pytest.raises(lorakit.LoraError, match=r"refusing to save non-finite weights .*v_proj\.lora_B\.weight"):
        lorakit.save_adapter(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_symlinks_inside_the_folder_and_hub_cache_snapshots_load(saved, tmp_path):
    folder, model = saved
    expected = run(model)
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "real.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    os.symlink("real.safetensors", inside / "adapter_model.safetensors")
    os.symlink(folder / "adapter_config.json", inside / "adapter_config.json")     # outside: refused
    with pytest.raises(lorakit.AdapterFormatError, match="outside the adapter folder"):
        lorakit.load_adapter(tiny_llama(), inside)
    (inside / "adapter_config.json").unlink()
    (inside / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    m = tiny_llama()
    lorakit.load_adapter(m, inside)
    assert torch.equal(run(m), expected)
    repo = tmp_path / "hub" / "models--someone--adapter"          # huggingface_hub's cache layout
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (repo / "blobs" / f"sha-{name}").write_bytes((folder / name).read_bytes())
        os.symlink(f"../../blobs/sha-{name}", repo / "snapshots" / "abc123" / name)
    m = tiny_llama()
    lorakit.load_adapter(m, repo / "snapshots" / "abc123")
    assert torch.equal(run(m), expected)


def test_write_adapter_files_writes_into_a_fresh_folder(saved, tmp_path):
    folder, model = saved
    (tmp_path / "fresh").mkdir()
    lorakit.io.write_adapter_files(model, tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in (tmp_path / "fresh").iterdir()} == \
        {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError):                         # never over an existing file
        lorakit.io.write_adapter_files(model, tmp_path / "fresh")


def test_saved_files_are_deterministic_and_read_by_safetensors(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load
    folder, model = saved
    lorakit.save_adapter(model, tmp_path / "again")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (folder / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    raw = (folder / "adapter_model.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0                 # header padded as safetensors does
    sd = lorakit.lora_state_dict(model)
    back = load(raw)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["saved_by"] == "lorakit" and "lorakit.base" in meta
    bf16 = {"a": torch.randn(3, 2).to(torch.bfloat16), "s": torch.tensor(2.0), "e": torch.zeros(0, 4)}
    out = load(lorakit.tensorfile.serialize(bf16))
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in bf16.items())


@pytest.mark.parametrize("pattern,risky", [
    (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", False), (r".*\.(q_proj|v_proj)", False), ("(a+)+b", True),
    (r"(\w+\.?)+x", True), ("(?:x{1,100})*", True), ("(ab{2})*", False), ("((a)*)", False), ("(a*)*", True),
    ("(?=(a+)+)b", True), ("x" * 10_001, True),
])
def test_regexes_from_files_that_could_backtrack_forever_are_refused(pattern, risky):
    from lorakit.checks import regex_problem
    assert (regex_problem(pattern) is not None) == risky
