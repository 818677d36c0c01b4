"""lorakit.ops: the fast LoRA linear path against the plain-autograd reference.

Outputs and gradients (x, A, B) on random inputs for many shapes and ranks, both forms
(merged / unmerged) and the automatic choice, with and without bias, dropout, 1-D/2-D/3-D
and non-contiguous inputs, float32 adapters on a bfloat16 base, autocast, no-grad
inference, what is saved for backward, and torch.compile(fullgraph=True). float32 on CPU:
relative error < 1e-5. GPU tests (bfloat16: < 1e-2) are marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import ops, wprime

from conftest import randomize_adapters, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: see conftest.one_thread


MODES = ["auto", "merged", "unmerged"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else (a - b).norm().item()


def make(n_lead, k, d, r, *, bias=True, dtype=torch.float32, adapter_dtype=None, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    adt = adapter_dtype or dtype
    x = torch.randn(*n_lead, k, generator=g, device=device, dtype=dtype)
    w = torch.randn(d, k, generator=g, device=device, dtype=dtype) / k ** 0.5
    b = torch.randn(d, generator=g, device=device, dtype=dtype) if bias else None
    A = torch.randn(r, k, generator=g, device=device, dtype=adt) / k ** 0.5
    B = torch.randn(d, r, generator=g, device=device, dtype=adt)
    return x, w, b, A, B


def run(fn, x, w, b, A, B, s, x_drop=None, seed=7, **kw):
    """y = fn(...) and d(sum(y * c))/d(x, A, B) for a random c (grad_output not all ones)."""
    x = x.detach().requires_grad_()
    A = A.detach().requires_grad_()
    B = B.detach().requires_grad_()
    xd = None
    if x_drop is not None:                      # the same mask on both sides: x_drop = x * mask
        xd = x * x_drop
    y = fn(x, w, b, A, B, s, xd, **kw)
    c = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    gx, gA, gB = torch.autograd.grad((y * c).sum(), (x, A, B))
    return y, gx, gA, gB


def check_same(got, want, tol):
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert rel(a, b) < tol, (name, rel(a, b))


# ---------------------------------------------------------------------------- float32 parity
SHAPES = [((7,), 5, 6, 1), ((2, 9), 16, 12, 4), ((3, 4, 5), 31, 17, 8), ((40,), 8, 8, 3),
          ((1,), 1, 1, 1), ((2, 64), 24, 40, 16), ((130,), 12, 20, 2), ((5,), 64, 3, 32)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead,k,d,r", SHAPES)
def test_fast_matches_reference_float32(mode, lead, k, d, r):
    for bias in (True, False):
        args = make(lead, k, d, r, bias=bias, seed=k * d + r)
        want = run(ops.lora_linear_reference, *args, 1.7)
        got = run(ops.lora_linear, *args, 1.7, mode=mode)
        check_same(got, want, 1e-5)


@pytest.mark.parametrize("xa_in_gemm", [True, False])
def test_merged_forward_with_xa_in_its_gemm(monkeypatch, xa_in_gemm):
    """Merged and without a bias, the training forward computes [y | x A^T] in one GEMM: y is a
    column slice (row stride d + r); with a bias, or with ``ops.XA_IN_GEMM`` off, x A^T is a GEMM
    of its own. Both match the reference."""
    monkeypatch.setattr(ops, "XA_IN_GEMM", xa_in_gemm)
    for bias in (False, True):
        x, w, b, A, B = make((3, 40), 24, 20, 4, bias=bias, seed=5)
        check_same(run(ops.lora_linear, x, w, b, A, B, 1.5, mode="merged"), run(ops.lora_linear_reference, x, w, b, A, B,
                                                                                 1.5), 1e-5)
        y = ops.lora_linear(x, w, b, A, B.requires_grad_(), 1.5, mode="merged")     # dB needs x A^T
        assert y.shape == (3, 40, 20) and y.stride(-2) == (24 if xa_in_gemm and not bias else 20)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True])
def test_output_may_be_modified_in_place(mode, bias):
    """As nn.Linear's output, the training output takes in-place writes (3-D input, every form):
    autograd records them, and the gradients are those of the modified function."""
    x, w, b, A, B = make((3, 40), 24, 20, 4, bias=bias, seed=6)

    def in_place(f):
        return lambda *args, **kw: f(*args, **kw).mul_(3.0)
    got = run(in_place(ops.lora_linear), x, w, b, A, B, 1.5, mode=mode)
    check_same(got, run(in_place(ops.lora_linear_reference), x, w, b, A, B, 1.5), 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_input_feeds_only_the_adapter(mode):
    x, w, b, A, B = make((3, 10), 12, 9, 4)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.3).float() / 0.7
    want = run(ops.lora_linear_reference, x, w, b, A, B, 0.5, x_drop=mask)
    got = run(ops.lora_linear, x, w, b, A, B, 0.5, x_drop=mask, mode=mode)
    check_same(got, want, 1e-5)


def test_one_dimensional_input():
    x, w, b, A, B = make((), 11, 7, 3)
    assert x.shape == (11,)
    got = run(ops.lora_linear, x, w, b, A, B, 2.0)
    assert got[0].shape == (7,)
    check_same(got, run(ops.lora_linear_reference, x, w, b, A, B, 2.0), 1e-5)


def test_empty_input():
    x, w, b, A, B = make((0, 3), 6, 5, 2)
    got = run(ops.lora_linear, x, w, b, A, B, 2.0)
    assert got[0].shape == (0, 3, 5) and torch.count_nonzero(got[2]) == 0 and torch.count_nonzero(got[3]) == 0


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs_weight_and_grad_output(mode):
    g = torch.Generator().manual_seed(3)
    big = torch.randn(4, 6, 30, generator=g)
    x = big[:, ::2, 1::2]                                  # (4, 3, 15), strided in every dim
    w_kd = torch.randn(15, 9, generator=g)                 # GPT-2 Conv1D stores (k, d): W_dk is a view
    w = w_kd.t()
    A, B = torch.randn(5, 15, generator=g), torch.randn(9, 5, generator=g)
    assert not x.is_contiguous() and not w.is_contiguous()

    def through_transpose(fn, *a, **kw):                  # grad_output arrives non-contiguous
        return fn(*a, **kw).transpose(0, 1)

    want = run(lambda *a: through_transpose(ops.lora_linear_reference, *a), x, w, None, A, B, 0.3)
    got = run(lambda *a: through_transpose(ops.lora_linear, *a, mode=mode), x, w, None, A, B, 0.3)
    check_same(got, want, 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_float32_adapters_on_bfloat16_base(mode):
    x, w, b, A, B = make((4, 8), 32, 24, 8, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    want = run(ops.lora_linear_reference, x, w, b, A, B, 2.0)
    got = run(ops.lora_linear, x, w, b, A, B, 2.0, mode=mode)
    assert got[2].dtype == got[3].dtype == torch.float32 and got[0].dtype == got[1].dtype == torch.bfloat16
    check_same(got, want, 1e-2)


def test_autocast_casts_like_autocast():
    x, w, b, A, B = make((2, 6), 16, 12, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = run(ops.lora_linear_reference, x, w, b, A, B, 2.0)
        got = run(ops.lora_linear, x, w, b, A, B, 2.0)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert got[1].dtype == torch.float32 and got[2].dtype == got[3].dtype == torch.float32
    check_same(got, want, 1e-2)


def test_trainable_base_weight_falls_back_to_reference():
    x, w, b, A, B = make((3,), 5, 4, 2)
    w = w.clone().requires_grad_()
    y = ops.lora_linear(x, w, b, A, B, 1.0)
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    (gw_ref,) = torch.autograd.grad(ops.lora_linear_reference(x, w, b, A, B, 1.0).sum(), (w,))
    assert torch.equal(gw, gw_ref)


def test_dtype_mismatch_is_refused():
    x, w, b, A, B = make((3,), 5, 4, 2)
    with pytest.raises(TypeError, match="differs from the base weight"):
        ops.lora_linear(x.double(), w, b, A, B, 1.0)


# ---------------------------------------------------------------------------- no-grad and forms
@pytest.mark.parametrize("mode", MODES)
def test_no_grad_forward_builds_no_node(mode):
    x, w, b, A, B = make((5, 7), 16, 10, 4)
    A.requires_grad_()
    with torch.no_grad():
        y = ops.lora_linear(x, w, b, A, B, 0.8, mode=mode)
    assert y.grad_fn is None and not y.requires_grad
    assert rel(y, ops.lora_linear_reference(x, w, b, A, B, 0.8).detach()) < 1e-5
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.no_grad():
        y = ops.lora_linear(x, w, b, A, B, 0.8, x * mask, mode=mode)
    assert rel(y, ops.lora_linear_reference(x, w, b, A, B, 0.8, x * mask)) < 1e-5


@pytest.mark.parametrize("n_lead,bias,adapter_dtype", [((2, 3), True, None), ((300,), False, None),
                                                       ((4, 5), True, torch.float64)])
def test_lora_linear_nograd_equals_lora_linear(n_lead, bias, adapter_dtype):
    """The inference entry (gradients off, no dropout) picks the same form and gives the same bits."""
    x, w, b, A, B = make(n_lead, 16, 10, 4, bias=bias, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        want = ops.lora_linear(x, w, b, A, B, 0.8)
        got = ops.lora_linear_nograd(x, w, b, A, B, 0.8)
    assert torch.equal(got, want) and got.dtype == x.dtype


def test_lora_linear_nograd_checks_dtypes_and_follows_autocast():
    x, w, b, A, B = make((3,), 16, 10, 4)
    with pytest.raises(TypeError, match="differs from the base weight"):
        ops.lora_linear_nograd(x.double(), w, b, A, B, 1.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.lora_linear_nograd(x, w, b, A, B, 1.0)
    assert y.dtype == torch.bfloat16
    assert rel(y.float(), ops.lora_linear_reference(x, w, b, A, B, 1.0)) < 1e-2


def test_layer_inference_path_equals_training_path():
    torch.manual_seed(0)
    model = tiny_gpt2()                                      # Conv1D: W0 stored transposed
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomize_adapters(model, std=0.2)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    want = model(ids).logits.detach()
    with torch.no_grad():
        got = model(ids).logits
    assert rel(got, want) < 1e-6


def test_merged_weights_with_appended_factors_cpu():
    """[W'; A_1; A_2] and [W' | B]: the merged weights as merged_weight builds them, the factors exact."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(d, 24, generator=g) for d in (16, 8)]
    Bs = [torch.randn(d, r, generator=g) for d, r in ((16, 4), (8, 2))]
    As = [torch.randn(r, 24, generator=g) for r in (4, 2)]
    want = [wprime.merged_weight(w, B, A, s) for w, B, A, s in zip(ws, Bs, As, (0.5, 2.0))]
    got = wprime.stacked_merged_weight(ws, Bs, As, [0.5, 2.0], append_a=True)
    assert torch.equal(got, torch.cat(want + As))
    wb = wprime.stacked_merged_weight(ws[:1], Bs[:1], As[:1], [0.5], append_b=True)
    assert torch.equal(wb, torch.cat([want[0], Bs[0]], dim=1))
    wbs = wprime.stacked_merged_weight(ws, Bs, As, [0.5, 2.0], append_b=True)           # [W' | blockdiag(B_1, B_2)]
    assert torch.equal(wbs, torch.cat([torch.cat(want), torch.block_diag(*Bs)], dim=1))


