"""Per-row adapters (lorakit.multi, lorakit.kernels.rows): a mixed batch equals every row run alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.errors import AdapterNotFound, LoraError, MergedStateError
from lorakit.inject import find_state
from lorakit.multi import batch_adapters, embedding_rows, lora_rows, lora_rows_reference, padded_rank

from conftest import CNN, MLP, randomize_adapters, tiny_gpt2, tiny_llama

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pack(adapters, d, k, dtype=torch.float32, device="cpu"):
    """Zero slot + each (A, B, s) padded to the pack rank: A (S, R, k), B (S, d, R), scale (S,)."""
    R = padded_rank(A.shape[0] for A, _, _ in adapters)
    A_p = torch.zeros(len(adapters) + 1, R, k, dtype=dtype, device=device)
    B_p = torch.zeros(len(adapters) + 1, d, R, dtype=dtype, device=device)
    for g, (A, B, _) in enumerate(adapters, 1):
        A_p[g, :A.shape[0]] = A
        B_p[g, :, :A.shape[0]] = B
    scale = torch.tensor([0.0] + [s for _, _, s in adapters], device=device)
    return A_p, B_p, scale


def random_adapters(k, d, ranks, gen, device="cpu"):
    return [(torch.randn(r, k, generator=gen).to(device), torch.randn(d, r, generator=gen).to(device), 0.5 + g)
            for g, r in enumerate(ranks)]


# ---------------------------------------------------------------------------- the ops
def test_lora_rows_equals_reference_mixed_ranks():
    gen = torch.Generator().manual_seed(0)
    k, d, N, T = 24, 20, 6, 5
    adapters = random_adapters(k, d, [3, 8, 17], gen)
    rows = [1, 0, 3, 2, 1, 0]
    x = torch.randn(N, T, k, generator=gen)
    W, b = torch.randn(d, k, generator=gen), torch.randn(d, generator=gen)
    A, B, scale = pack(adapters, d, k)
    assert A.shape[1] == 32                                       # 17 pads to the next power of two
    base = F.linear(x, W, b)
    got = lora_rows(base, x, A, B, scale, torch.tensor(rows))
    ref = lora_rows_reference(x, W, b, adapters, rows)
    assert rel(got, ref) < 1e-6
    for i in (1, 5):                                              # no adapter: exactly the base
        assert torch.equal(got[i], base[i])


def test_embedding_rows_equals_one_adapter_path():
    gen = torch.Generator().manual_seed(1)
    V, dim, N, T = 30, 12, 4, 6
    adapters = random_adapters(V, dim, [4, 2], gen)
    W = torch.randn(V, dim, generator=gen)
    ids = torch.randint(0, V, (N, T), generator=gen)
    rows = [2, 1, 0, 2]
    A, B, scale = pack(adapters, dim, V)
    got = embedding_rows(F.embedding(ids, W), ids, A, B, scale, torch.tensor(rows))
    for i, g in enumerate(rows):
        ref = F.embedding(ids[i], W)
        if g:
            Ag, Bg, s = adapters[g - 1]
            ref = lorakit.ops.lora_embedding_reference(ids[i], W, Ag, Bg, s)
        assert rel(got[i], ref) < 1e-6


# ---------------------------------------------------------------------------- models
def llama_with_adapters(seed=0, trainable=True):
    m = tiny_llama(seed)
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="sql")
    lorakit.inject(m, lorakit.LoraConfig(r=8, alpha=3, target_modules="all-linear"), name="js")
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=5, use_rslora=True, target_modules=["embed_tokens", "down_proj"]),
                   name="emb")
    randomize_adapters(m, seed=seed + 1, std=0.3)
    if not trainable:
        for p in m.parameters():
            p.requires_grad_(False)
    return m


def rows_alone(model, inputs, names, fn=lambda m, x: m(x).logits):
    """The reference: every row on its own, with set_adapter (or disable_adapters for None)."""
    outs = []
    for i, n in enumerate(names):
        if n is None:
            with lorakit.disable_adapters(model):
                outs.append(fn(model, inputs[i:i + 1]))
        else:
            lorakit.set_adapter(model, n)
            outs.append(fn(model, inputs[i:i + 1]))
    return torch.cat(outs)


NAMES = ["sql", "js", None, "emb", "sql", "js"]


@pytest.mark.parametrize("trainable", [True, False], ids=["stacked", "packed"])
def test_llama_mixed_batch_equals_rows_alone(trainable):
    m = llama_with_adapters(trainable=trainable)
    ids = torch.randint(0, 64, (len(NAMES), 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = rows_alone(m, ids, NAMES)
        with batch_adapters(m, NAMES) as plan:
            got = m(ids).logits
    assert plan.trainable is trainable
    for i in range(len(NAMES)):
        assert rel(got[i], ref[i]) < 1e-5, NAMES[i]
    assert rel(ref[0], ref[1]) > 1e-2                              # the adapters really differ


def test_gpt2_conv1d_and_mlp_and_cnn_rows():
    gen = torch.Generator().manual_seed(3)
    gpt = tiny_gpt2()
    lorakit.inject(gpt, lorakit.LoraConfig(r=4, alpha=4, target_modules=["c_attn", "c_fc"]), name="a")
    lorakit.inject(gpt, lorakit.LoraConfig(r=6, alpha=9, target_modules=["c_attn", "c_proj"]), name="b")
    mlp = MLP()
    lorakit.inject(mlp, lorakit.LoraConfig(r=3, alpha=6, target_modules=["layers.0", "layers.2"]), name="a")
    lorakit.inject(mlp, lorakit.LoraConfig(r=5, alpha=2, target_modules=["layers.1"]), name="b")
    cnn = CNN()
    lorakit.inject(cnn, lorakit.LoraConfig(r=2, alpha=4, target_modules=["conv1", "seq", "head"]), name="a")
    lorakit.inject(cnn, lorakit.LoraConfig(r=4, alpha=2, target_modules=["conv2"]), name="b")
    names = ["b", None, "a", "a", "b"]
    cases = [(gpt, torch.randint(0, 64, (5, 6), generator=gen), lambda m, x: m(x).logits),
             (mlp, torch.randn(5, 16, generator=gen), lambda m, x: m(x)),
             (cnn, torch.randn(5, 3, 8, 8, generator=gen), lambda m, x: m(x))]
    for model, x, fn in cases:
        randomize_adapters(model, std=0.4)
        with torch.no_grad():
            ref = rows_alone(model, x, names, fn)
            with batch_adapters(model, names):
                got = fn(model, x)
        assert rel(got, ref) < 1e-5, type(model).__name__


def test_generate_keeps_row_adapters():
    m = llama_with_adapters(trainable=False)
    names = ["js", "sql", None]
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = rows_alone(m, ids, names, lambda mm, x: mm.generate(x, attention_mask=torch.ones_like(x), **kw))
    with batch_adapters(m, names):
        got = m.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(got, ref)
    assert find_state(m).rows is None


# ---------------------------------------------------------------------------- training
def row_losses(logits, ids):
    """Next-token cross-entropy summed per row: the batch loss is the sum over rows."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def test_training_mixed_batch_equals_per_adapter_steps():
    names = ["sql", "js", None, "js", "sql", "emb"]
    ids = torch.randint(0, 64, (len(names), 8), generator=torch.Generator().manual_seed(5))
    mixed = llama_with_adapters(seed=3)
    alone = copy.deepcopy(mixed)
    groups = ["sql", "js", "emb"]
    params = {n: list(lorakit.adapter_parameters(mixed, n)) for n in groups}

    opt = torch.optim.SGD([p for n in groups for p in params[n]], lr=0.05)
    with batch_adapters(mixed, names):
        loss = row_losses(mixed(ids).logits, ids)
    loss.backward()
    grads = {n: [p.grad.clone() for p in params[n]] for n in groups}
    opt.step()

    for n in groups:                                  # per-adapter steps on that adapter's rows only
        lorakit.set_adapter(alone, n)
        rows = [i for i, x in enumerate(names) if x == n]
        ps = list(lorakit.adapter_parameters(alone, n))
        row_losses(alone(ids[rows]).logits, ids[rows]).backward()
        for p, g in zip(ps, grads[n]):
            assert rel(g, p.grad) < 1e-5
        torch.optim.SGD(ps, lr=0.05).step()
        for p, q in zip(ps, params[n]):
            assert rel(q.detach(), p.detach()) < 1e-6
    assert all(p.grad is None for n, p in mixed.named_parameters() if "lora_" not in n)


