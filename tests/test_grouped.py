"""q, k and v as one node (lorakit.grouped): the same function and gradients as three LoRA
linears (float32: relative error < 1e-5), formed only where the parent's forward calls the
members on one input (read from its source), the same decision in every call (activation
checkpointing recomputes the same node), invisible to copying, pickling and in-place edits of
the outputs. GPU test (bfloat16, Triton W' builder: < 1e-2) marked ``gpu``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lorakit
from lorakit import grouped, ops
from conftest import (TOKENS64, CountCalls, assert_close, assert_no_less_accurate, loss_and_grads, randomize_adapters,
                      tiny_llama)

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = TOKENS64


def Count(monkeypatch):
    """Counts runs of the grouped node."""
    return CountCalls(monkeypatch, grouped._SharedLinearFn)


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
    """One forward and backward with ``nodes`` group runs, equal to separate nodes."""
    ref = reference(model)
    count = Count(monkeypatch)
    got = loss_and_grads(model)
    assert count.n == nodes
    assert_close(got, loss_and_grads(ref), 1e-5)
    return got


# ---------------------------------------------------------------------------- in a Llama
def test_inject_links_q_k_v_and_every_forward_runs_one_node_per_layer(monkeypatch):
    model = lora_llama()
    assert grouped.attached(model) == 2
    for _ in range(2):
        assert_grouped_like_separate(model, monkeypatch)
    for layer in model.model.layers:
        assert layer.self_attn.q_proj._group.pending is None       # every output was taken


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_node(monkeypatch, reentrant):
    """Non-reentrant checkpointing checks that the recomputation saves what the forward saved."""
    model = lora_llama()
    ref = reference(model)
    for m in (model, ref):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    count = Count(monkeypatch)
    for _ in range(2):
        got = loss_and_grads(model)
    # 2 layers, 2 steps; the reentrant forward runs without gradients (no node), only its recomputation
    assert count.n == (4 if reentrant else 8)
    assert_close(got, loss_and_grads(ref), 1e-5)


@pytest.mark.parametrize("alphas", [{"v_proj": 3}, {"k_proj": 4}])
def test_grouped_equals_separate_for_other_scales_and_ranks(monkeypatch, alphas):
    """Unequal scales (gs from dY blockdiag(s_i B_i)), and unequal ranks with equal scales (gs
    from the dX GEMM's block-diagonal band, whose blocks are then of different widths)."""
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL7, rank_pattern={"k_proj": 2},
                                             alpha_pattern=alphas))
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


def test_forms_where_the_merged_form_ties(monkeypatch):
    """q at 32 tokens of hidden 32 (n (d + k) = 2 d k, as q at the 8B shape and 4096 tokens): both
    forms move the same bytes, and the node saves more, so it forms; at 30 tokens q takes the
    unmerged form on its own and every member runs its own node."""
    count = Count(monkeypatch)
    model = lora_llama()
    loss_and_grads(model, IDS[:2])                      # 2 x 16 tokens
    assert count.n == 2
    loss_and_grads(model, IDS[:2, :15].reshape(1, 30))   # 30 tokens
    assert count.n == 2
    assert not ops.merged_is_cheaper(32, 32, 32, True, c=1.0) and ops.merged_is_cheaper(32, 32, 32, True, ties=True, c=1.0)


def test_not_formed_where_it_does_not_apply(monkeypatch):
    count = Count(monkeypatch)
    model = lora_llama(dropout=0.1)                      # dropout while training: separate nodes
    loss_and_grads(model)
    assert count.n == 0
    model.eval()                                         # no dropout in eval mode: one node
    loss_and_grads(model)
    assert count.n == 2
    model = lora_llama()
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
    """q, k and v called on one input, as attention blocks do."""

    def __init__(self, bias=False):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(32, n, bias=bias) for n in (32, 16, 16))

    def forward(self, x, kv=None):
        q = self.q_proj(x)
        k = self.k_proj(x)
        v = self.v_proj(x)
        return q.sum(-1, keepdim=True) * k.mean(-1, keepdim=True) + v.square().mean()


class CrossAttention(Attention):
    def forward(self, x, kv=None):
        q = self.q_proj(x)
        k = self.k_proj(kv)
        v = self.v_proj(kv)
        return q.sum(-1, keepdim=True) * k.mean(-1, keepdim=True) + v.square().mean()


class Reordered(Attention):
    def forward(self, x, kv=None):
        k = self.k_proj(x)
        q = self.q_proj(x)
        v = self.v_proj(x)
        return q.sum(-1, keepdim=True) * k.mean(-1, keepdim=True) + v.square().mean()


class Branching(Attention):
    def forward(self, x, kv=None):
        q = self.q_proj(x)
        if kv is None:
            k = self.k_proj(x)
        else:
            k = self.k_proj(kv)
        v = self.v_proj(x)
        return q.sum(-1, keepdim=True) * k.mean(-1, keepdim=True) + v.square().mean()


