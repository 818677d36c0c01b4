"""LoRA layers, one module at a time: forward = the formula, delta_weight = the forward's update,
merge / unmerge, initialisation, dropout, dtypes, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear, adapter_shapes, supported_base, unsupported_reason


def gpt2_conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D
    m = Conv1D(nf, nx)                       # weight (nx, nf): y = x @ W + b
    nn.init.normal_(m.weight, std=0.2)
    nn.init.normal_(m.bias, std=0.2)
    return m


class Holder(nn.Module):
    """A one-child container: inject adapts ``layer``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def adapted(layer: nn.Module, r: int = 3, alpha: float = 6.0, seed: int = 0, **cfg) -> Holder:
    """``layer`` inside a Holder with one adapter whose A and B are random (B != 0)."""
    torch.manual_seed(seed)
    m = lorakit.inject(Holder(layer), lorakit.LoraConfig(r=r, alpha=alpha, target_modules=["layer"], **cfg))
    with torch.no_grad():
        for p in lorakit.adapter_parameters(m):
            p.normal_(0, 0.5)
    return m


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------- forward = formula
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_is_base_plus_scaled_low_rank(bias):
    lin = nn.Linear(7, 5, bias=bias)
    m = adapted(lin, r=3, alpha=6.0)
    layer = m.layer
    assert isinstance(layer, LoraLinear) and layer.base is lin and layer.weight is lin.weight
    a = layer.adapters["default"]
    assert a.lora_A.shape == (3, 7) and a.lora_B.shape == (5, 3) and a.scale == 2.0
    x = torch.randn(2, 4, 7)
    expected = F.linear(x, lin.weight, lin.bias) + 2.0 * (x @ a.lora_A.t() @ a.lora_B.t())
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_uses_transposed_weight():
    conv = gpt2_conv1d(6, 9)                  # fan_in_fan_out: weight (k=6, d=9)
    m = adapted(conv, r=2, alpha=4.0)
    layer = m.layer
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (6, 9)
    a = layer.adapters["default"]
    assert a.lora_A.shape == (2, 6) and a.lora_B.shape == (9, 2)
    x = torch.randn(3, 6)
    expected = x @ conv.weight + conv.bias + 2.0 * (x @ a.lora_A.t() @ a.lora_B.t())
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)
    # the merged update has the base weight's own (k, d) layout
    assert layer.delta_weight("default").shape == conv.weight.shape


def test_embedding_forward_and_padding_idx():
    emb = nn.Embedding(11, 4, padding_idx=0)
    m = adapted(emb, r=2, alpha=2.0)
    a = m.layer.adapters["default"]
    assert isinstance(m.layer, LoraEmbedding)
    assert a.lora_A.shape == (2, 11) and a.lora_B.shape == (4, 2)
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    expected = emb.weight[ids] + 1.0 * (a.lora_A.t()[ids] @ a.lora_B.t())
    torch.testing.assert_close(m(ids), expected, rtol=1e-5, atol=1e-6)
    # padding_idx keeps its "no gradient" meaning for the adapter too
    m(ids).sum().backward()
    assert torch.all(a.lora_A.grad[:, 0] == 0) and a.lora_A.grad[:, 3].abs().sum() > 0


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1),
    lambda: nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
    lambda: nn.Conv2d(2, 3, 1, bias=False),
], ids=["conv1d", "conv2d-strided-dilated", "conv2d-1x1"])
def test_conv_forward_equals_conv_with_delta_kernel(conv):
    base = conv()
    m = adapted(base, r=2, alpha=3.0)
    layer = m.layer
    assert isinstance(layer, LoraConv)
    x = torch.randn(2, base.in_channels, *([9] * len(base.kernel_size)))
    fn = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
    w = base.weight + layer.delta_weight("default")
    expected = fn(x, w, base.bias, base.stride, base.padding, base.dilation)
    assert rel_err(m(x), expected) < 1e-5
    a_shape, b_shape = adapter_shapes(base, 2)
    assert layer.adapters["default"].lora_A.shape == a_shape == (2, base.in_channels, *base.kernel_size)
    assert layer.adapters["default"].lora_B.shape == b_shape == (base.out_channels, 2) + (1,) * len(base.kernel_size)


