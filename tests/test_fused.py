"""The fused gated-MLP node (lorakit.fused): same function and gradients as the unfused
LoRA layers (float32: relative error < 1e-5), used only where it applies, removable,
and invisible to copying, pickling and torch.compile. GPU tests (Triton kernels, bfloat16:
< 1e-2) are marked ``gpu``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lorakit
from lorakit import activation, fused
from conftest import (TOKENS64, CountCalls, assert_close, assert_no_less_accurate, loss_and_grads, randomize_adapters,
                      tiny_llama)

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = TOKENS64


def lora_llama(targets=ALL7, **cfg):
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, **cfg))
    randomize_adapters(model, std=0.2)
    return model


def Count(monkeypatch):
    """Counts calls of the fused node."""
    return CountCalls(monkeypatch, fused._GatedMlpFn)


# The node's four GEMM sites (gate|up forward, down forward, down backward, gate|up backward),
# each merged (True) or beside W0 (False); tests that take the ``forms`` fixture run under each.
FORMS = {"merged": (True,) * 4, "beside": (False,) * 4, "mixed": (True, False, True, False),
         "mixed2": (False, True, False, True), "mixed3": (True, True, False, False)}


@pytest.fixture(params=list(FORMS))
def forms(request, monkeypatch):
    monkeypatch.setattr(fused, "mlp_forms", lambda *a, **k: FORMS[request.param])
    return FORMS[request.param]


def fused_vs_unfused(model, ids=IDS):
    got = loss_and_grads(model, ids)
    fused.detach(model)
    want = loss_and_grads(model, ids)
    fused.attach(model)
    return got, want


# ---------------------------------------------------------------------------- which classes
def test_source_check_accepts_the_llama_family_and_nothing_else():
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mistral.modeling_mistral import MistralMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    for cls in (LlamaMLP, MistralMLP, Qwen2MLP):
        assert fused.is_gated_mlp_forward(cls.forward), cls

    class Intermediate(nn.Module):
        def forward(self, x):
            """A docstring is allowed."""
            out = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return out

    class Added(nn.Module):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    class Swapped(nn.Module):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    class Extra(nn.Module):
        def forward(self, x, scale=1.0):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    assert fused.is_gated_mlp_forward(Intermediate.forward)
    for cls in (Added, Swapped, Extra, GPT2MLP):
        assert not fused.is_gated_mlp_forward(cls.forward), cls
    assert not fused.is_gated_mlp_forward(len)


def test_attach_needs_all_three_projections_and_unload_detaches():
    from transformers.models.llama.modeling_llama import LlamaMLP
    model = lora_llama()
    assert fused.attached(model) == 2
    assert fused.attach(model) == 2                      # idempotent
    partial = lora_llama(targets=["gate_proj", "up_proj", "q_proj"])
    assert fused.attached(partial) == 0
    lorakit.unload(model)
    assert fused.attached(model) == 0
    assert all(not fused._is_ours(m) for m in model.modules())
    assert {type(m) for m in model.modules() if type(m).__name__ == "LlamaMLP"} == {LlamaMLP}


# ---------------------------------------------------------------------------- same function
@pytest.mark.parametrize("cfg", [{}, {"rank_pattern": {"down_proj": 6, "up_proj": 2}, "alpha_pattern": {"gate_proj": 3}},
                                 {"adapter_dtype": "float32"}])
def test_fused_matches_unfused_float32(monkeypatch, cfg, forms):
    model = lora_llama(**cfg)
    count = Count(monkeypatch)
    got, want = fused_vs_unfused(model)
    assert count.n == 2                                   # both layers fused, then none
    assert_close(got, want, 1e-5)


def test_frozen_adapters_still_pass_input_gradients(monkeypatch, forms):
    model = lora_llama(targets=["gate_proj", "up_proj", "down_proj"])
    emb = model.model.embed_tokens.weight
    emb.requires_grad_(True)                              # x needs a gradient; the adapters do not
    lorakit.set_trainable(model, "default", False)
    count = Count(monkeypatch)
    got, want = fused_vs_unfused(model)
    assert count.n == 2 and list(got[1]) == ["model.embed_tokens.weight"]
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
def test_only_one_factor_trains(monkeypatch, frozen, forms):
    """Only B trains (no dA: no gs GEMM, no dY Bd beside dh) or only A (no dB: the forward
    appends no A rows to the merged weights, gu is (N, 2I), no h Ad^T)."""
    model = lora_llama()
    for n, p in model.named_parameters():
        if frozen in n:
            p.requires_grad_(False)
    count = Count(monkeypatch)
    got, want = fused_vs_unfused(model)
    trained = {"lora_A": "lora_B", "lora_B": "lora_A"}[frozen]
    assert count.n == 2 and got[1] and all(trained in n for n in got[1])
    assert_close(got, want, 1e-5)


def test_output_may_be_modified_in_place(monkeypatch, forms):
    """The node's output is a column slice of [y | h Ad^T]; callers may still modify it in place."""
    model = lora_llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 32, mlp.gate_proj.base.weight.shape[1], generator=torch.Generator().manual_seed(0))
    count = Count(monkeypatch)
    grads = []
    for attached in (True, False):
        (fused.attach if attached else fused.detach)(model)
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        y = mlp(xg)
        y.mul_(3.0).add_(1.0)
        (y ** 2).sum().backward()
        grads.append([xg.grad] + [p.grad for p in mlp.parameters() if p.requires_grad])
    assert count.n == 1
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def check_bfloat16(monkeypatch, device):
    """bfloat16, fused and unfused, each against the float32 model: the fused node is no less
    accurate than the unfused layers (it rounds h once instead of twice)."""
    ref = lora_llama().to(device)
    low = copy.deepcopy(ref).to(torch.bfloat16)
    ids = IDS.to(device)
    want = loss_and_grads(ref, ids)
    count = Count(monkeypatch)
    got_fused, got_plain = fused_vs_unfused(low, ids)
    assert count.n == 2
    assert_no_less_accurate(got_fused, got_plain, want)