def test_merged_is_cheaper_rule():
    # training: 4 d k < N (d + k) (1 + c); inference: 2 d k < N (d (1 + c) + k); c = 0.5 by default
    assert ops.EPILOGUE_READ == 0.5
    assert ops.merged_is_cheaper(8192, 2048, 2048, training=True)
    assert not ops.merged_is_cheaper(8, 2048, 2048, training=True)
    assert not ops.merged_is_cheaper(2730, 2048, 2048, training=True)
    assert ops.merged_is_cheaper(2731, 2048, 2048, training=True)
    assert not ops.merged_is_cheaper(2048, 2048, 2048, training=True, c=1.0)   # equal cost: unmerged
    assert ops.merged_is_cheaper(2048, 2048, 2048, training=True, c=1.0, ties=True)
    assert ops.merged_is_cheaper(2049, 2048, 2048, training=True, c=1.0)
    assert not ops.merged_is_cheaper(1638, 2048, 2048, training=False)
    assert ops.merged_is_cheaper(1639, 2048, 2048, training=False)
    assert not ops.merged_is_cheaper(8, 4096, 14336, training=False)


def test_auto_picks_the_form_by_token_count():
    """The two forms round differently, so bitwise equality tells which one "auto" ran."""
    def outputs(n, mode):
        x, w, b, A, B = make((n,), 8, 8, 2, seed=5)
        return run(ops.lora_linear, x, w, b, A, B, 1.0, mode=mode)

    for n, form in ((3000, "merged"), (4, "unmerged")):
        auto, same, other = outputs(n, "auto"), outputs(n, form), outputs(n, {"merged": "unmerged"}.get(form, "merged"))
        assert all(torch.equal(a, b) for a, b in zip(auto, same))
        assert not all(torch.equal(a, b) for a, b in zip(auto, other))


