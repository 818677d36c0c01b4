"""The lorakit:: custom operators that torch.compile runs (lorakit.compiled): registered
correctly (torch.library.opcheck: schema, fake tensors, autograd), used under compile for
the LoRA linear and the fused MLP, exact against the eager autograd functions (the same
code), and what the compiled graph keeps for backward: never W', never h = silu(g) * u.
GPU tests (inductor, bfloat16) are marked ``gpu``."""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd

import lorakit
from lorakit import compiled, fused, ops
from conftest import randomize_adapters, tiny_llama

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not compiled.AVAILABLE, reason="torch.library.custom_op needs torch >= 2.4")]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class Recorder:
    """An aot_autograd backend (min-cut partitioner, as inductor's) that records the forward
    and backward graphs' call targets and the tensors the forward saves for backward."""

    def __init__(self):
        self.targets, self.saved, self.feeds = [], [], []
        self.backend = aot_autograd(fw_compiler=self.fw, bw_compiler=self.bw, partition_fn=min_cut_rematerialization_partition)

    def fw(self, gm, _):
        self.targets += [n.target for n in gm.graph.nodes if n.op == "call_function"]
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        self.saved += [tuple(o.meta["val"].shape) for o in out[1:] if o.op != "placeholder" and "val" in o.meta]
        return make_boxed_func(gm)

    def bw(self, gm, _):
        self.targets += [n.target for n in gm.graph.nodes if n.op == "call_function"]
        self.feeds += [(str(n.target), str(n.args[0].target)) for n in gm.graph.nodes
                       if n.op == "call_function" and n.args and isinstance(n.args[0], torch.fx.Node)]
        return make_boxed_func(gm)

    def cat_feeds(self, name):
        """How many backward calls of the operator ``name`` take an aten.cat as their first argument."""
        return sum(1 for op, first in self.feeds if name in op and "aten.cat" in first)

    def called(self, name):
        return sum(1 for t in self.targets if name in str(t))


def linear_inputs(n, k, d, r, adapter_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, k, generator=g, requires_grad=True)
    w = torch.randn(d, k, generator=g) / k ** 0.5
    b = torch.randn(d, generator=g)
    A = (torch.randn(r, k, generator=g) / k ** 0.5).to(adapter_dtype).requires_grad_()
    B = (torch.randn(d, r, generator=g) * 0.1).to(adapter_dtype).requires_grad_()
    return x, w, b, A, B


def grads(fn, x, w, b, A, B, s):
    for t in (x, A, B):
        t.grad = None
    y = fn(x, w, b, A, B, s)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach()] + [t.grad.clone() for t in (x, A, B)]


