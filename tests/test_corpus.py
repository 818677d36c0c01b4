"""A corpus of malformed adapters, generated from one valid file: each must give a LoraError that
names the file and the key or field, expected vs actual; the process survives; the model stays
bit-identical; no adapter name is registered; no pickle is ever unpickled (a canary file would
appear)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from safetensors.torch import load_file, save_file

import lorakit

P = "base_model.model."
W, C = "adapter_model.safetensors", "adapter_config.json"
Q0A, Q0B = f"{P}model.layers.0.self_attn.q_proj.lora_A.weight", f"{P}model.layers.0.self_attn.q_proj.lora_B.weight"
V1A, V1B = f"{P}model.layers.1.self_attn.v_proj.lora_A.weight", f"{P}model.layers.1.self_attn.v_proj.lora_B.weight"
EA, EB = f"{P}model.embed_tokens.lora_embedding_A", f"{P}model.embed_tokens.lora_embedding_B"


class Canary:
    """Unpickling this creates a file."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------- edit helpers
def split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header, data: bytes, n=None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(h) if n is None else n).to_bytes(8, "little") + h + data


def raw(fn):
    """Replace the weights file by fn(its bytes)."""
    def corrupt(folder: Path):
        (folder / W).write_bytes(fn((folder / W).read_bytes()))
    return corrupt


def header(fn):
    """fn(header dict, data bytes) edits in place or returns (header, data)."""
    def edit(b: bytes) -> bytes:
        h, data = split(b)
        out = fn(h, data)
        return join(*(out or (h, data)))
    return raw(edit)


def by_offset(h: dict) -> list[str]:
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def tensors(fn):
    """fn(dict of tensors) edits them; saved back with safetensors."""
    def corrupt(folder: Path):
        t = load_file(folder / W)
        fn(t)
        save_file(t, folder / W)
    return corrupt


def config(**changes):
    def corrupt(folder: Path):
        cfg = json.loads((folder / C).read_text())
        for k, v in changes.items():
            if v is ...:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (folder / C).write_text(json.dumps(cfg))
    return corrupt


def config_bytes(data: bytes):
    def corrupt(folder: Path):
        (folder / C).write_bytes(data)
    return corrupt


def put(key, value):
    return tensors(lambda t: t.__setitem__(key, value))


def drop(*keys):
    return tensors(lambda t: [t.pop(k) for k in keys])


def canary_pickle(folder: Path) -> bytes:
    c = Canary()
    c.path = str(folder.parent / "canary")
    return pickle.dumps(c)


def _overlap(h, data):
    a, b = by_offset(h)[:2]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    h[b]["dtype"], h[b]["shape"] = h[a]["dtype"], h[a]["shape"]


def _gap(h, data):
    first = by_offset(h)[0]
    end = h[first]["data_offsets"][1]
    for k in by_offset(h)[1:]:
        h[k]["data_offsets"] = [o + 4 for o in h[k]["data_offsets"]]
    return h, data[:end] + b"\0" * 4 + data[end:]


def _first(fn):
    """Apply fn to the first entry (by offset) of the header."""
    def edit(h, data):
        fn(h[by_offset(h)[0]])
    return header(edit)


def _dup_key(b: bytes) -> bytes:
    h, data = split(b)
    k = by_offset(h)[0]
    text = json.dumps(h)[:-1] + f', "{k}": {json.dumps(h[k])}}}'
    return join(text.encode(), data)


# ---------------------------------------------------------------------------- folder-level cases
def _missing(folder: Path):
    shutil.rmtree(folder)


def _symlink_outside(fname: str):
    def corrupt(folder: Path):
        elsewhere = folder.parent / "elsewhere"
        shutil.copytree(folder, elsewhere)
        (folder / fname).unlink()
        os.symlink(elsewhere / fname, folder / fname)
    return corrupt


def _subfolder_link(folder: Path):
    elsewhere = folder.parent / "elsewhere"
    shutil.copytree(folder, elsewhere)
    os.symlink(elsewhere, folder / "new")


def _pickle_named_safetensors(folder: Path):
    (folder / W).write_bytes(canary_pickle(folder))


def _pickle_only(folder: Path):
    (folder / W).unlink()
    (folder / "adapter_model.bin").write_bytes(canary_pickle(folder))


