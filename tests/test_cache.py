"""The adapter cache (lorakit.cache): adapters in host memory, max_resident LRU, batches bring them in."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.cache import adapter_cache
from lorakit.errors import LoraError
from lorakit.multi import batch_adapters

from conftest import MLP, randomize_adapters

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NAMES = ["a", "b", "c", "d"]


@pytest.fixture
def saved(tmp_path):
    """Four adapters of different ranks saved from one MLP: {name: folder}."""
    torch.manual_seed(0)
    src = MLP()
    for i, n in enumerate(NAMES):
        lorakit.inject(src, lorakit.LoraConfig(r=2 + i, alpha=3 + i, target_modules=["layers.0", "layers.2"]), name=n)
    randomize_adapters(src)
    return {n: lorakit.save_adapter(src, tmp_path / n, name=n) for n in NAMES}


def fresh(saved, device=None, on_host=(), model_device="cpu"):
    torch.manual_seed(1)
    m = MLP().to(model_device)
    for n in NAMES:
        lorakit.load_adapter(m, saved[n], name=n, device="cpu" if n in on_host else device)
    return m


def rows_alone(m, x, names):
    out = []
    for i, n in enumerate(names):
        if n is None:
            with lorakit.disable_adapters(m):
                out.append(m(x[i:i + 1]))
        else:
            adapter_cache(m).fetch([n])
            lorakit.set_adapter(m, n)
            out.append(m(x[i:i + 1]))
    return torch.cat(out)


def params(m, n):
    return list(lorakit.adapter_parameters(m, n))


def test_load_on_host_and_batch_brings_it_in(saved):
    m = fresh(saved, on_host=("b", "d"))
    ref_model = fresh(saved)
    cache = adapter_cache(m)
    assert cache.resident() == ["a", "c"]
    assert not cache.is_resident("b") and all(p.device.type == "cpu" for p in params(m, "b"))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    names = ["b", None, "a", "d", "b"]
    with torch.no_grad():
        with batch_adapters(m, names):
            got = m(x)
        assert cache.resident() == ["c", "b", "a", "d"]
        assert torch.allclose(got, rows_alone(ref_model, x, names), rtol=1e-5, atol=1e-6)
        for n in NAMES:
            for p, q in zip(params(m, n), params(ref_model, n)):
                assert torch.equal(p, q)


def test_max_resident_evicts_least_recently_used(saved):
    m = fresh(saved, on_host=NAMES)
    cache = adapter_cache(m, max_resident=2)
    assert cache.resident() == []
    x = torch.randn(2, 16)
    with torch.no_grad():
        for names, resident in ((["a", "b"], ["a", "b"]), (["c", None], ["b", "c"]), (["b", "d"], ["b", "d"]),
                                (["a", "a"], ["d", "a"])):
            with batch_adapters(m, names):
                m(x)
            assert cache.resident() == resident, names
    with pytest.raises(LoraError, match="3 distinct adapters but .* max_resident=2"):
        with batch_adapters(m, ["a", "b", "c"]):
            pass
    cache.set_max_resident(1)
    assert cache.resident() == ["a"]
    with pytest.raises(LoraError, match="max_resident must be an integer"):
        adapter_cache(m, max_resident=0)


def test_evicting_keeps_changes_made_on_the_device(saved):
    m = fresh(saved)
    cache = adapter_cache(m, max_resident=3)
    assert cache.resident() == ["b", "c", "d"]                      # "a" was the least recently used
    cache.fetch(["a"])
    with torch.no_grad():
        for p in params(m, "a"):
            p.add_(1.0)                                             # as an optimizer step would
    want = [p.detach().clone() for p in params(m, "a")]
    cache.evict("a")
    cache.fetch(["b"])
    cache.fetch(["a"])
    assert all(torch.equal(p, w) for p, w in zip(params(m, "a"), want))
    lorakit.delete_adapter(m, "c")
    assert "c" not in cache.resident()


def test_load_device_must_be_host_or_the_models(saved):
    m = MLP()
    with pytest.raises(LoraError, match="device='meta'.*on cpu"):
        lorakit.load_adapter(m, saved["a"], name="a", device="meta")
    assert lorakit.adapter_names(m) == []


@pytest.mark.gpu
@cuda
def test_cuda_host_adapters_are_pinned_and_move_in_and_out(saved):
    m = fresh(saved, on_host=("a", "c"), model_device="cuda")
    ref_model = fresh(saved, model_device="cuda")
    assert all(p.device.type == "cpu" and p.is_pinned() for p in params(m, "a"))
    cache = adapter_cache(m, max_resident=2)
    x = torch.randn(4, 16, device="cuda")
    names = ["a", "c", None, "a"]
    with torch.no_grad(), batch_adapters(m, names):
        got = m(x)
    assert all(p.device.type == "cuda" for n in ("a", "c") for p in params(m, n))
    assert all(p.device.type == "cpu" and p.is_pinned() for n in ("b", "d") for p in params(m, n))
    assert torch.allclose(got, rows_alone(ref_model, x, names), rtol=1e-4, atol=1e-5)
    assert cache.resident() == ["a", "c"]