def test_dropout_in_train_mode_leaves_base_rows_exact():
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, dropout=0.5, target_modules="all-linear"), name="a")
    randomize_adapters(m)
    m.train()
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(6))
    with batch_adapters(m, ["a", None, "a"]):
        out = m(ids).logits
    out.sum().backward()
    with torch.no_grad(), lorakit.disable_adapters(m):
        base = m(ids[1:2]).logits
    assert rel(out[1].detach(), base[0]) < 1e-5
    assert all(p.grad is not None for p in lorakit.adapter_parameters(m, "a"))


# ---------------------------------------------------------------------------- state and errors
def test_errors_are_clear_and_state_is_restored():
    m = llama_with_adapters(trainable=False)
    st = find_state(m)
    ids = torch.randint(0, 64, (3, 4))
    with pytest.raises(LoraError, match=r"given 2 names.*shape \(3, 4"):
        with batch_adapters(m, ["sql", "js"]):
            m(ids)
    assert st.rows is None
    with pytest.raises(AdapterNotFound, match=r"'nope'.*available adapters: \['sql', 'js', 'emb'\]"):
        with batch_adapters(m, ["sql", "nope"]):
            pass
    with pytest.raises(LoraError, match="one adapter name"):
        with batch_adapters(m, "sql"):
            pass
    with pytest.raises(LoraError, match="empty"):
        with batch_adapters(m, []):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with batch_adapters(m, ["sql", None, "js"]):
            raise RuntimeError("boom")
    assert st.rows is None and st.active == "sql" and not st.disabled
    with batch_adapters(m, ["sql", None, "js"]) as outer:
        with batch_adapters(m, ["js", "js", "js"]):
            assert st.rows is not outer
        assert st.rows is outer
    lorakit.merge(m, "sql")
    with pytest.raises(MergedStateError):
        with batch_adapters(m, ["sql", None, "js"]):
            pass