# ---------------------------------------------------------------------------- memory
def test_saves_x_once_and_only_small_tensors_otherwise():
    """q/k/v read one x: what autograd keeps is x's own storage plus (N, r) tensors and weights."""
    n, k, r = 64, 32, 4
    x = torch.randn(n, k, requires_grad=True)
    h = x * 2.0                                         # the shared input (a norm's output, say)
    layers = [(torch.randn(d, k), torch.randn(r, k, requires_grad=True), torch.randn(d, r, requires_grad=True))
              for d in (32, 8, 8)]
    weights = {t.untyped_storage().data_ptr() for lw in layers for t in lw}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = [ops.lora_linear(h, w, None, A, B, 2.0) for w, A, B in layers]
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() > n * r}
    assert big == {h.untyped_storage().data_ptr()}      # the activation, saved once, never copied
    assert all(t.dtype == torch.float32 for t in saved)
    assert sum(t.numel() for t in saved if t.numel() <= n * r) <= 3 * n * r
    sum(y.sum() for y in ys).backward()


def test_bfloat16_base_saves_no_float32_activation():
    x, w, b, A, B = make((16, 8), 32, 24, 4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.lora_linear(x, w, b, A, B, 2.0)
    assert all(t.dtype == torch.bfloat16 for t in saved if t.shape[0] == 128)


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_ops_compile_fullgraph_forward_and_backward(mode):
    x, w, b, A, B = make((3, 5), 8, 6, 2)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    fn = torch.compile(ops.lora_linear, fullgraph=True, backend="aot_eager")
    for m in (None, mask):
        want = run(ops.lora_linear_reference, x, w, b, A, B, 1.5, x_drop=m)
        got = run(fn, x, w, b, A, B, 1.5, x_drop=m, mode=mode)
        check_same(got, want, 1e-5)


def test_compiled_graph_keeps_no_merged_weight_for_backward():
    """Under torch.compile the forward graph's saved tensors are x and the weights, never W'."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    saved = []

    def fw(gm, _):
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.extend(o for o in out[1:] if o.op != "placeholder")      # tensors the forward computed
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, _: make_boxed_func(gm),
                           partition_fn=min_cut_rematerialization_partition)
    x, w, b, A, B = make((256,), 16, 12, 2)
    A.requires_grad_()
    B.requires_grad_()
    x.requires_grad_()
    fn = torch.compile(lambda x: ops.lora_linear(x * 2, w, b, A, B, 2.0, mode="merged").sum(), backend=backend,
                       fullgraph=True)
    fn(x).backward()
    torch._dynamo.reset()
    shapes = [tuple(n.meta["val"].shape) for n in saved]
    assert (12, 16) not in shapes and (16, 12) not in shapes, shapes


def test_injected_model_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, layers=1)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                              "gate_proj", "up_proj", "down_proj"]))
    randomize_adapters(model, std=0.2)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    params = lorakit.adapter_parameters(model)
    eager = model(ids).logits
    eager.square().mean().backward()
    want = [p.grad.clone() for p in params]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert rel(out, eager) < 1e-5
    out.square().mean().backward()
    for p, g in zip(params, want):
        assert rel(p.grad, g) < 1e-5


# ---------------------------------------------------------------------------- GPU (bfloat16)
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,k,d,r", [(8192, 2048, 2048, 16), (4096, 2048, 8192, 64), (8, 4096, 1024, 16),
                                     (333, 136, 72, 8)])
def test_gpu_bfloat16_matches_float32_reference(mode, n, k, d, r):
    x, w, b, A, B = make((n,), k, d, r, dtype=torch.bfloat16, device="cuda")
    B = B * 0.05
    want = run(ops.lora_linear_reference, *(t.float() if t is not None else None for t in (x, w, b, A, B)), 2.0)
    got = run(ops.lora_linear, x, w, b, A, B, 2.0, mode=mode)
    for name, a, ref in zip(("y", "dx", "dA", "dB"), got, want):
        assert a.dtype == torch.bfloat16 and rel(a, ref) < 1e-2, (name, rel(a, ref))


@pytest.mark.gpu
@cuda
def test_gpu_float32_adapters_and_compile():
    x, w, b, A, B = make((4, 512), 256, 384, 16, dtype=torch.bfloat16, adapter_dtype=torch.float32, device="cuda")
    want = run(ops.lora_linear_reference, x.float(), w.float(), b.float(), A, B, 2.0)
    got = run(ops.lora_linear, x, w, b, A, B, 2.0)
    assert got[2].dtype == torch.float32
    for a, ref in zip(got, want):
        assert rel(a, ref) < 1e-2
    fn = torch.compile(ops.lora_linear, fullgraph=True)              # inductor, real kernels
    for a, ref in zip(run(fn, x, w, b, A, B, 2.0), want):
        assert rel(a, ref) < 1e-2


@pytest.mark.gpu
@cuda
def test_gpu_no_grad_decode_and_prefill():
    for n in (8, 16384):
        x, w, b, A, B = make((n,), 1024, 2048, 16, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            y = ops.lora_linear(x, w, b, A, B, 2.0)
        assert rel(y, ops.lora_linear_reference(x.float(), w.float(), b.float(), A.float(), B.float(), 2.0)) < 1e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,k,r", [(2048, 2048, 16), (512, 2048, 16), (8192, 2048, 64), (2048, 8192, 1),
                                   (333, 136, 8), (100, 300, 128), (64, 64, 200)])
def test_gpu_merged_weight_kernel_matches_addmm(dtype, d, k, r):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(d, k, device="cuda", generator=g).to(dtype)
    B = (torch.randn(d, r, device="cuda", generator=g) * 0.1).to(dtype)
    A = torch.randn(r, k, device="cuda", generator=g).to(dtype)
    want = torch.addmm(w.double(), B.double(), A.double(), alpha=0.75)
    got = wprime.merged_weight(w, B, A, 0.75)
    if r > 128:                                              # beyond the kernel's ranks: torch.addmm itself
        assert torch.equal(got, torch.addmm(w, B, A, alpha=0.75))
        return
    # float32: summation-order rounding only (TF32 would be ~1e-3); bfloat16: one rounding, 2^-8 relative
    err = (got.double() - want).abs()
    if dtype == torch.float32:
        assert got.dtype == dtype and err.max() <= 1e-5 * want.abs().max()
    else:
        assert got.dtype == dtype and (err <= 8e-3 * want.abs() + 1e-6).all()
    buf = torch.zeros(2 * d, k, device="cuda", dtype=dtype)  # writing into a half of a larger buffer
    wprime.merged_weight(w, B, A, 0.75, out=buf[d:])
    assert torch.equal(buf[d:], got) and not buf[:d].any()
    for _ in range(2):                                       # later calls: the compiled kernel's own launcher
        assert torch.equal(wprime.merged_weight(w, B, A, 0.75), got)
    want2 = torch.addmm(w.double(), B.double(), A.double(), alpha=-1.5)    # another scale, same launch
    assert (wprime.merged_weight(w, B, A, -1.5).double() - want2).abs().max() <= 8e-3 * want2.abs().max()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ds,k,rs", [((2048, 512, 512), 2048, (16, 16, 16)), ((8192, 8192), 2048, (16, 16)),
                                     ((128, 30), 300, (8, 3)), ((192, 64, 7), 256, (16, 2, 5)),
                                     ((100, 64), 64, (4, 4))])
def test_gpu_stacked_merged_weight_equals_one_merge_per_part(dtype, ds, k, rs):
    """wprime.stacked_merged_weight (one launch for q/k/v or gate/up; per-part launches when a part
    but the last is not a multiple of the kernel's row block) equals merged_weight part by part."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(d, k, device="cuda", generator=g).to(dtype) for d in ds]
    Bs = [(torch.randn(d, r, device="cuda", generator=g) * 0.1).to(dtype) for d, r in zip(ds, rs)]
    As = [torch.randn(r, k, device="cuda", generator=g).to(dtype) for r in rs]
    scales = [0.75, 2.0, -1.0][:len(ds)]
    want = torch.cat([wprime.merged_weight(w, B, A, s) for w, B, A, s in zip(ws, Bs, As, scales)])
    for _ in range(3):                                       # the JIT, then the direct launches
        assert torch.equal(wprime.stacked_merged_weight(ws, Bs, As, scales), want)
        # the A's appended as rows, or blockdiag(B's) as columns, in the same launch
        assert torch.equal(wprime.stacked_merged_weight(ws, Bs, As, scales, append_a=True), torch.cat([want, *As]))
        assert torch.equal(wprime.stacked_merged_weight(ws, Bs, As, scales, append_b=True),
                           torch.cat([want, torch.block_diag(*Bs)], dim=1))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,k,r", [(2048, 8192, 16), (333, 136, 8), (100, 300, 64), (64, 64, 200)])
def test_gpu_merged_weight_with_appended_factors(dtype, d, k, r):
    """[W' | B] and [W'; A] (stacked_merged_weight with append_b / append_a) from the kernel: W'
    as merged_weight builds it, the factors copied exactly."""
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(d, k, device="cuda", generator=g).to(dtype)
    B = (torch.randn(d, r, device="cuda", generator=g) * 0.1).to(dtype)
    A = torch.randn(r, k, device="cuda", generator=g).to(dtype)
    want = wprime.merged_weight(w, B, A, 0.75)
    for _ in range(3):
        wb = wprime.stacked_merged_weight([w], [B], [A], [0.75], append_b=True)
        assert wb.shape == (d, k + r) and torch.equal(wb[:, :k], want) and torch.equal(wb[:, k:], B)
        wa = wprime.stacked_merged_weight([w], [B], [A], [0.75], append_a=True)
        assert wa.shape == (d + r, k) and torch.equal(wa[:d], want) and torch.equal(wa[d:], A)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead,k,d,r,bias", [((8, 1), 2048, 2048, 16, False), ((1,), 2048, 512, 16, True),
                                             ((3, 5), 2048, 8192, 64, False), ((64,), 8192, 2048, 1, True),
                                             ((17,), 136, 333, 8, True), ((2,), 300, 100, 128, False),
                                             ((30,), 64, 48, 33, False)])
