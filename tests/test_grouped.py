"""q, k and v as one node (lorakit.grouped): the same function and gradients as three LoRA
linears (float32: relative error < 1e-5), formed only when the model calls the members on one
input, undone on any other pattern, invisible to copying, pickling and in-place edits of the
outputs. GPU test (bfloat16, Triton W' builder: < 1e-2) marked ``gpu``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lorakit
from lorakit import grouped
from conftest import TOKENS64, assert_close, loss_and_grads, randomize_adapters, rel_errors, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = TOKENS64


class Count:
    """Counts runs of the grouped node."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = grouped._SharedLinearFn.apply

        def apply(*args):
            self.n += 1
            return orig(*args)
        monkeypatch.setattr(grouped._SharedLinearFn, "apply", apply)


def lora_llama(**cfg):
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL7, **cfg))
    randomize_adapters(model, std=0.2)
    return model


def reference(model):
    ref = copy.deepcopy(model)
    grouped.detach(ref)
    return ref


def assert_grouped_like_separate(model, monkeypatch, nodes=2):
    """A watched forward, then a grouped one (``nodes`` group runs), equal to separate nodes."""
    ref = reference(model)
    count = Count(monkeypatch)
    loss_and_grads(model)
    got = loss_and_grads(model)
    assert count.n == nodes
    assert_close(got, loss_and_grads(ref), 1e-5)
    return got


# ---------------------------------------------------------------------------- in a Llama
def test_inject_links_q_k_v_and_the_group_forms_after_one_forward(monkeypatch):
    model = lora_llama()
    assert grouped.attached(model) == 2
    ref = reference(model)
    count = Count(monkeypatch)
    first = loss_and_grads(model)
    assert count.n == 0                                  # the first forward only watches
    second = loss_and_grads(model)
    assert count.n == 2                                  # one node per layer from then on
    want = loss_and_grads(ref)
    assert_close(first, want, 1e-5)
    assert_close(second, want, 1e-5)
    for layer in model.model.layers:
        g = layer.self_attn.q_proj._group
        assert g.confirmed and not g.refused and g.pending is None    # every output was taken


def test_grouped_equals_separate_for_other_scales_and_ranks(monkeypatch):
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL7, rank_pattern={"k_proj": 2},
                                             alpha_pattern={"v_proj": 3}))
    randomize_adapters(model, std=0.2)
    assert_grouped_like_separate(model, monkeypatch)


def test_lora_on_q_and_v_only_groups_those_two(monkeypatch):
    """PEFT's default targets for Llama: k_proj stays a plain linear, called between them."""
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, std=0.2)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj._group.members == (attn.q_proj, attn.v_proj)
    assert_grouped_like_separate(model, monkeypatch)


def test_deleting_an_adapter_relinks_the_layers_that_are_left(monkeypatch):
    """Adapter "a" on q, k, v and "b" on q, v: deleting "a" puts k's base back; q and v form a
    group of two (a stale group would still list the freed k)."""
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]), name="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), name="b")
    randomize_adapters(model, std=0.2)
    loss_and_grads(model)
    loss_and_grads(model)
    lorakit.delete_adapter(model, "a")
    attn = model.model.layers[0].self_attn
    assert type(attn.k_proj) is nn.Linear and attn.q_proj._group.members == (attn.q_proj, attn.v_proj)
    assert lorakit.active_adapter(model) == "b"
    assert_grouped_like_separate(model, monkeypatch)
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj"]), name="c")
    lorakit.delete_adapter(model, "b")                   # only q is left with LoRA: no group
    assert grouped.attached(model) == 0 and attn.q_proj._group is None


def test_float32_adapters_on_a_bfloat16_base():
    model = tiny_llama().train().to(torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL7, adapter_dtype="float32"))
    randomize_adapters(model, std=0.2)
    ref = reference(model)
    loss_and_grads(model)
    got, want = loss_and_grads(model), loss_and_grads(ref)
    assert all(g.dtype == torch.float32 for n, g in got[1].items() if "lora_" in n)
    assert_close(got, want, 2e-2)


def test_frozen_adapters_and_no_input_gradient(monkeypatch):
    """Only B trainable: the node computes what is asked (dB; dX for the layers below)."""
    model = lora_llama()
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    got = assert_grouped_like_separate(model, monkeypatch)
    assert all("lora_A" not in n for n in got[1])