def test_packed_weights_follow_changes_and_replaced_adapters(tmp_path):
    m = llama_with_adapters(trainable=False)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(7))
    names = ["js", "sql"]
    with torch.no_grad():
        with batch_adapters(m, names):
            m(ids)
        for p in lorakit.adapter_parameters(m, "js"):            # changed in place: version counters move
            p.mul_(1.5)
        lorakit.save_adapter(m, tmp_path / "js", name="js")
        with batch_adapters(m, names):
            got = m(ids).logits
        assert rel(got, rows_alone(m, ids, names)) < 1e-5
        lorakit.delete_adapter(m, "sql")                          # replaced under the same name
        lorakit.load_adapter(m, tmp_path / "js", name="sql")
        with batch_adapters(m, names):
            got = m(ids).logits
        assert rel(got, rows_alone(m, ids, names)) < 1e-5
        with batch_adapters(m, ["js", "js"]):
            assert rel(got, m(ids).logits) < 1e-5                 # "sql" now holds js's weights


def test_many_adapters_on_disjoint_layers():
    m = MLP((8, 8, 8, 8, 8, 8))
    for i in range(7):                              # slots beyond the first packs' sizes, each on one layer
        lorakit.inject(m, lorakit.LoraConfig(r=1 + i, alpha=2, target_modules=[f"layers.{i % 5}"]), name=f"a{i}")
    randomize_adapters(m)
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(9))
    for names in (["a0", "a1", None, "a2", "a3", "a4", "a5", "a6"], ["a6", "a5", "a0", None, None, "a1", "a0", "a6"]):
        with torch.no_grad():
            with batch_adapters(m, names):
                got = m(x)
            assert rel(got, rows_alone(m, x, names, lambda mm, xx: mm(xx))) < 1e-5