def test_gpu_few_rows_kernel_matches_reference(dtype, lead, k, d, r, bias):
    """The one-launch LoRA linear for decoding (lorakit.kernels.skinny) against the float64
    reference, and the no-grad path picking it."""
    from lorakit import kernels
    sk = kernels.load("skinny")
    x, w, b, A, B = make(lead, k, d, r, bias=bias, dtype=dtype, device="cuda")
    want = ops.lora_linear_reference(x.double(), w.double(), None if b is None else b.double(), A.double(),
                                     B.double(), 0.75)
    assert sk.supported(x, w, b, A, B)
    got = sk.lora_linear(x, w, b, A, B, 0.75)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(got, want) < tol
    with torch.no_grad():                                     # the layer's inference path runs it
        assert torch.equal(ops.lora_linear_nograd(x, w, b, A, B, 0.75), got)
    plain = F.linear(x, w, b) + 0.75 * F.linear(F.linear(x, A), B)
    assert rel(got, want) <= 2 * rel(plain, want) + 1e-6      # no less accurate than the three-op form
    assert all(not c.any() for _, c in sk._BUFFERS.values())  # split-k arrival counters reset by the kernel
    for _ in range(2):                                        # the direct launches after the first (JIT) one
        assert torch.equal(sk.lora_linear(x, w, b, A, B, 0.75), got)  # deterministic (fixed summation order)
    n = x.numel() // k
    for split in (1, 2, 4):                                   # every k-split gives the same function
        k_per = -(-(-(-k // split)) // 128) * 128
        plan = (16 if n <= 16 else (32 if n <= 32 else 64), 16, 128, -(-k // k_per), k_per, 4, 3)
        y = sk.launch_plan(x, w, b, A, B, 0.75, torch.empty_like(got), plan)
        assert rel(y, want) < tol


@pytest.mark.gpu
@cuda
def test_gpu_few_rows_kernel_in_a_cuda_graph():
    from lorakit import kernels
    sk = kernels.load("skinny")
    x, w, b, A, B = make((8, 1), 8192, 2048, 16, dtype=torch.bfloat16, device="cuda")
    want = sk.lora_linear(x, w, b, A, B, 2.0)                 # outside the graph first (makes the counters)
    assert sk.plan(8, 2048, 8192, 16)[3] > 1                  # this shape splits k: the counters matter
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        sk.lora_linear(x, w, b, A, B, 2.0)
        with torch.cuda.graph(g, stream=s):
            y = sk.lora_linear(x, w, b, A, B, 2.0)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, want)


@pytest.mark.gpu
@cuda
def test_gpu_few_rows_kernel_declines_what_it_cannot_take():
    from lorakit import kernels
    sk = kernels.load("skinny")
    x, w, b, A, B = make((65,), 256, 128, 16, dtype=torch.bfloat16, device="cuda")
    assert not sk.supported(x, w, b, A, B)                    # too many rows: the GEMMs are cheaper
    assert sk.lora_linear(x, w, b, A, B, 2.0) is None
    x, w, b, A, B = make((8,), 256, 128, 16, dtype=torch.bfloat16, device="cuda")
    assert not sk.supported(x, w.t().contiguous().t(), b, A, B)
    assert not sk.supported(x, w, b, A.float(), B)
    assert not sk.supported(x[:, ::2], w[:, ::2], b, A[:, ::2], B)
    off = torch.empty(8 * 256 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(8, 256)
    off.copy_(x)
    assert not sk.supported(off, w, b, A, B)                  # a row start not 16-byte aligned
    with torch.no_grad():                                     # and the no-grad path still computes it
        y = ops.lora_linear(x[:, ::2], w[:, ::2], b, A[:, ::2], B, 2.0)
    want = ops.lora_linear_reference(x[:, ::2].float(), w[:, ::2].float(), b.float(), A[:, ::2].float(), B.float(), 2.0)
    assert rel(y, want) < 1e-2


def test_embedding_fast_matches_reference():
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    w = torch.randn(20, 6)
    A, B = torch.randn(4, 20, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    y1 = ops.lora_embedding(ids, w, A, B, 0.5, padding_idx=2)
    y2 = ops.lora_embedding_reference(ids, w, A, B, 0.5, padding_idx=2)
    g1 = torch.autograd.grad(y1.square().sum(), (A, B))
    g2 = torch.autograd.grad(y2.square().sum(), (A, B))
    assert rel(y1, y2) < 1e-6 and all(rel(a, b) < 1e-6 for a, b in zip(g1, g2))


def test_gpt2_conv1d_layer_uses_fast_path_and_matches_reference():
    model = tiny_gpt2()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomize_adapters(model, std=0.1)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model(ids).logits
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 32)
    a = layer.adapters["default"]
    want = ops.lora_linear_reference(x, layer.base_weight_dk(), layer.base.bias, a.lora_A, a.lora_B, a.scale)
    assert rel(layer(x), want) < 1e-5 and torch.isfinite(out).all()


def test_linear_module_zero_b_equals_base_exactly():
    lin = nn.Linear(8, 6)
    x = torch.randn(5, 8)
    A, B = torch.randn(2, 8), torch.zeros(6, 2)
    for mode in ("unmerged", "merged"):
        y = ops.lora_linear(x, lin.weight.detach(), lin.bias.detach(), A, B, 3.0, mode=mode)
        assert torch.equal(y, F.linear(x, lin.weight, lin.bias).detach())