def test_bfloat16_on_cpu(monkeypatch, forms):
    check_bfloat16(monkeypatch, "cpu")


def test_autocast_to_the_model_dtype_still_fuses(monkeypatch):
    """A bfloat16 model under bfloat16 autocast (what ``lorakit train`` runs): autocast would
    cast only the adapters, as the node does, so it fuses, with the unfused layers' accuracy."""
    ref = lora_llama()
    low = copy.deepcopy(ref).to(torch.bfloat16)
    want = loss_and_grads(ref)
    count = Count(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_fused, got_plain = fused_vs_unfused(low)
    assert count.n == 2
    assert_no_less_accurate(got_fused, got_plain, want)


def test_autocast_to_another_dtype_runs_the_class_forward(monkeypatch):
    model = lora_llama()                                  # float32 weights, bfloat16 autocast
    count = Count(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_and_grads(model)
    assert count.n == 0


def test_forms_follow_the_byte_counts():
    """1B (8192 tokens): all four merged (gate|up backward: gs rides in its dX GEMM, where beside W0
    it reads [dg | du] once more); 8B (4096 tokens): all four beside; long inputs: all merged;
    short ones (smol widths, 512 tokens) all beside."""
    assert fused.mlp_forms(8192, 8192, 2048) == (True, True, True, True)
    assert fused.mlp_forms(4096, 14336, 4096) == (False, False, False, False)
    assert fused.mlp_forms(65536, 8192, 2048) == (True, True, True, True)
    assert fused.mlp_forms(512, 1536, 576) == (False, False, False, False)
    assert fused.mlp_forms(4096, 14336, 4096, c=2.0) == (True, False, True, False)
    # the LoRA terms in the SwiGLU kernels (GPU): down backward beside W0 at both shapes
    assert fused.mlp_forms(8192, 8192, 2048, terms=True) == (True, True, False, True)
    assert fused.mlp_forms(4096, 14336, 4096, terms=True) == (False, False, False, False)


def test_swiglu_writes_into_a_given_output():
    """``out=``: h and [dg | du] written into column slices of wider buffers (row stride > width)."""
    gen = torch.Generator().manual_seed(0)
    gu = torch.randn(5, 12, generator=gen)
    dh = torch.randn(5, 6, generator=gen)
    buf = torch.full((5, 9), 7.0)
    h = activation.swiglu_forward(gu, out=buf[:, :6])
    assert h.data_ptr() == buf.data_ptr() and torch.equal(h, activation.swiglu_forward_reference(gu))
    assert (buf[:, 6:] == 7).all()
    wide = torch.full((5, 15), 7.0)
    a, b = dh.clone(), dh.clone()
    got = activation.swiglu_backward(a, gu, out=wide[:, :12])
    assert torch.equal(got, activation.swiglu_backward_reference(b, gu)) and torch.equal(a, b)
    assert got.data_ptr() == wide.data_ptr() and (wide[:, 12:] == 7).all()


def test_swiglu_reference_gradients_match_autograd():
    gu = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    dh = torch.randn(5, 6, dtype=torch.float64)
    h = torch.nn.functional.silu(gu[:, :6]) * gu[:, 6:]
    h.backward(dh)
    assert torch.allclose(activation.swiglu_forward_reference(gu.detach()), h.detach())
    buf = dh.clone()
    dgu = activation.swiglu_backward_reference(buf, gu.detach())
    assert torch.allclose(dgu, gu.grad) and torch.allclose(buf, h.detach())


def _reduce_inputs(n, i, rd, rg, ru, dtype, device, gen):
    """gu = [g | u | xag | xau] and [dh | gd] side by side (the merged down-backward's layout)."""
    gu = torch.randn(n, 2 * i + rg + ru, device=device, generator=gen, dtype=torch.float32).mul_(2).to(dtype)
    dhgd = torch.randn(n, i + rd, device=device, generator=gen, dtype=torch.float32).to(dtype)
    return gu, dhgd[:, :i], dhgd[:, i:]


@pytest.mark.parametrize("gd_given,db", [(True, True), (True, False), (False, True)])
def test_swiglu_backward_reduce_unfused_matches_float64(gd_given, db):
    """dgu, sd gd^T h, sg dg^T xag, su du^T xau from their definitions (float64, autograd for dgu)."""
    gen = torch.Generator().manual_seed(0)
    gu, dh, gd = _reduce_inputs(9, 6, 3, 2, 4, torch.float64, "cpu", gen)
    g = gu[:, :12].clone().requires_grad_()
    h = torch.nn.functional.silu(g[:, :6]) * g[:, 6:]
    h.backward(dh)
    buf = dh.clone()
    dgu, dad, dbg, dbu = activation.swiglu_backward_reduce(buf, gu, gd if gd_given else None, 0.5, 2, 0.7, 1.3, db)
    assert torch.allclose(dgu, g.grad) and torch.allclose(buf, h.detach())
    assert dad is None if not gd_given else torch.allclose(dad, 0.5 * gd.t() @ h.detach())
    if db:
        assert torch.allclose(dbg, 0.7 * g.grad[:, :6].t() @ gu[:, 12:14])
        assert torch.allclose(dbu, 1.3 * g.grad[:, 6:].t() @ gu[:, 14:])
    else:
        assert dbg is None and dbu is None


# ---------------------------------------------------------------------------- when it does not apply
def _fallback_cases():
    yield "no_grad", lambda m: torch.no_grad()
    yield "disabled", lambda m: lorakit.disable_adapters(m)
    yield "rows", lambda m: lorakit.batch_adapters(m, ["default", None, "default", None])


@pytest.mark.parametrize("case", [c for c, _ in _fallback_cases()])
def test_falls_back_where_it_does_not_apply(monkeypatch, case):
    model = lora_llama()
    ctx = dict(_fallback_cases())[case](model)
    count = Count(monkeypatch)
    with ctx:
        got = model(IDS).logits
    fused.detach(model)
    with dict(_fallback_cases())[case](model):
        want = model(IDS).logits
    assert count.n == 0 and torch.equal(got, want)


def test_falls_back_for_dropout_hooks_merge_and_short_inputs(monkeypatch):
    count = Count(monkeypatch)
    model = lora_llama(dropout=0.1)
    loss_and_grads(model)
    model.eval()                                          # dropout off in eval: fused again
    loss_and_grads(model)
    assert count.n == 2
    model = lora_llama()
    seen = []
    h = model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda *a: seen.append(1))
    loss_and_grads(model)
    assert seen == [1] and count.n == 3                   # layer 0 ran unfused, its hook fired
    h.remove()
    loss_and_grads(model, IDS[:1, :8])                    # 8 tokens: merged weights not cheaper
    assert count.n == 3
    lorakit.merge(model)
    with torch.enable_grad():
        model(IDS)
    assert count.n == 3


# ---------------------------------------------------------------------------- copying, pickling, compile
def test_deepcopy_and_pickle_keep_the_routing(monkeypatch):
    model = lora_llama()
    dup = copy.deepcopy(model)
    assert fused.attached(dup) == 2
    from transformers.models.llama.modeling_llama import LlamaMLP
    mlps = [m for m in dup.modules() if isinstance(m, LlamaMLP)]
    assert len(mlps) == 2 and all(fused._is_ours(m) and type(m).__name__ == "LlamaMLP" for m in mlps)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    count = Count(monkeypatch)
    got, want = loss_and_grads(back), loss_and_grads(model)
    assert count.n == 4
    assert_close(got, want, 1e-6)


def test_compile_fullgraph_matches_eager(forms):
    """Under torch.compile the fused node runs as the lorakit::gated_mlp operator (tests/test_compiled.py)."""
    model = lora_llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 32, 32, requires_grad=True)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    want = mlp(x)
    want.sum().backward()
    torch._dynamo.reset()
    assert torch.equal(got, want) and torch.equal(gx, x.grad)


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n,i", [(1, 8), (7, 1000), (300, 1536), (64, 8192)])
def test_gpu_swiglu_kernels_match_reference(n, i):
    from lorakit.kernels import swiglu
    gen = torch.Generator(device="cuda").manual_seed(0)
    gu = torch.randn(n, 2 * i, device="cuda", generator=gen, dtype=torch.bfloat16) * 3
    dh = torch.randn(n, i, device="cuda", generator=gen, dtype=torch.bfloat16)
    ref = activation.swiglu_forward_reference(gu)
    assert (swiglu.swiglu_forward(gu).float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()
    a, b = dh.clone(), dh.clone()
    got, want = swiglu.swiglu_backward(a, gu), activation.swiglu_backward_reference(b, gu)
    assert (got.float() - want.float()).norm() <= 1e-2 * want.float().norm()
    assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm()
    # later calls go through the compiled kernel's launcher (lorakit.kernels.launch): the same results
    assert torch.equal(swiglu.swiglu_forward(gu), swiglu.swiglu_forward(gu))
    c = dh.clone()
    assert torch.equal(swiglu.swiglu_backward(c, gu), got) and torch.equal(c, a)
    wide = torch.zeros(n, i + 8, device="cuda", dtype=torch.bfloat16)     # out=: a column slice, row stride i + 8
    assert torch.equal(swiglu.swiglu_forward(gu, out=wide[:, :i]), swiglu.swiglu_forward(gu))
    assert not wide[:, i:].any()
    wide = torch.zeros(n, 2 * i + 8, device="cuda", dtype=torch.bfloat16)
    c = dh.clone()
    assert torch.equal(swiglu.swiglu_backward(c, gu, out=wide[:, :2 * i]), got) and not wide[:, 2 * i:].any()


def _assert_outputs_match(got, want, dtype, tol, case):
    """Kernel outputs (tensors or None) against the reference's: same presence, dtype, shape,
    contiguous, relative Frobenius error within ``tol``."""
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None), case
        if a is not None:
            assert a.dtype == dtype and a.shape == b.shape and a.is_contiguous(), case
            assert (a.float() - b.float()).norm() <= tol * b.float().norm(), case


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n,i,rd,rg,ru,dtype", [
    (1, 8, 4, 4, 4, torch.bfloat16), (70, 200, 16, 8, 24, torch.bfloat16), (300, 1536, 16, 16, 16, torch.bfloat16),
    (2049, 1000, 64, 2, 33, torch.float16), (4096, 640, 16, 16, 16, torch.float32), (100, 96, 8, 1, 8, torch.float32)])