# ---------------------------------------------------------------------------- registration
@pytest.fixture(params=[True, False], ids=["xa-in-gemm", "xa-apart"])
def xa_in_gemm(request, monkeypatch):
    """x A^T riding in the merged forward's GEMM (the output a column slice), or a GEMM of its own."""
    monkeypatch.setattr(ops, "XA_IN_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("merged", [True, False])
def test_opcheck_lora_linear(merged, xa_in_gemm):
    x, w, b, A, B = linear_inputs(5, 8, 6, 2)
    torch.library.opcheck(compiled.op("lora_linear"), (x, w, b, A, B, 1.5, merged))
    torch.library.opcheck(compiled.op("lora_linear"), (x, w, None, A, B, 1.5, merged))


@pytest.mark.parametrize("forms", [(True,) * 4, (False,) * 4])
@pytest.mark.parametrize("su", [1.0, 2.0])
def test_opcheck_gated_mlp(monkeypatch, forms, su):
    """Either form of each GEMM site (fused.mlp_forms) gives the fake kernel's layouts, the
    backward operator's too: with sg = su and gate|up backward merged, dX is a column slice of
    [dX | gs] (fused.dx_columns)."""
    monkeypatch.setattr(fused, "mlp_forms", lambda *a, **k: forms)
    g = torch.Generator().manual_seed(0)
    h, i, r = 8, 12, 2

    def p(*shape, grad=True):
        return (torch.randn(*shape, generator=g) * 0.3).requires_grad_(grad)
    ws = (p(i, h, grad=False), p(i, h, grad=False), p(h, i, grad=False))
    adapters = (p(r, h), p(i, r), p(r, h), p(i, r), p(r, i), p(h, r))
    x = p(3, 4, h)
    torch.library.opcheck(compiled.op("gated_mlp"), (x, *ws, *adapters, 2.0, su, 0.5))
    with torch.no_grad():
        _, gu, has = compiled.op("gated_mlp")(x, *ws, *adapters, 2.0, su, 0.5)
    dy = torch.randn(3, 4, h, generator=g)
    back = (dy, x.detach(), gu, has, *ws, *(a.detach() for a in adapters), 2.0, su, 0.5, [True] * 7)
    torch.library.opcheck(compiled.op("gated_mlp_backward"), back)
    dx = compiled.op("gated_mlp_backward")(*back)[0]
    assert dx.stride(-2) == (h + 2 * r if forms[3] and su == 2.0 else h)


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_shared_linear(bias, xa_in_gemm):
    g = torch.Generator().manual_seed(0)
    k, ds, rs = 8, (6, 4, 4), (2, 2, 3)

    def p(*shape, grad=True):
        return (torch.randn(*shape, generator=g) * 0.3).requires_grad_(grad)
    ws = [p(d, k, grad=False) for d in ds]
    bs = [p(d, grad=False) if bias else None for d in ds]
    args = (p(3, 5, k), ws, bs, [p(r, k) for r in rs], [p(d, r) for d, r in zip(ds, rs)], [2.0, 2.0, 0.5])
    torch.library.opcheck(compiled.op("shared_linear"), args)
    with torch.no_grad():
        xa = compiled.op("shared_linear")(*args)[-1]
    x, _, _, As, Bs, _ = args
    for scales in ([2.0, 2.0, 0.5], [2.0] * 3):                 # dX alone, or a column slice of [dX | gs]
        back = (torch.randn(3, 5, sum(ds), generator=g), x.detach(), xa, ws, [A.detach() for A in As],
                [B.detach() for B in Bs], scales, [True] * 7)
        torch.library.opcheck(compiled.op("shared_linear_backward"), back)


def test_fake_tensors_take_the_fake_kernel_never_the_implementation(monkeypatch):
    """Inductor propagates fake tensors through the graph: the real code (Triton launches on a
    GPU) must never see them; real tensors without gradients go straight to it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    calls = []
    real = compiled._linear
    monkeypatch.setattr(compiled, "_linear", lambda *a: calls.append(1) or real(*a))
    x, w, b, A, B = (t.detach() for t in linear_inputs(5, 8, 6, 2))
    with FakeTensorMode() as mode:
        fx, fw, fb, fA, fB = (mode.from_tensor(t) for t in (x, w, b, A, B))
        y, xa = compiled.op("lora_linear")(fx, fw, fb, fA, fB, 1.5, True)
    assert calls == [] and y.shape == (2, 5, 6) and xa.shape == (2, 5, 2)
    y, _ = compiled.op("lora_linear")(x, w, b, A, B, 1.5, True)
    assert calls == [1] and torch.equal(y, ops.lora_linear(x, w, b, A, B, 1.5, mode="merged"))


# ---------------------------------------------------------------------------- the linear
@pytest.mark.parametrize("n,k,d,r", [(64, 16, 12, 2), (3, 40, 24, 8)])
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_compiled_linear_runs_the_operator_and_matches_eager(n, k, d, r, mode):
    x, w, b, A, B = linear_inputs(n, k, d, r)
    rec = Recorder()
    fn = torch.compile(lambda *a: ops.lora_linear(*a, mode=mode), backend=rec.backend, fullgraph=True)
    got = grads(fn, x, w, b, A, B, 1.5)
    want = grads(lambda *a: ops.lora_linear(*a, mode=mode), x, w, b, A, B, 1.5)
    torch._dynamo.reset()
    assert rec.called("lorakit.lora_linear." + compiled.OVERLOAD) == 1 and rec.called("lorakit.lora_linear_backward") == 1
    for a, e in zip(got, want):
        assert torch.equal(a, e)            # the same code runs inside the operator


def test_compiled_linear_float32_adapters_on_bfloat16_base():
    x, w, b, A, B = linear_inputs(16, 16, 12, 4)
    x, w, b = x.detach().bfloat16().requires_grad_(), w.bfloat16(), b.bfloat16()
    fn = torch.compile(ops.lora_linear, backend="aot_eager", fullgraph=True)
    got = grads(fn, x, w, b, A, B, 2.0)
    torch._dynamo.reset()
    want = grads(ops.lora_linear, x, w, b, A, B, 2.0)
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for a, e in zip(got, want):
        assert torch.equal(a, e)


def test_compiled_linear_with_dropout_traces_the_autograd_function():
    """Dropout (a random mask) is not part of the operator: the compiler traces that path."""
    x, w, b, A, B = linear_inputs(8, 16, 12, 2)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    rec = Recorder()
    fn = torch.compile(lambda x, w, b, A, B, s: ops.lora_linear(x, w, b, A, B, s, x * mask), backend=rec.backend,
                       fullgraph=True)
    got = grads(fn, x, w, b, A, B, 1.5)
    torch._dynamo.reset()
    want = grads(lambda x, w, b, A, B, s: ops.lora_linear_reference(x, w, b, A, B, s, x * mask), x, w, b, A, B, 1.5)
    assert rec.called("lorakit.lora_linear") == 0
    for a, e in zip(got, want):
        assert rel(a, e) < 1e-5


def test_input_that_needs_no_gradient_gets_none():
    x, w, b, A, B = linear_inputs(8, 16, 12, 2)
    x = x.detach()
    fn = torch.compile(ops.lora_linear, backend="aot_eager", fullgraph=True)
    fn(x, w, b, A, B, 1.0).sum().backward()
    torch._dynamo.reset()
    assert x.grad is None and A.grad is not None and B.grad is not None


# ---------------------------------------------------------------------------- a model
def lora_llama(layers=2):
    model = tiny_llama(layers=layers).train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL7))
    randomize_adapters(model, std=0.2)
    model.config.use_cache = False
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in lorakit.adapter_parameters(model)]


def test_compiled_model_runs_the_operators_and_matches_eager():
    model = lora_llama()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))   # 64 tokens: fused applies
    want = loss_and_grads(model, ids)
    rec = Recorder()
    for layer in model.model.layers:
        layer.compile(backend=rec.backend, fullgraph=True)
    got = loss_and_grads(model, ids)
    torch._dynamo.reset()
    # layer 0's input needs no gradient: two graphs for two layers, each q|k|v as one node,
    # o_proj and the MLP
    assert rec.called("lorakit.lora_linear." + compiled.OVERLOAD) == 2 and rec.called("lorakit.gated_mlp." + compiled.OVERLOAD) == 2
    assert rec.called("lorakit.shared_linear." + compiled.OVERLOAD) == 2 and rec.called("lorakit.shared_linear_backward") == 2
    assert rec.called("lorakit.gated_mlp_backward") == 2
    # dY = [dq | dk | dv] is concatenated in the graph, where the compiler can write the members'
    # gradients into its columns, and reaches the backward operator as one tensor
    assert rec.cat_feeds("lorakit.shared_linear_backward") == 2
    assert abs(got[0].item() - want[0].item()) <= 1e-6 * abs(want[0].item())
    for a, e in zip(got[1], want[1]):
        assert rel(a, e) < 1e-5


def test_compiled_mlp_saves_gu_and_x_never_h_or_merged_weights():
    """The forward graph keeps g|u with x [Ag; Au]^T beside it (N, 2I + rg + ru) and x; h (N, I)
    is recomputed inside the backward operator, and no merged weight (I, H) / (2I, H) is kept."""
    model = lora_llama(layers=1)
    mlp = model.model.layers[0].mlp
    i, hid = mlp.gate_proj.base.weight.shape
    x = torch.randn(4, 16, hid, requires_grad=True)
    rec = Recorder()
    torch.compile(mlp, backend=rec.backend, fullgraph=True)(x).sum().backward()
    torch._dynamo.reset()
    n, r = 64, mlp.gate_proj.adapters["default"].r
    assert (n, 2 * i + 2 * r) in rec.saved
    assert (n, i) not in rec.saved and (4, 16, i) not in rec.saved
    assert not {(i, hid), (hid, i), (2 * i, hid)} & set(rec.saved)


def test_compiled_graph_names_the_operators_code_version():
    """The graph torch.compile caches on disk calls the operators by an overload named after a
    hash of their code, so a cache filled by another version of that code is never served."""
    model = lora_llama(layers=1)
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 16, mlp.gate_proj.base.weight.shape[1], requires_grad=True)
    codes = []

    def backend(gm, _):
        codes.append(gm.code)
        return gm.forward

    torch.compile(mlp, backend=backend, fullgraph=True)(x)
    torch._dynamo.reset()
    assert compiled.OVERLOAD == compiled._code_tag() and compiled.OVERLOAD.startswith("v")
    assert f"lorakit.gated_mlp.{compiled.OVERLOAD}" in codes[0]


def test_operator_tag_without_readable_sources(monkeypatch):
    """A bundle whose sources cannot be read (zipped) still gets a tag: the package version's."""
    import builtins

    def no_files(*args, **kwargs):
        raise OSError("no sources here")

    monkeypatch.setattr(builtins, "open", no_files)
    tag = compiled._code_tag()
    assert tag.startswith("v") and len(tag) == 13 and tag != compiled.OVERLOAD


def test_fused_under_compile_respects_fusable():
    """Short inputs (fused_is_cheaper says no) trace the three LoRA linears, as eager does."""
    model = lora_llama(layers=1)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 2, mlp.gate_proj.base.weight.shape[1], requires_grad=True)
    rec = Recorder()
    torch.compile(mlp, backend=rec.backend, fullgraph=True)(x).sum().backward()
    torch._dynamo.reset()
    assert rec.called("lorakit.gated_mlp") == 0 and rec.called("lorakit.lora_linear." + compiled.OVERLOAD) == 3
    assert fused.fused_is_cheaper(2, *mlp.gate_proj.base.weight.shape) is False


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@cuda
def test_gpu_inductor_bfloat16_matches_eager():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, use_cache=False)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).train()
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=ALL7))
    randomize_adapters(model, std=0.05)
    ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0)).cuda()
    want = loss_and_grads(model, ids)
    for layer in model.model.layers:
        layer.compile(fullgraph=True)
    got = loss_and_grads(model, ids)
    torch._dynamo.reset()
    assert abs(got[0].item() - want[0].item()) <= 1e-2 * abs(want[0].item())
    for a, e in zip(got[1], want[1]):
        assert rel(a, e) < 2e-2