def _pickle_file(folder: Path):
    (folder / "adapter_model.pt").write_bytes(canary_pickle(folder))
    return folder / "adapter_model.pt"


def _weights_dir(folder: Path):
    (folder / W).unlink()
    (folder / W).mkdir()


def _weights_fifo(folder: Path):
    (folder / W).unlink()
    os.mkfifo(folder / W)


I32 = torch.zeros(16, 2, dtype=torch.int32)
CASES = {
    # -- the safetensors container
    "empty-file": (raw(lambda b: b""), ["the file is 0 bytes", "(empty file)"]),
    "four-bytes": (raw(lambda b: b[:4]), ["the file is 4 bytes; expected at least 8"]),
    "truncated-in-header": (raw(lambda b: b[:40]), ["header length (bytes 0-7) is", "but the file has 32 bytes"]),
    "header-length-zero": (raw(lambda b: join(b"", b[8:], 0)), ["header length (bytes 0-7) is 0"]),
    "header-length-beyond-file": (raw(lambda b: (len(b)).to_bytes(8, "little") + b[8:]),
                                  ["header length (bytes 0-7) is", "expected 2 <= length <="]),
    "header-length-huge": (raw(lambda b: (2**40).to_bytes(8, "little") + b[8:]),
                           [f"header length (bytes 0-7) is {2**40}; expected at most 104857600"]),
    "header-not-utf8": (raw(lambda b: join(b"\xff" * 40, b"")), ["the header is not UTF-8"]),
    "header-bad-json": (raw(lambda b: join(b'{"a": ', b"")), ["the header is not valid JSON"]),
    "header-json-list": (raw(lambda b: join(b"[1, 2]", b"")), ["the header is a JSON list; expected an object"]),
    "header-nested-deeply": (raw(lambda b: join(b"[" * 100_000, b"")), ["nested too deeply"]),
    "header-duplicate-key": (raw(_dup_key), ["duplicate key", "lora_"]),
    "header-nan-literal": (header(lambda h, d: h.__setitem__("x", {"dtype": "F32", "shape": [float("nan")],
                                                                   "data_offsets": [0, 0]})),
                           ["NaN is not valid JSON"]),
    "metadata-not-a-dict": (header(lambda h, d: h.__setitem__("__metadata__", [1])),
                            ["'__metadata__' must map strings to strings, got [1]"]),
    "metadata-not-strings": (header(lambda h, d: h.__setitem__("__metadata__", {"format": 1})),
                             ["'__metadata__' must map strings to strings"]),
    "entry-not-an-object": (_first(lambda e: e.clear()), ["expected the fields ['data_offsets', 'dtype', 'shape'], "
                                                          "got []"]),
    "entry-is-a-number": (header(lambda h, d: h.__setitem__(by_offset(h)[0], 5)),
                          ["expected an object with dtype, shape, data_offsets; got 5"]),
    "entry-missing-dtype": (_first(lambda e: e.pop("dtype")), ["got ['data_offsets', 'shape']"]),
    "entry-extra-field": (_first(lambda e: e.__setitem__("extra", 1)), ["got ['data_offsets', 'dtype', 'extra'"]),
    "unknown-dtype": (_first(lambda e: e.__setitem__("dtype", "F17")), ["unknown dtype 'F17'; expected one of"]),
    "dtype-not-a-string": (_first(lambda e: e.__setitem__("dtype", 32)), ["unknown dtype 32"]),
    "shape-negative": (_first(lambda e: e.__setitem__("shape", [-4, 32])), ["shape must be a list of at most 8",
                                                                             "got [-4, 32]"]),
    "shape-float": (_first(lambda e: e.__setitem__("shape", [4.0, 32])), ["got [4.0, 32]"]),
    "shape-nine-dims": (_first(lambda e: e.__setitem__("shape", [1] * 9)), ["at most 8 integers"]),
    "shape-not-matching-bytes": (_first(lambda e: e.__setitem__("shape", e["shape"][:1] + [e["shape"][1] + 1])),
                                 ["hold", "bytes; expected", "for shape"]),
    "offsets-reversed": (_first(lambda e: e.__setitem__("data_offsets", e["data_offsets"][::-1])),
                         ["data_offsets must be [begin, end] with 0 <= begin <= end"]),
    "offsets-one-number": (_first(lambda e: e.__setitem__("data_offsets", [0])), ["got [0]"]),
    "offsets-strings": (_first(lambda e: e.__setitem__("data_offsets", ["0", "8"])), ["got ['0', '8']"]),
    "offsets-overlap": (header(_overlap), ["overlap key"]),
    "offsets-gap": (header(_gap), ["bytes [", "of the data belong to no tensor"]),
    "truncated-data": (raw(lambda b: b[:-100]), ["data_offsets end at", "(truncated file?)"]),
    "trailing-bytes": (raw(lambda b: b + b"\0" * 16), ["16 bytes after the last tensor"]),
    "pickle-named-safetensors": (_pickle_named_safetensors, [W, "not a readable safetensors"]),
    "pickle-bin-only": (_pickle_only, ["adapter_model.bin", "refusing to load a pickle file", "save_file"]),
    "pickle-path-given": (_pickle_file, ["adapter_model.pt", "refusing to load a pickle file"]),
    # -- the tensors
    "dtype-int32": (put(V1B, I32), [V1B, "expected a floating-point dtype", "got I32 (torch.int32)"]),
    "dtype-bool": (put(V1B, I32.bool()), [V1B, "got BOOL (torch.bool)"]),
    "nan": (put(Q0A, torch.full((4, 32), float("nan"))), [Q0A, "expected finite values, got 128 NaN and 0 Inf"]),
    "inf": (tensors(lambda t: t[V1B].__setitem__((0, 0), float("inf"))), [V1B, "got 0 NaN and 1 Inf"]),
    "minus-inf": (tensors(lambda t: t[EB].__setitem__((3, 1), -float("inf"))), [EB, "got 0 NaN and 1 Inf"]),
    "overflows-the-adapter-dtype": (put(Q0A, torch.full((4, 32), 1e300, dtype=torch.float64)),
                                    [Q0A, "expected values that fit torch.float32", "got 128 that overflow it"]),
    "swapped-a-b": (tensors(lambda t: t.update({Q0A: t[Q0B].clone(), Q0B: t[Q0A].clone()})),
                    ["model.layers.0.self_attn.q_proj: A and B look swapped", Q0A, "[32, 4] (B's [32, 4])"]),
    "rank-a-b-disagree": (put(Q0B, torch.zeros(32, 3)), ["A and B ranks disagree", f"{Q0A} has r=4 (shape [4, 32])",
                                                         f"{Q0B} has r=3 (shape [32, 3])"]),
    "rank-not-the-config's": (tensors(lambda t: t.update({Q0A: torch.zeros(3, 32), Q0B: torch.zeros(32, 3)})),
                              ["r=3 in the file", Q0A, "but the config gives r=4 (its r: 4)"]),
    "rank-not-rank_pattern's": (tensors(lambda t: t.update({V1A: torch.zeros(4, 32), V1B: torch.zeros(16, 4)})),
                                ["model.layers.1.self_attn.v_proj: r=4 in the file", "r=2 (rank_pattern 'v_proj': 2)"]),
    "rank-zero-in-file": (tensors(lambda t: t.update({Q0A: torch.zeros(0, 32), Q0B: torch.zeros(32, 0)})),
                          ["r=0 in the file", "config gives r=4"]),
    "orphan-a": (drop(Q0B), [f"{Q0A} has no partner {Q0B} (A without B)", "1 missing keys"]),
    "orphan-b": (drop(EA), [f"{EB} has no partner {EA} (B without A)"]),
    "missing-module": (drop(V1A, V1B), ["2 missing keys", V1A, V1B]),
    "key-for-a-missing-module": (put(f"{P}model.layers.0.self_attn.w_proj.lora_A.weight", torch.zeros(4, 32)),
                                 ["1 unexpected keys", "w_proj.lora_A.weight",
                                  "no module 'model.layers.0.self_attn.w_proj' in LlamaForCausalLM"]),
    "key-for-an-unadapted-module": (put(f"{P}model.layers.0.self_attn.k_proj.lora_A.weight", torch.zeros(4, 32)),
                                    ["k_proj.lora_A.weight", "module 'model.layers.0.self_attn.k_proj' is not adapted "
                                     "by the config's target_modules"]),
    "not-a-lora-key": (put(f"{P}model.layers.0.self_attn.q_proj.lora_C.weight", torch.zeros(1)),
                       ["q_proj.lora_C.weight", "not a LoRA key"]),
    "wrong-key-kind": (put(f"{P}model.embed_tokens.lora_A.weight", torch.zeros(4, 64)),
                       ["embed_tokens.lora_A.weight",
                        "module 'model.embed_tokens' (Embedding) takes the keys "
                        "'model.embed_tokens.lora_embedding_A'"]),
    "k-dim-wrong": (put(Q0A, torch.zeros(4, 31)), [Q0A, "expected shape [4, 32], got [4, 31]"]),
    "one-dim-tensor": (put(Q0A, torch.zeros(128)), [Q0A, "expected shape [4, 32], got [128]"]),
    "base-copy-differs": (put(f"{P}model.embed_tokens.base_layer.weight", torch.ones(64, 32)),
                          ["model.embed_tokens.base_layer.weight", "differs from this model's"]),
    "base-copy-wrong-shape": (put(f"{P}model.embed_tokens.base_layer.weight", torch.ones(65, 32)),
                              ["model.embed_tokens.base_layer.weight: expected shape [64, 32], got [65, 32]"]),
    # -- the config
    "config-empty": (config_bytes(b""), [C, "cannot read the adapter config"]),
    "config-not-json": (config_bytes(b"{r: 4"), [C, "cannot read the adapter config"]),
    "config-list": (config_bytes(b"[]"), [C, "expected a JSON object, got list"]),
    "config-not-utf8": (config_bytes(b"\xff\xfe{}"), [C, "cannot read the adapter config", "utf-8"]),
    "config-huge": (config_bytes(b" " * (16 * 2**20 + 1)), [C, "larger than 16777216 bytes"]),
    "r-zero": (config(r=0), [C, "r must be an integer >= 1, got 0"]),
    "r-negative": (config(r=-3), [C, "r must be an integer >= 1, got -3"]),
    "r-string": (config(r="4"), [C, "r must be an integer >= 1, got '4'"]),
    "r-float": (config(r=4.5), [C, "got 4.5"]),
    "r-bool": (config(r=True), [C, "got True"]),
    "alpha-negative": (config(lora_alpha=-8), [C, "alpha must be a finite number > 0, got -8"]),
    "alpha-nan": (config(lora_alpha=float("nan")), [C, "alpha must be a finite number > 0, got nan"]),
    "alpha-inf": (config(lora_alpha=float("inf")), [C, "got inf"]),
    "alpha-string": (config(lora_alpha="8"), [C, "got '8'"]),
    "dropout-one": (config(lora_dropout=1.0), [C, "dropout must be a number in [0, 1), got 1.0"]),
    "dropout-negative": (config(lora_dropout=-0.1), [C, "got -0.1"]),
    "dropout-null": (config(lora_dropout=None), [C, "dropout must be a number in [0, 1), got None"]),
    "peft-type-missing": (config(peft_type=...), [C, "peft_type must be 'LORA', got None"]),
    "peft-type-other": (config(peft_type="PREFIX_TUNING"), [C, "got 'PREFIX_TUNING'"]),
    "bias-unknown": (config(bias="sometimes"), [C, "bias must be 'none'", "got 'sometimes'"]),
    "bias-all": (config(bias="all"), [C, "got 'all'"]),
    "target-modules-number": (config(target_modules=5), [C, "target_modules must be a list", "got 5"]),
    "target-modules-match-nothing": (config(target_modules=["wq"]), ["['wq']", "q_proj"]),
    "rank-pattern-list": (config(rank_pattern=["v_proj"]), [C, "rank_pattern must be a dict", "got list"]),
    "rank-pattern-zero": (config(rank_pattern={"v_proj": 0}), [C, "rank_pattern values must be an integer >= 1",
                                                               "'v_proj': 0"]),
    "alpha-pattern-negative": (config(alpha_pattern={"q_proj": -1}), [C, "alpha_pattern values", "'q_proj': -1"]),
    "target-regex-exponential": (config(target_modules=r"(\w+\.?)+x"), [C, "target_modules regex",
                                                                       "a repetition inside a repetition"]),
    "rank-pattern-regex-exponential": (config(rank_pattern={"(a|b+)*c": 2}), [C, "rank_pattern regex '(a|b+)*c'",
                                                                            "exponential time"]),
    "use-rslora-string": (config(use_rslora="yes"), [C, "use_rslora must be a bool, got 'yes'"]),
    "fan-in-fan-out-string": (config(fan_in_fan_out="no"), [C, "fan_in_fan_out must be a bool, got 'no'"]),
    "use-dora": (config(use_dora=True), [C, "use_dora=True"]),
    "task-type-number": (config(task_type=7), [C, "task_type must be a string or null, got 7"]),
    # -- the folder
    "no-folder": (_missing, ["no such adapter folder"]),
    "no-config": (lambda f: (f / C).unlink(), [f"no {C} beside {W}"]),
    "no-weights": (lambda f: (f / W).unlink(), [f"no {W}"]),
    "weights-is-a-folder": (_weights_dir, [W, "expected a regular file, found a folder"]),
    "weights-is-a-fifo": (_weights_fifo, [W, "expected a regular file, found a FIFO"]),
    "weights-symlink-outside": (_symlink_outside(W), [W, "a symlink to", "outside the adapter folder"]),
    "config-symlink-outside": (_symlink_outside(C), [C, "outside the adapter folder", "refusing to follow it"]),
    "subfolder-symlink-outside": (_subfolder_link, ["new", "outside the adapter folder"]),
}
NAMES = {"bad-name-dots": "..", "bad-name-slash": "a/b", "bad-name-empty": "", "bad-name-long": "x" * 65}
SHAPES = ("rank-a-b", "rank-not", "rank-zero", "swapped", "k-dim", "one-dim", "base-copy-wrong")
ERRORS = {**{prefix: lorakit.ShapeMismatch for prefix in SHAPES}, "target-modules-match": lorakit.TargetNotFound}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One valid adapter (rank_pattern included) that every case corrupts a copy of."""
    folder = tmp_path_factory.mktemp("corpus") / "valid"
    src = tiny_llama(seed=0)
    lorakit.inject(src, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                           rank_pattern={"v_proj": 2}))
    randomize_adapters(src)
    lorakit.save_adapter(src, folder)
    return folder


@pytest.fixture(scope="module")
def victim():
    """The model every bad load is tried on (it already has an adapter); and its snapshot."""
    model = tiny_llama(seed=0)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]), name="keep")
    randomize_adapters(model)
    return model, {k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in
                                                                             model.named_modules()]


def test_the_template_is_valid_and_the_corpus_is_large(template, tmp_path):
    pickle.loads(canary_pickle(tmp_path / "x"))                         # the payload is live: it makes a file
    assert (tmp_path / "canary").exists()
    model = tiny_llama(seed=0)
    lorakit.load_adapter(model, template, strict_base=True)
    assert lorakit.get_config(model).rank_for("model.layers.1.self_attn.v_proj") == 2
    assert len(CASES) + len(NAMES) >= 50


def _assert_untouched(victim):
    model, state, modules = victim
    assert lorakit.adapter_names(model) == ["keep"] and lorakit.active_adapter(model) == "keep"
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_adapter_is_refused_naming_file_and_key(case, template, victim, tmp_path):
    corrupt, fragments = CASES[case]
    folder = tmp_path / "bad"
    shutil.copytree(template, folder)
    path = corrupt(folder) or folder
    error = next((cls for prefix, cls in ERRORS.items() if case.startswith(prefix)), lorakit.LoraError)
    with pytest.raises(error) as e:
        lorakit.load_adapter(victim[0], path, name="new")
    message = str(e.value)
    assert isinstance(e.value, lorakit.LoraError) and isinstance(e.value, ValueError)
    assert str(folder) in message, message                              # names the file (or folder)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    _assert_untouched(victim)
    assert not (tmp_path / "canary").exists()
    assert lorakit.load_adapter(tiny_llama(seed=0), template) == "default"  # the process goes on working


@pytest.mark.parametrize("case", sorted(NAMES))
def test_unsafe_adapter_names_are_refused(case, template, victim):
    with pytest.raises(lorakit.ConfigError, match="invalid adapter name"):
        lorakit.load_adapter(victim[0], template, name=NAMES[case])
    _assert_untouched(victim)