# ---------------------------------------------------------------------------- GPU
class TinyNet(nn.Module):
    """Embedding + a few linears: a model whose forward has no host synchronisation of its own."""

    def __init__(self, vocab=50, dim=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 3 * dim)
        self.down = nn.Linear(3 * dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.down(torch.relu(self.up(h))))


def tiny_net(device, dtype):
    torch.manual_seed(0)
    net = TinyNet()
    lorakit.inject(net, lorakit.LoraConfig(r=8, alpha=16, target_modules=["emb", "up", "down"]), name="a")
    lorakit.inject(net, lorakit.LoraConfig(r=32, alpha=8, target_modules=["up", "head"]), name="b")
    randomize_adapters(net, std=0.1)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device, dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 7, 300])
def test_kernels_match_torch_path(dtype, T):
    from lorakit.kernels.rows import add_rows_
    gen = torch.Generator().manual_seed(T)
    N, k, d = 9, 200, 328                                         # not multiples of the tiles
    adapters = random_adapters(k, d, [4, 16, 24], gen)
    A, B, scale = pack(adapters, d, k, dtype, "cuda")
    rows = [1, 0, 3, 2, 1, 0, 3, 3, 2]
    index = torch.tensor(rows, device="cuda")
    order = torch.tensor(sorted((i for i, g in enumerate(rows) if g), key=lambda i: rows[i]),
                         dtype=torch.int32, device="cuda")
    x = torch.randn(N, T, k, generator=gen).to("cuda", dtype)
    out = torch.randn(N, T, d, generator=gen).to("cuda", dtype)
    ref = lora_rows(out.float(), x.float(), A.float(), B.float(), scale, index)
    got = add_rows_(out.clone(), x, A, B, scale, index, order)
    assert rel(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    for i in (1, 5):
        assert torch.equal(got[i], out[i])                        # rows without adapter untouched


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_llama_triton_and_torch_equal_rows_alone(dtype):
    m = llama_with_adapters(trainable=False).to("cuda", dtype)
    ids = torch.randint(0, 64, (len(NAMES), 70), generator=torch.Generator().manual_seed(8)).cuda()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        ref = rows_alone(m, ids, NAMES)
        for backend in ("triton", "torch"):
            with batch_adapters(m, NAMES, backend=backend):
                got = m(ids).logits
            assert rel(got, ref) < tol, backend
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        names = ["js", "sql", None]
        gen_ref = rows_alone(m, ids[:3, :5], names,
                             lambda mm, x: mm.generate(x, attention_mask=torch.ones_like(x), **kw))
        with batch_adapters(m, names, backend="triton"):
            gen = m.generate(ids[:3, :5], attention_mask=torch.ones_like(ids[:3, :5]), **kw)
    if dtype == torch.float32:
        assert torch.equal(gen, gen_ref)


@pytest.mark.gpu
@cuda
def test_cuda_forward_has_no_host_sync_and_captures_in_a_graph():
    net = tiny_net("cuda", torch.bfloat16)
    names = ["b", None, "a", "b", "a", "a", None, "b"]
    ids, ids2 = (torch.randint(0, 50, (8, 16), device="cuda") for _ in range(2))
    step, step2 = (torch.randint(0, 50, (8, 1), device="cuda") for _ in range(2))
    static_ids, static_step = ids.clone(), step.clone()
    with torch.no_grad():
        ref = rows_alone(net, ids2, names, lambda m, x: m(x))
        with batch_adapters(net, names):
            net(ids), net(step)                                   # warm-up: kernels compiled
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")               # any host synchronisation raises
            try:
                net(ids)
                net(step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                net(static_ids), net(static_step)
            torch.cuda.current_stream().wait_stream(s)
            graph, graph1 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = net(static_ids)
            with torch.cuda.graph(graph1):
                static1 = net(static_step)
            static_ids.copy_(ids2)                                # new inputs, then replay
            static_step.copy_(step2)
            graph.replay()
            graph1.replay()
            eager, eager1 = net(ids2), net(step2)
            torch.cuda.synchronize()
    assert rel(eager, ref) < 2e-2
    assert rel(static, eager) < 1e-3 and rel(static1, eager1) < 1e-3
