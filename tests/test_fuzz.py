"""Fuzzing load_adapter with hypothesis: mutated adapter files and configs either load or raise a
LoraError, and a failed load leaves the model as it was. Nothing else may happen (no other
exception type, no crash, no hang).

Bounded for CI: 120 examples per test, derandomized (a run is reproducible; ~8 s in all).
Longer, random runs: ``LORAKIT_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py``;
docs/files.md shows an atheris harness for coverage-guided runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit

W, C = "adapter_model.safetensors", "adapter_config.json"
EXAMPLES = int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="LORAKIT_FUZZ_EXAMPLES" not in os.environ,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


class Setup:
    """A valid adapter (bytes of both files) and the model every load is tried on."""

    def __init__(self) -> None:
        src = tiny_llama(seed=0, layers=1)
        lorakit.inject(src, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                               rank_pattern={"v_proj": 1}))
        randomize_adapters(src)
        self.dir = Path(tempfile.mkdtemp(prefix="lorakit-fuzz-"))
        lorakit.save_adapter(src, self.dir / "valid")
        self.weights = (self.dir / "valid" / W).read_bytes()
        self.config = json.loads((self.dir / "valid" / C).read_text())
        self.model = tiny_llama(seed=0, layers=1)
        lorakit.inject(self.model, lorakit.LoraConfig(r=2, target_modules=["k_proj"]), name="keep")
        self.header_len = int.from_bytes(self.weights[:8], "little")

    def try_load(self, weights: bytes, config, strict: bool = True) -> str:
        """Write the files, load; 'ok' or 'refused'; a failed load must leave the model untouched."""
        folder = self.dir / "case"
        folder.mkdir(exist_ok=True)
        (folder / W).write_bytes(weights)
        (folder / C).write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        modules = [(n, type(m)) for n, m in self.model.named_modules()]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lorakit.load_adapter(self.model, folder, name="new", strict=strict)
        except lorakit.LoraError:
            state = self.model.state_dict()
            assert lorakit.adapter_names(self.model) == ["keep"]
            assert [(n, type(m)) for n, m in self.model.named_modules()] == modules
            assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
            return "refused"
        lorakit.delete_adapter(self.model, "new")
        return "ok"


@pytest.fixture(scope="module")
def setup():
    return Setup()


def test_the_unmutated_files_load(setup):
    assert setup.try_load(setup.weights, setup.config) == "ok"


# ---------------------------------------------------------------------------- byte-level mutations
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
)


def mutate(data: bytes, ops, focus: int) -> bytes:
    """Apply ops; positions fall mostly in the first ``focus`` bytes (length + JSON header)."""
    b = bytearray(data)
    for kind, pos, arg in ops:
        if not b:
            break
        i = pos % (focus if pos % 4 and focus < len(b) else len(b))
        if kind == "flip":
            b[i] ^= arg
        elif kind == "set":
            b[i] = arg
        elif kind == "truncate":
            del b[i:]
        elif kind == "insert":
            b[i:i] = arg
        else:
            del b[i:i + arg]
    return bytes(b)


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4), strict=st.booleans())
def test_mutated_weight_bytes(setup, ops, strict):
    setup.try_load(mutate(setup.weights, ops, 8 + setup.header_len), setup.config, strict)


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_config_bytes(setup, ops):
    raw = json.dumps(setup.config).encode()
    setup.try_load(setup.weights, mutate(raw, ops, len(raw)))


# ---------------------------------------------------------------------------- structured mutations
def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


@FUZZ
@given(entry=st.integers(0, 100), field=st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "new"]),
       value=json_values | st.sampled_from(["F16", "BF16", "F64", "I8", "BOOL", "F8_E4M3"]),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 8]))
def test_mutated_header_fields(setup, entry, field, value, length_delta):
    header, data = _split(setup.weights)
    keys = sorted(k for k in header if k != "__metadata__")
    if field == "__metadata__":
        header["__metadata__"] = value if not isinstance(value, dict) else {**header["__metadata__"], **value}
    elif field == "new":
        header[f"base_model.model.x{entry}.lora_A.weight"] = value
    else:
        header[keys[entry % len(keys)]][field] = value
    text = json.dumps(header).encode()
    setup.try_load((len(text) + length_delta).to_bytes(8, "little") + text + data, setup.config)


@FUZZ
@given(key=st.sampled_from(["r", "lora_alpha", "lora_dropout", "peft_type", "bias", "target_modules",
                            "rank_pattern", "alpha_pattern", "modules_to_save", "use_rslora", "fan_in_fan_out",
                            "exclude_modules", "task_type", "init_lora_weights", "use_dora", "layers_to_transform",
                            "base_model_name_or_path", "new_field"]),
       value=json_values | st.sampled_from([1, 2, 4, "all-linear", ["q_proj"], {"q_proj": 1}, {".*": 2}, "(",
                                            "LORA", 0.5, -1, 1e308])
       | st.lists(st.sampled_from(["q_proj", "v_proj", "embed_tokens", "k_proj", "lm_head", "norm", "", "("]),
                  max_size=3),
       drop=st.booleans())
def test_mutated_config_values(setup, key, value, drop):
    config = dict(setup.config)
    if drop:
        config.pop(key, None)
    else:
        config[key] = value
    setup.try_load(setup.weights, config)


@FUZZ
@given(which=st.integers(0, 100), shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8]),
       fill=st.sampled_from([0.0, 1.0, 1e30, float("nan"), -float("inf")]))
def test_replaced_tensors(setup, which, shape, dtype, fill):
    from safetensors.torch import load, save
    tensors = load(setup.weights)
    key = sorted(tensors)[which % len(tensors)]
    tensors[key] = torch.full(shape, fill).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    setup.try_load(save(tensors, metadata=_split(setup.weights)[0]["__metadata__"]), setup.config)