def test_gpu_swiglu_backward_reduce_matches_reference(n, i, rd, rg, ru, dtype):
    """The one-kernel backward (dgu, dAd, dBg, dBu) against the plain kernel and GEMMs, for ranks
    up to 64, uneven shapes, several row splits, dh and gd as column slices of one buffer."""
    from lorakit.kernels import swiglu
    gen = torch.Generator(device="cuda").manual_seed(0)
    gu, dh, gd = _reduce_inputs(n, i, rd, rg, ru, dtype, "cuda", gen)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    keep = dh.clone()
    for gd_given, db in ((True, True), (True, False), (False, True)):
        g = gd if gd_given else None
        got = swiglu.swiglu_backward_reduce(dh, gu, g, 0.5, rg, 0.7, 1.3, db)
        assert torch.equal(dh, keep)                                        # h is not written over dh
        want = activation.swiglu_backward_reduce_unfused(dh.clone(), gu, g, 0.5, rg, 0.7, 1.3, db)
        _assert_outputs_match(got, want, dtype, tol, (gd_given, db))
        again = swiglu.swiglu_backward_reduce(dh, gu, g, 0.5, rg, 0.7, 1.3, db)   # through the launcher
        assert all(a is None or torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n,i,rd,rg,ru,dtype", [
    (1, 8, 4, 4, 4, torch.bfloat16), (70, 200, 16, 8, 24, torch.bfloat16), (4096, 1536, 16, 16, 16, torch.bfloat16),
    (2049, 1000, 32, 2, 31, torch.float16), (600, 640, 16, 16, 16, torch.float32), (100, 96, 8, 1, 8, torch.float32)])