# ---------------------------------------------------------------------------- init
def test_init_b_zero_gives_exact_base_output_and_a_follows_init():
    torch.manual_seed(0)
    for init in ("kaiming", "gaussian"):
        lin = nn.Linear(64, 32)
        x = torch.randn(4, 64)
        expected = lin(x)
        m = lorakit.inject(Holder(lin), lorakit.LoraConfig(r=16, init=init, target_modules=["layer"]))
        a = m.layer.adapters["default"]
        assert torch.equal(a.lora_B, torch.zeros_like(a.lora_B))
        assert torch.equal(m(x), expected)
        if init == "kaiming":     # kaiming_uniform(a=sqrt(5)) on (r, k): U(-1/sqrt(k), 1/sqrt(k))
            assert a.lora_A.abs().max() <= 1 / math.sqrt(64) and a.lora_A.abs().max() > 0.5 / math.sqrt(64)
        else:                     # N(0, 1/r), as PEFT's "gaussian"
            assert abs(a.lora_A.std().item() - 1 / 16) < 0.01


def test_embedding_init_is_peft_s_a_zero_b_normal():
    emb = nn.Embedding(10, 6)
    ids = torch.arange(10)
    expected = emb(ids)
    m = lorakit.inject(Holder(emb), lorakit.LoraConfig(r=2, target_modules=["layer"]))
    a = m.layer.adapters["default"]
    assert torch.equal(a.lora_A, torch.zeros_like(a.lora_A)) and a.lora_B.abs().sum() > 0
    assert torch.equal(m(ids), expected)


# ---------------------------------------------------------------------------- dropout, dtypes
def test_dropout_acts_on_adapter_input_only_in_training():
    lin = nn.Linear(8, 8)
    m = adapted(lin, r=2, alpha=2.0, dropout=0.5)
    a = m.layer.adapters["default"]
    x = torch.randn(16, 8)
    m.eval()
    torch.testing.assert_close(m(x), lin(x) + (x @ a.lora_A.t() @ a.lora_B.t()), rtol=1e-5, atol=1e-6)
    m.train()
    torch.manual_seed(5)
    y = m(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, True)
    torch.testing.assert_close(y, lin(x) + (xd @ a.lora_A.t() @ a.lora_B.t()), rtol=1e-5, atol=1e-6)


def test_float32_adapter_on_bfloat16_base():
    lin = nn.Linear(8, 4).to(torch.bfloat16)
    m = adapted(lin, adapter_dtype="float32")
    a = m.layer.adapters["default"]
    assert a.lora_A.dtype == torch.float32 and lin.weight.dtype == torch.bfloat16
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    ref = lin(x).float() + 2.0 * (x.float() @ a.lora_A.t() @ a.lora_B.t())
    assert rel_err(y.float(), ref) < 2e-2
    y.float().sum().backward()
    assert a.lora_A.grad.dtype == torch.float32 and lin.weight.grad is None


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("make,dropout", [(lambda: nn.Linear(6, 5), 0.0), (lambda: gpt2_conv1d(6, 5), 0.0),
                                          (lambda: nn.Linear(6, 5), 0.3)], ids=["linear", "gpt2-conv1d", "dropout"])