def test_not_formed_where_it_does_not_apply(monkeypatch):
    count = Count(monkeypatch)
    model = lora_llama(dropout=0.1)                      # dropout while training: separate nodes
    loss_and_grads(model)
    loss_and_grads(model)
    assert count.n == 0
    model.eval()                                         # no dropout in eval mode: one node (after watching once)
    loss_and_grads(model)
    loss_and_grads(model)
    assert count.n == 2
    model = lora_llama()
    loss_and_grads(model)
    short = IDS[:1, :4]                                  # 4 tokens: the unmerged form, separate nodes
    loss_and_grads(model, short)
    with torch.no_grad():
        model(IDS)
    assert count.n == 2
    h = model.model.layers[0].self_attn.k_proj.register_forward_pre_hook(lambda m, a: None)
    loss_and_grads(model)                                # a hooked member: layer 0 runs separately
    assert count.n == 3
    h.remove()
    with lorakit.disable_adapters(model):
        model(IDS)
    assert count.n == 3


def test_unload_detaches_and_the_outputs_may_be_modified_in_place():
    model = lora_llama()
    loss_and_grads(model)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32, 32, requires_grad=True)
    a = q(x)
    b = model.model.layers[0].self_attn.k_proj(x)
    c = model.model.layers[0].self_attn.v_proj(x)
    a.mul_(2)                                            # separate tensors, not autograd views of one
    (a.sum() + b.square().sum() + c.sum()).backward()
    assert x.grad is not None
    base = lorakit.unload(model)
    assert grouped.attached(base) == 0


# ---------------------------------------------------------------------------- call patterns
class Attention(nn.Module):
    """q, k, v on one input, or on ``kv`` (cross-attention), in a chosen order."""

    def __init__(self, bias=False):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(32, n, bias=bias) for n in (32, 16, 16))
        self.order = "qkv"

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        outs = {}
        for name in self.order:
            outs[name] = getattr(self, name + "_proj")(x if name == "q" else kv)
        return outs["q"].sum(-1, keepdim=True) * outs["k"].mean(-1, keepdim=True) + outs["v"].square().mean()


def attention(bias=False, **cfg):
    torch.manual_seed(0)
    m = Attention(bias)
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], **cfg))
    randomize_adapters(m, std=0.2)
    return m


def grads(m, x, kv=None):
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = m(x, kv)
    y.sum().backward()
    return y.detach(), [x.grad] + [p.grad for p in m.parameters() if p.requires_grad]


def same(a, b, rel=1e-5):
    (ya, ga), (yb, gb) = a, b
    assert torch.allclose(ya, yb, rtol=rel, atol=1e-6)
    for u, v in zip(ga, gb):
        assert (u - v).norm() <= rel * v.norm()


X = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bias", [False, True])
def test_self_attention_groups(monkeypatch, bias):
    m = attention(bias)
    ref = reference(m)
    count = Count(monkeypatch)
    for _ in range(3):
        same(grads(m, X), grads(ref, X))
    assert count.n == 2


def test_cross_attention_never_groups(monkeypatch):
    m, count = attention(), Count(monkeypatch)
    ref = reference(m)
    kv = torch.randn(4, 16, 32)
    for _ in range(3):
        same(grads(m, X, kv), grads(ref, X, kv))
    assert count.n == 0 and m.q_proj._group.refused


def test_other_call_orders_never_group(monkeypatch):
    m, count = attention(), Count(monkeypatch)
    m.order = "kqv"
    ref = reference(m)
    for _ in range(3):
        same(grads(m, X), grads(ref, X))
    assert count.n == 0 and m.q_proj._group.refused


def test_a_changed_pattern_after_forming_stops_the_group(monkeypatch):
    m, count = attention(), Count(monkeypatch)
    ref = reference(m)
    grads(m, X)
    grads(m, X)
    assert count.n == 1
    kv = torch.randn(4, 16, 32)
    same(grads(m, X, kv), grads(ref, X, kv))              # k reads another tensor: computed on its own
    assert m.q_proj._group.refused and m.q_proj._group.pending is None
    same(grads(m, X), grads(ref, X))
    assert count.n == 2                                   # the one that was refused; none after