class Reassigning(Attention):
    def forward(self, x, kv=None):
        q = self.q_proj(x)
        x = x * 2
        k = self.k_proj(x)
        v = self.v_proj(x)
        return q.sum(-1, keepdim=True) * k.mean(-1, keepdim=True) + v.square().mean()


class InOneBranch(Attention):
    """All three in one branch (transformers' older Llama attention called them in an ``else``)."""

    def forward(self, x, kv=None):
        if kv is not None and kv.dim() == 0:
            q = k = v = x
        else:
            q = self.q_proj(x)
            k = self.k_proj(x)
            v = self.v_proj(x)
        return q.sum(-1, keepdim=True) * k.mean(-1, keepdim=True) + v.square().mean()


class InALoop(Attention):
    def forward(self, x, kv=None):
        out = 0
        for _ in range(1):
            q = self.q_proj(x)
            k = self.k_proj(x)
            v = self.v_proj(x)
            out = out + q.sum(-1, keepdim=True) * k.mean(-1, keepdim=True) + v.square().mean()
        return out


def attention(cls=Attention, bias=False, **cfg):
    torch.manual_seed(0)
    m = cls(bias)
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
KV = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("bias,cls", [(False, Attention), (True, Attention), (False, InOneBranch)])
def test_self_attention_groups(monkeypatch, bias, cls):
    m = attention(cls, bias=bias)
    ref = reference(m)
    count = Count(monkeypatch)
    for _ in range(2):
        same(grads(m, X), grads(ref, X))
    assert count.n == 2


@pytest.mark.parametrize("cls", [CrossAttention, Reordered, Branching, Reassigning, InALoop])
def test_other_call_patterns_never_group(monkeypatch, cls):
    """k and v on another variable, another order, calls split across branches, the input
    reassigned, calls in a loop."""
    assert not grouped.calls_on_one_input(cls, ("q_proj", "k_proj", "v_proj"))
    m, count = attention(cls), Count(monkeypatch)
    assert grouped.attached(m) == 0
    same(grads(m, X, KV), grads(attention(cls), X, KV))
    assert count.n == 0


def test_calls_on_another_tensor_run_separately(monkeypatch):
    """The source says one input; a caller passing another tensor to k still gets k of it."""
    m, count = attention(), Count(monkeypatch)
    ref = reference(m)
    want = [ref.q_proj(X), ref.k_proj(KV), ref.v_proj(X)]
    got = [m.q_proj(X), m.k_proj(KV), m.v_proj(X)]
    assert count.n == 1 and m.q_proj._group.pending is None
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)
    for _ in range(2):                                    # the leader alone: its own output, each time
        assert torch.allclose(m.q_proj(X), ref.q_proj(X), atol=1e-6)


def test_mixed_biases_run_separately(monkeypatch):
    m, count = attention(), Count(monkeypatch)
    m.k_proj.base.bias = nn.Parameter(torch.zeros(16), requires_grad=False)
    ref = reference(m)
    for _ in range(2):
        same(grads(m, X), grads(ref, X))
    assert count.n == 0


def test_copies_and_pickles_keep_their_own_group():
    m = attention()
    grads(m, X)
    for c in (copy.deepcopy(m), torch.load(io.BytesIO(_pickled(m)), weights_only=False)):
        g = c.q_proj._group
        assert g is c.k_proj._group is c.v_proj._group and g.members == (c.q_proj, c.k_proj, c.v_proj)
        assert g.pending is None
        same(grads(c, X), grads(m, X))


@pytest.mark.parametrize("cls", [Attention, CrossAttention])
def test_under_torch_compile(cls):
    """fullgraph compile: self-attention runs the lorakit::shared_linear operator, cross-attention
    the separate linears; both equal the separate nodes in eager mode."""
    from lorakit import compiled
    if not compiled.AVAILABLE:
        pytest.skip("needs torch.library.register_fake")
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    m = attention(cls)
    ref = reference(m)
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(m, backend=cnt, fullgraph=True)
    for _ in range(2):
        m.zero_grad(set_to_none=True)
        x = X.clone().requires_grad_(True)
        y = fn(x, KV)
        y.sum().backward()
        same((y.detach(), [x.grad] + [p.grad for p in m.parameters() if p.requires_grad]), grads(ref, X, KV))
    torch._dynamo.reset()
    assert cnt.frame_count == 1
    names = [str(n.target) for n in cnt.graphs[0].graph.nodes if n.op == "call_function"]
    assert any("shared_linear" in t for t in names) == (cls is Attention)


def test_shallow_copies_run_their_own_nodes(monkeypatch):
    """nn.DataParallel's replicas are shallow copies that share the original's Group: they must
    neither crash nor take the original's outputs."""
    m, count = attention(), Count(monkeypatch)
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
    got = loss_and_grads(low, ids)
    assert count.n == 2
    assert_no_less_accurate(got, plain, want)


def test_bfloat16_on_cpu(monkeypatch):
    check_bfloat16(monkeypatch, "cpu")


@pytest.mark.gpu
@cuda
def test_gpu_grouped_bfloat16(monkeypatch):
    check_bfloat16(monkeypatch, "cuda")
