"""Packed MLP weights (lorakit.packed) and the fused node's augmented form: the base weights move
into buffers with room for the factors, values and parameters unchanged; the node then runs the
GEMM sites that do not merge as one GEMM each (float32: exact to 1e-5 against the unfused layers);
everything that moves, copies or reshapes the weights still works, and unpacking restores
contiguous weights."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit import fused, ops, packed
from conftest import TOKENS64, assert_close, loss_and_grads, randomize_adapters, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(r=4, **cfg):
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=ALL7, **cfg))
    randomize_adapters(model, std=0.2)
    return model


def mlps(model):
    return [layer.mlp for layer in model.model.layers]


def weights(mlp):
    return [getattr(mlp, p).base.weight for p in ("gate_proj", "up_proj", "down_proj")]


def is_packed(mlp):
    return packed.packed(mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def unfused_reference(model, ids=TOKENS64):
    """loss_and_grads of the same model with the MLPs unfused (and unpacked), then routed again."""
    fused.detach(model)
    want = loss_and_grads(model, ids)
    fused.attach(model)
    return want


@pytest.fixture
def augmented(monkeypatch):
    """Every site not merged (mlp_forms forced); beside W0 fails the test, so packed sites must run augmented."""
    monkeypatch.setattr(fused, "mlp_forms", lambda *a, **k: (False,) * 4)

    def no_beside(*a, **k):
        raise AssertionError("a packed site ran beside W0")
    monkeypatch.setattr(ops, "beside_into", no_beside)


# ---------------------------------------------------------------------------- the layout
def test_inject_packs_the_mlp_weights_values_and_parameters_unchanged():
    plain = tiny_llama()
    before = [[w.clone() for w in (l.mlp.gate_proj.weight, l.mlp.up_proj.weight, l.mlp.down_proj.weight)]
              for l in plain.model.layers]
    params = [[w for w in (l.mlp.gate_proj.weight, l.mlp.up_proj.weight, l.mlp.down_proj.weight)]
              for l in plain.model.layers]
    lorakit.inject(plain, lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL7))
    for mlp, want, ps in zip(mlps(plain), before, params):
        ws = weights(mlp)
        assert is_packed(mlp) and all(w is p for w, p in zip(ws, ps))        # the same Parameter objects
        assert all(torch.equal(w, v) for w, v in zip(ws, want))
        i, h = ws[0].shape
        assert ws[0].stride() == (h + 16, 1) and ws[2].stride() == (i + 8, 1)  # tails 2 x 8 (rank 4 each) and 8
        fgu, fd = packed.buffers(*ws, 8, 4)
        assert fgu.shape == (2 * i + 16, h + 16) and fd.shape == (h + 8, i + 8)
        assert torch.equal(fgu[:i, :h], ws[0]) and torch.equal(fgu[i:2 * i, :h], ws[1])
        assert packed.buffers(*ws, 9, 4) is None and packed.buffers(*ws, 8, 9) is None   # too narrow
        assert packed.dims(fgu, fd) == (i, h) and packed.half(fgu, h) == 8
        assert not any(w.requires_grad for w in ws)


def test_tails_round_up_to_16_bytes():
    assert [packed.tail(r) for r in (1, 8, 9, 16, 32, 33)] == [8, 8, 16, 16, 32, 40]


def test_pack_is_idempotent_and_unpack_restores_contiguous_weights():
    model = lora_llama()
    assert fused.pack(model) == 0                                            # packed at inject already
    want = [[w.clone() for w in weights(m)] for m in mlps(model)]
    assert fused.unpack(model) == 2 and fused.unpack(model) == 0
    for mlp, ws in zip(mlps(model), want):
        assert not is_packed(mlp)
        assert all(w.is_contiguous() and torch.equal(w, v) for w, v in zip(weights(mlp), ws))
    assert fused.pack(model) == 2
    assert all(is_packed(m) for m in mlps(model))


def test_writes_put_the_factors_in_their_halves_and_never_touch_the_rest():
    model = lora_llama(r=3)                                                   # halves of 8 for rank 3, and 8
    mlp = mlps(model)[0]
    ws = weights(mlp)
    fgu, fd = packed.buffers(*ws, 3, 3)
    fac = [m.adapters["default"] for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    packed.write_b(fgu, fd, fac[0].lora_B, fac[1].lora_B, fac[2].lora_B)
    packed.write_a(fgu, fd, fac[0].lora_A, fac[1].lora_A, fac[2].lora_A)
    i, h = ws[0].shape
    assert torch.equal(fgu[:i, h:h + 3], fac[0].lora_B) and torch.equal(fgu[i:2 * i, h + 8:h + 11], fac[1].lora_B)
    assert torch.equal(fgu[2 * i:2 * i + 3, :h], fac[0].lora_A)
    assert torch.equal(fgu[2 * i + 8:2 * i + 11, :h], fac[1].lora_A)
    assert torch.equal(fd[:h, i:i + 3], fac[2].lora_B) and torch.equal(fd[h:h + 3, :i], fac[2].lora_A)
    zeros = [fgu[:i, h + 3:], fgu[i:2 * i, h:h + 8], fgu[i:2 * i, h + 11:], fgu[2 * i:, h:],
             fgu[2 * i + 3:2 * i + 8], fgu[2 * i + 11:], fd[:h, i + 3:], fd[h:, i:], fd[h + 3:]]
    assert all(not z.any() for z in zeros)
    packed.write_b(fgu, fd, None, None, None)                                 # nothing asked: nothing written


# ---------------------------------------------------------------------------- the augmented form
@pytest.mark.parametrize("r,rel", [(4, 1e-5), (16, 1e-5), (3, 3e-5)])
def test_augmented_node_matches_unfused_float32(augmented, r, rel):
    """(At r=3, float32 rounding alone reaches 1.7e-5 for one attention gradient with the sites
    beside W0, unpacked; 1.4e-5 packed.)"""
    model = lora_llama(r=r)
    got = loss_and_grads(model)
    assert all(is_packed(m) for m in mlps(model))
    assert_close(got, unfused_reference(model), rel)


def test_augmented_with_different_scales_and_frozen_factors(augmented):
    model = lora_llama()
    for m in mlps(model):
        m.up_proj.adapters["default"].scale = 0.5                          # sg != su
        m.down_proj.adapters["default"].lora_A.requires_grad_(False)
    assert_close(loss_and_grads(model), unfused_reference(model), 1e-5)


def test_frozen_adapters_still_pass_input_gradients(augmented):
    model = lora_llama()
    model.requires_grad_(False)
    x = model.model.embed_tokens(TOKENS64).detach().requires_grad_(True)
    w = torch.randn(*x.shape, generator=torch.Generator().manual_seed(0))   # (not the RMSNorm-invariant |h|^2)
    (model.model(inputs_embeds=x).last_hidden_state * w).sum().backward()
    gx = x.grad.clone()
    fused.detach(model)
    x.grad = None
    (model.model(inputs_embeds=x).last_hidden_state * w).sum().backward()
    assert ((gx - x.grad).norm() / x.grad.norm()).item() < 1e-5


def test_two_forwards_before_one_backward(augmented):
    """refresh writes the tails of the weights' storage, but not through the weights: the version
    counters that autograd checks stay as saved."""
    model = lora_llama()
    ids2 = TOKENS64.flip(-1)
    model.zero_grad()
    (model(TOKENS64, labels=TOKENS64).loss + model(ids2, labels=ids2).loss).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    fused.detach(model)
    model.zero_grad()
    (model(TOKENS64, labels=TOKENS64).loss + model(ids2, labels=ids2).loss).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert ((got[n] - p.grad).norm() / p.grad.norm()).item() < 1e-5, n


def test_adapters_of_other_ranks_share_the_tails(augmented):
    """Two adapters (r=4, r=2): packed for the larger, the smaller uses part of each tail (the
    larger's values stay beyond it, against zero columns); a third, larger one added later widens
    the packing."""
    model = lora_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=ALL7), name="small")
    randomize_adapters(model, std=0.2)
    for name in ("default", "small", "default", "small"):                  # stale tails of the larger rank
        lorakit.set_adapter(model, name)
        assert_close(loss_and_grads(model), unfused_reference(model), 1e-5)
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=ALL7), name="big")
    randomize_adapters(model, std=0.2)
    lorakit.set_adapter(model, "big")
    assert all(weights(m)[0].stride(0) == 32 + 2 * 8 and weights(m)[2].stride(0) == 64 + 8 for m in mlps(model))
    assert_close(loss_and_grads(model), unfused_reference(model), 1e-5)


def test_moved_weights_fall_back_then_pack_again(augmented, monkeypatch):
    """.to() gives contiguous weights (the packing is gone); the node's first eager call packs them
    again, in the new dtype."""
    model = lora_llama().double()
    assert not any(is_packed(m) for m in mlps(model))
    got = loss_and_grads(model, TOKENS64)
    assert all(is_packed(m) for m in mlps(model)) and weights(mlps(model)[0])[0].dtype == torch.float64
    assert_close(got, unfused_reference(model), 1e-5)          # (the SwiGLU reference rounds through float32)


def test_pack_off_leaves_the_weights_alone(monkeypatch):
    monkeypatch.setattr(fused, "PACK", False)
    model = lora_llama()
    loss_and_grads(model)
    assert not any(is_packed(m) for m in mlps(model))
    assert all(w.is_contiguous() for m in mlps(model) for w in weights(m))


def test_compiled_node_runs_augmented_on_packed_weights(augmented, monkeypatch):
    calls = []
    for fn in ("write_a", "write_b"):
        orig = getattr(packed, fn)
        monkeypatch.setattr(packed, fn, lambda *a, orig=orig, fn=fn: calls.append(fn) or orig(*a))
    model = lora_llama()
    mlp = mlps(model)[0]
    x = torch.randn(2, 32, 32, requires_grad=True)
    got = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
    got.sum().backward()
    torch._dynamo.reset()
    gx, x.grad = x.grad.clone(), None
    assert calls == ["write_b", "write_a"]                                   # forward and backward
    want = mlp(x)
    want.sum().backward()
    assert torch.equal(got, want) and torch.equal(gx, x.grad)


# ---------------------------------------------------------------------------- the rest of the library
def test_merge_unmerge_save_load_and_state_dict_on_packed_weights(tmp_path):
    model = lora_llama()
    ids = TOKENS64
    with torch.no_grad():
        base = model(ids).logits
    lorakit.merge(model)
    assert all(is_packed(m) for m in mlps(model))
    with torch.no_grad():
        merged = model(ids).logits
    lorakit.unmerge(model)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, base, atol=1e-5) and torch.allclose(merged, base, atol=1e-4)
    lorakit.save_adapter(model, tmp_path / "a")
    other = lora_llama()
    lorakit.load_adapter(other, tmp_path / "a", name="loaded")
    lorakit.set_adapter(other, "loaded")
    with torch.no_grad():
        assert torch.allclose(other(ids).logits, base, atol=1e-5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = lora_llama()
    fresh.load_state_dict(sd)
    assert all(is_packed(m) for m in mlps(fresh))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_deepcopy_unload_and_delete_adapter_leave_contiguous_or_working_weights():
    model = lora_llama()
    with torch.no_grad():
        want = model(TOKENS64).logits
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(TOKENS64).logits, want)
    base = lorakit.unload(copy.deepcopy(model))
    assert all(w.is_contiguous() for m in mlps(base) for w in (m.gate_proj.weight, m.up_proj.weight,
                                                                 m.down_proj.weight))
    lorakit.delete_adapter(model, "default")
    assert all(w.is_contiguous() for m in mlps(model) for w in (m.gate_proj.weight, m.up_proj.weight,
                                                                  m.down_proj.weight))


def test_packed_mlp_forms_follow_the_byte_counts():
    assert fused.mlp_forms(8192, 8192, 2048, tails=(32, 16)) == (True, True, True, False)
    assert fused.mlp_forms(4096, 14336, 4096, tails=(32, 16)) == (False, False, False, False)
    assert fused.mlp_forms(512, 1536, 576, tails=(32, 16)) == (False,) * 4
    assert fused.mlp_forms(2048, 1536, 576, tails=(32, 16)) == (True, True, True, False)


@pytest.mark.gpu
@cuda
def test_gpu_packed_node_float32_and_decode_kernel_on_a_packed_weight(augmented):
    """On the GPU: the augmented node (cuBLAS with row strides) against the unfused layers in
    float32, and the decode kernel on a packed bfloat16 weight against its contiguous copy."""
    from lorakit.kernels import skinny
    model = lora_llama().cuda()
    assert fused.pack(model) == 2
    got = loss_and_grads(model, TOKENS64.cuda())
    assert_close(got, unfused_reference(model, TOKENS64.cuda()), 1e-5)
    model.to(torch.bfloat16)
    fused.pack(model)
    w = weights(mlps(model)[0])[0]
    assert not w.is_contiguous() and w.dtype == torch.bfloat16
    ad = mlps(model)[0].gate_proj.adapters["default"]
    x = torch.randn(8, w.shape[1], device="cuda", dtype=torch.bfloat16)
    assert skinny.supported(x, w, None, ad.lora_A, ad.lora_B)
    y = skinny.lora_linear(x, w, None, ad.lora_A, ad.lora_B, 2.0)
    assert torch.equal(y, skinny.lora_linear(x, w.contiguous(), None, ad.lora_A, ad.lora_B, 2.0))