def test_a_leader_called_alone_never_groups(monkeypatch):
    m, count = attention(), Count(monkeypatch)
    for _ in range(3):
        m.q_proj(X).sum().backward()
    assert count.n == 0 and not m.q_proj._group.confirmed


def test_mixed_biases_run_separately(monkeypatch):
    m, count = attention(), Count(monkeypatch)
    m.k_proj.base.bias = nn.Parameter(torch.zeros(16), requires_grad=False)
    ref = reference(m)
    for _ in range(3):
        same(grads(m, X), grads(ref, X))
    assert count.n == 0


def test_copies_and_pickles_keep_their_own_group():
    m = attention()
    grads(m, X)
    grads(m, X)
    for c in (copy.deepcopy(m), torch.load(io.BytesIO(_pickled(m)), weights_only=False)):
        g = c.q_proj._group
        assert g is c.k_proj._group is c.v_proj._group and g.members == (c.q_proj, c.k_proj, c.v_proj)
        assert g.confirmed and g.pending is None
        same(grads(c, X), grads(m, X))


@pytest.mark.parametrize("cross", [False, True])
def test_under_torch_compile(cross):
    """fullgraph compile: self-attention runs the lorakit::shared_linear operator (forming from
    the traced calls, no watched forward needed); cross-attention refuses the group while
    tracing and retraces without it. Both equal the separate nodes."""
    from lorakit import compiled
    if not compiled.AVAILABLE:
        pytest.skip("needs torch.library.register_fake")
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    m = attention()
    ref = reference(m)
    kv = torch.randn(4, 16, 32) if cross else None
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(m, backend=cnt, fullgraph=True)
    for _ in range(2):
        m.zero_grad(set_to_none=True)
        x = X.clone().requires_grad_(True)
        fn(x, kv).sum().backward()
        got = [x.grad] + [p.grad for p in m.parameters() if p.requires_grad]
        same((fn(X, kv).detach(), got), grads(ref, X, kv))
    torch._dynamo.reset()
    assert m.q_proj._group.refused == cross
    last = [str(n.target) for n in cnt.graphs[-1].graph.nodes if n.op == "call_function"]
    assert any("shared_linear" in t for t in last) != cross     # (cross: the first trace had it, then refused)


def test_shallow_copies_run_their_own_nodes(monkeypatch):
    """nn.DataParallel's replicas are shallow copies that share the original's Group: they must
    neither crash nor take the original's outputs."""
    m, count = attention(), Count(monkeypatch)
    grads(m, X)
    c = copy.copy(m)
    c._modules = {k: copy.copy(v) for k, v in m._modules.items()}
    assert c.q_proj._group is m.q_proj._group
    same(grads(c, X), grads(reference(m), X))
    assert count.n == 0


def test_a_deleted_model_is_freed_without_the_cycle_collector():
    import gc
    import weakref
    m = attention()
    grads(m, X)
    grads(m, X)
    gone = weakref.ref(m.q_proj)
    gc.disable()
    try:
        del m
        assert gone() is None
    finally:
        gc.enable()


def _pickled(m) -> bytes:
    buf = io.BytesIO()
    torch.save(m, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------- bfloat16
def check_bfloat16(monkeypatch, device):
    """bfloat16, grouped and separate, each against the float32 model: the grouped node is no
    less accurate than the separate layers (on the GPU it builds W' with the Triton kernel,
    all three parts in one launch)."""
    ref = lora_llama().to(device)
    low = copy.deepcopy(ref).to(torch.bfloat16)
    ids = IDS.to(device)
    want = loss_and_grads(ref, ids)
    plain = loss_and_grads(reference(low), ids)
    count = Count(monkeypatch)
    loss_and_grads(low, ids)
    got = loss_and_grads(low, ids)
    assert count.n == 2
    e_got, e_plain = rel_errors(got, want), rel_errors(plain, want)
    for n in e_plain:
        assert e_got[n] <= max(1.5 * e_plain[n], 1e-2), (n, e_got[n], e_plain[n])


def test_bfloat16_on_cpu(monkeypatch):
    check_bfloat16(monkeypatch, "cpu")


@pytest.mark.gpu
@cuda
def test_gpu_grouped_bfloat16(monkeypatch):
    check_bfloat16(monkeypatch, "cuda")