def test_gpu_swiglu_terms_kernels_match_reference(n, i, rd, rg, ru, dtype):
    """The kernels that add the LoRA terms (g = g0 + sg xag Bg^T, u likewise; dh = dh0 + sd gd Ad)
    against the float32 reference, forward and backward, every flag combination of the backward."""
    from lorakit.kernels import swiglu
    gen = torch.Generator(device="cuda").manual_seed(1)
    gu, dh, gd = _reduce_inputs(n, i, rd, rg, ru, dtype, "cuda", gen)
    bg, bu, ad = (torch.randn(*shape, device="cuda", generator=gen).mul_(0.3).to(dtype)
                  for shape in ((i, rg), (i, ru), (rd, i)))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    want = activation.swiglu_forward_terms_reference(gu, bg, bu, 0.7, 1.3)
    got = swiglu.swiglu_forward_terms(gu, bg, bu, 0.7, 1.3)
    assert got.dtype == dtype and (got.float() - want.float()).norm() <= tol * want.float().norm()
    assert torch.equal(swiglu.swiglu_forward_terms(gu, bg, bu, 0.7, 1.3), got)   # through the launcher
    keep = dh.clone()
    for gu_term, dh_term, want_ad, db in ((True, True, True, True), (True, True, False, True), (True, False, True, False),
                                          (True, False, False, False), (False, True, True, True), (False, True, False, False)):
        args = (dh, gu, gd, 0.5, rg, 0.7, 1.3, db, *((bg, bu) if gu_term else (None, None)), ad if dh_term else None)
        got = swiglu.swiglu_backward_reduce(*args, want_ad=want_ad)
        assert torch.equal(dh, keep)
        want = activation.swiglu_backward_reduce_reference(*args, want_ad=want_ad)
        _assert_outputs_match(got, want, dtype, tol, (gu_term, dh_term, want_ad, db))


