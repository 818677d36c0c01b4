"""lorakit.loss.linear_cross_entropy against F.cross_entropy(h W^T + b, y): values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError, ShapeMismatch
from lorakit.loss import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: see conftest.one_thread


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def data(lead=(3, 7), hid=12, vocab=50, seed=0, ignore_frac=0.2, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(*lead, hid, generator=g, device=device, dtype=dtype)
    w = torch.randn(vocab, hid, generator=g, device=device, dtype=dtype) / hid ** 0.5
    b = torch.randn(vocab, generator=g, device=device, dtype=dtype)
    y = torch.randint(0, vocab, lead, generator=g, device=device)
    y[torch.rand(lead, generator=g, device=device) < ignore_frac] = -100
    return h, w, b, y


def grads(fn, h, w, b, y, **kw):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    loss = fn(h, w, y, b, **kw)
    ins = (h, w) + ((b,) if b is not None else ())
    return (loss,) + torch.autograd.grad(loss * 1.3, ins)


def reference(h, w, y, b=None, reduction="mean", **_):
    return F.cross_entropy(F.linear(h, w, b).flatten(0, -2).float(), y.flatten(), reduction=reduction)


@pytest.mark.parametrize("chunk", [None, 1, 4, 5, 100])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_cross_entropy_values_and_gradients(chunk, use_bias, reduction):
    h, w, b, y = data(seed=chunk or 0)
    b = b if use_bias else None
    got = grads(linear_cross_entropy, h, w, b, y, chunk_size=chunk, reduction=reduction)
    want = grads(reference, h, w, b, y, reduction=reduction)
    for a, ref in zip(got, want):
        assert rel(a, ref) < 1e-5


def test_reduction_none_gives_per_row_losses_with_zeros_for_ignored():
    h, w, b, y = data(lead=(4, 5))
    got = linear_cross_entropy(h, w, y, b, reduction="none", chunk_size=3)
    assert got.shape == (4, 5)
    want = F.cross_entropy(F.linear(h, w, b).flatten(0, 1), y.flatten(), reduction="none").view(4, 5)
    assert rel(got, want) < 1e-6 and torch.all(got[y == -100] == 0)


def test_only_hidden_needs_grad_and_frozen_head_gets_none():
    h, w, _, y = data()
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, y, chunk_size=4)
    (gh,) = torch.autograd.grad(loss, (h,))
    hh = h.detach().requires_grad_()
    (want,) = torch.autograd.grad(reference(hh, w, y), (hh,))
    assert rel(gh, want) < 1e-5


def test_all_ignored_gives_zero_not_nan():
    h, w, _, y = data(lead=(2, 3))
    y.fill_(-100)
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, y)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_custom_ignore_index():
    h, w, b, y = data(lead=(10,), ignore_frac=0.0)
    y[::3] = 7
    got = linear_cross_entropy(h, w, y, b, ignore_index=7)
    want = F.cross_entropy(F.linear(h, w, b), y, ignore_index=7)
    assert rel(got, want) < 1e-6


def test_bfloat16_hidden_close_to_float32():
    h, w, b, y = data(lead=(6, 8), hid=32, vocab=64, dtype=torch.bfloat16)
    got = grads(linear_cross_entropy, h, w, None, y, chunk_size=10)
    want = grads(reference, h.float(), w.float(), None, y)
    assert got[1].dtype == torch.bfloat16
    for a, ref in zip(got, want):
        assert rel(a, ref) < 2e-2


def test_bad_shapes_and_reduction_are_refused():
    h, w, _, y = data()
    with pytest.raises(ShapeMismatch, match="do not fit"):
        linear_cross_entropy(h, w[:, :5], y)
    with pytest.raises(ShapeMismatch):
        linear_cross_entropy(h, w, y[:, :3])
    with pytest.raises(ConfigError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="avg")


def test_no_logits_kept_for_backward():
    h, w, _, y = data(lead=(64,), hid=8, vocab=1000)
    h.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_cross_entropy(h, w, y, chunk_size=16)
    assert sum(t.numel() for t in saved) <= h.numel()        # dH only, never (N, V)


@pytest.mark.gpu
@cuda
def test_gpu_large_vocab_bfloat16():
    h, w, _, y = data(lead=(2048,), hid=512, vocab=32000, dtype=torch.bfloat16, device="cuda")
    got = grads(linear_cross_entropy, h, w, None, y, chunk_size=700)
    want = grads(reference, h.float(), w.float(), None, y)
    for a, ref in zip(got, want):
        assert rel(a, ref) < 1e-2


def test_under_autocast_matches_float32():
    h, w, _, y = data(lead=(5, 4), hid=16, vocab=40)
    want = grads(reference, h, w, None, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads(linear_cross_entropy, h, w, None, y)
    for a, ref in zip(got, want):
        assert a.dtype == ref.dtype and rel(a, ref) < 1e-5