def test_gradients_match_plain_autograd(make, dropout):
    base = make()
    m = adapted(base, r=2, alpha=4.0, dropout=dropout).train()
    a = m.layer.adapters["default"]
    x = torch.randn(3, 4, 6, requires_grad=True)
    torch.manual_seed(1)
    m(x).pow(2).sum().backward()
    got = (x.grad.clone(), a.lora_A.grad.clone(), a.lora_B.grad.clone())
    assert base.weight.grad is None
    A, B = a.lora_A.detach().requires_grad_(), a.lora_B.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    w = base.weight.t() if m.layer.fan_in_fan_out else base.weight
    torch.manual_seed(1)
    xd = F.dropout(x2, dropout, True) if dropout else x2
    (F.linear(x2, w, base.bias) + 2.0 * (xd @ A.t() @ B.t())).pow(2).sum().backward()
    for g, e in zip(got, (x2.grad, A.grad, B.grad)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- merge at layer level
@pytest.mark.parametrize("make,inp", [
    (lambda: nn.Linear(6, 5), lambda: torch.randn(4, 6)),
    (lambda: gpt2_conv1d(6, 5), lambda: torch.randn(4, 6)),
    (lambda: nn.Embedding(9, 5), lambda: torch.randint(0, 9, (4, 3))),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 5, 5)),
], ids=["linear", "gpt2-conv1d", "embedding", "conv2d"])
def test_layer_merge_unmerge(make, inp):
    m = adapted(make())
    layer, x = m.layer, inp()
    w0 = layer.base.weight.detach().clone()
    y = m(x)
    layer.merge("default")
    assert layer.merged_name == "default" and layer.active_adapter() is None
    assert rel_err(m(x), y) < 1e-5
    torch.testing.assert_close(layer.base.weight.detach(), w0 + layer.delta_weight("default"))
    with pytest.raises(lorakit.MergedStateError, match="already merged"):
        layer.merge("default")
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight.detach(), w0, rtol=0, atol=1e-6)
    assert torch.equal(m(x), y) or rel_err(m(x), y) < 1e-6


def test_merge_in_bfloat16_rounds_once():
    lin = nn.Linear(32, 32).to(torch.bfloat16)
    m = adapted(lin, adapter_dtype="float32")
    w0 = lin.weight.detach().clone()
    expected = (w0.float() + m.layer.delta_weight("default", torch.float32)).to(torch.bfloat16)
    m.layer.merge("default")
    assert torch.equal(lin.weight.detach(), expected)


# ---------------------------------------------------------------------------- support checks
def test_supported_and_unsupported_types():
    assert supported_base(nn.Linear(2, 2)) is LoraLinear
    assert supported_base(gpt2_conv1d(2, 2)) is LoraLinear
    assert supported_base(nn.Embedding(2, 2)) is LoraEmbedding
    assert supported_base(nn.Conv1d(2, 2, 1)) is LoraConv and supported_base(nn.Conv2d(2, 2, 1)) is LoraConv
    for m in (nn.LayerNorm(2), nn.Conv3d(2, 2, 1), nn.GRU(2, 2), nn.ConvTranspose2d(2, 2, 1)):
        assert supported_base(m) is None
    assert "groups=2" in unsupported_reason(nn.Conv2d(4, 4, 3, groups=2))
    assert "reflect" in unsupported_reason(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert unsupported_reason(nn.Conv1d(2, 2, 3)) is None
    with pytest.raises(lorakit.UnsupportedModule, match="groups=2"):
        LoraConv(nn.Conv2d(4, 4, 3, groups=2), lorakit.LoraState())


# ---------------------------------------------------------------------------- torch.compile
class Mixed(nn.Module):
    """Every layer kind lorakit adapts: Embedding -> Linear -> GPT-2 Conv1D -> Conv1d -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 8)
        self.c1d = gpt2_conv1d(8, 8)
        self.conv = nn.Conv1d(8, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = torch.relu(self.c1d(torch.relu(self.lin(self.emb(ids)))))     # (B, T, 8)
        h = self.conv(h.transpose(1, 2)).mean(-1)                          # (B, 4)
        return self.head(h)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = Mixed()
    ids = torch.randint(0, 20, (2, 5))
    base_out = m(ids).detach()
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=4, target_modules=["emb", "lin", "c1d", "conv", "head"]))
    with torch.no_grad():
        for p in lorakit.adapter_parameters(m):
            p.normal_(0, 0.3)
    eager = m(ids)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in lorakit.adapter_parameters(m)]
    m.zero_grad()
    # aot_eager: Dynamo must capture one full graph (forward and backward through AOTAutograd)
    # without building C++ kernels, which would take a minute on a CPU runner.
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(ids)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    for p, g in zip(lorakit.adapter_parameters(m), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    with lorakit.disable_adapters(m):       # the shared state is guarded: recompiles, exactly the base
        assert torch.equal(compiled(ids).detach(), base_out)
    torch.testing.assert_close(compiled(ids), eager, rtol=1e-5, atol=1e-6)