@pytest.fixture(params=[True, False], ids=["kernel-terms", "gemm-terms"])
def kernel_terms(request, monkeypatch):
    """The GPU's fused MLP with the LoRA terms added in the SwiGLU kernels, or written by GEMMs."""
    monkeypatch.setattr(fused, "KERNEL_TERMS", request.param)
    return request.param


@pytest.mark.gpu
@cuda
def test_gpu_fused_matches_unfused_float32(monkeypatch, forms, kernel_terms):
    model = lora_llama().cuda()
    count = Count(monkeypatch)
    got, want = fused_vs_unfused(model, IDS.cuda())
    assert count.n == 2
    assert_close(got, want, 1e-5)


@pytest.mark.gpu
@cuda
def test_gpu_fused_bfloat16(monkeypatch, forms, kernel_terms):
    check_bfloat16(monkeypatch, "cuda")


def test_compiled_layers_share_one_graph():
    """Regional compilation (one compile per decoder layer, as bench/train_step.py does): two
    graphs for four layers (layer 0's input needs no gradient), none per layer (no guard on a
    routed MLP's identity)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = tiny_llama(layers=4).train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL7))
    randomize_adapters(model, std=0.2)
    model.config.use_cache = False
    want = loss_and_grads(model)
    cnt = CompileCounterWithBackend("aot_eager")
    for layer in model.model.layers:
        layer.compile(backend=cnt, fullgraph=True)
    got = loss_and_grads(model)
    assert cnt.frame_count == 2
    assert_close(got, want, 1e-5)
    torch._dynamo.reset()
