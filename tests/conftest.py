"""Shared test fixtures: tiny models built from configs (never downloaded) and plain torch nets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


def tiny_llama(seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


class MLP(nn.Module):
    def __init__(self, sizes=(16, 32, 24, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.seq = nn.Conv1d(8, 6, 2)
        self.head = nn.Linear(6, 4)

    def forward(self, x):                       # x: (B, 3, 8, 8)
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))   # (B, 8, 3, 3)
        h = self.seq(h.flatten(2))             # (B, 6, 8)
        return self.head(h.mean(-1))           # (B, 4)


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
TOKENS64 = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))   # 64 tokens: fused / grouped apply


class CountCalls:
    """Counts calls of ``owner.<name>`` (an autograd node's ``apply``), patched for one test."""

    def __init__(self, monkeypatch, owner, name: str = "apply"):
        self.n = 0
        orig = getattr(owner, name)

        def counted(*args, **kwargs):
            self.n += 1
            return orig(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)


def loss_and_grads(model, ids=TOKENS64):
    """(the language-model loss, {name: gradient}) of one forward and backward on ``ids``."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a, b, rel):
    """Two ``loss_and_grads`` results agree: the loss and every gradient to relative ``rel``."""
    la, ga = a
    lb, gb = b
    assert abs(la.item() - lb.item()) <= rel * abs(lb.item())
    assert sorted(ga) == sorted(gb)
    for n in gb:
        err = (ga[n].float() - gb[n].float()).norm() / gb[n].float().norm()
        assert err < rel, (n, err.item())


def rel_errors(got, want):
    """Relative error of the loss and of every gradient of ``got`` against ``want``."""
    errs = {"loss": abs(got[0].item() - want[0].item()) / abs(want[0].item())}
    for n, g in want[1].items():
        errs[n] = ((got[1][n].float() - g.float()).norm() / g.float().norm()).item()
    return errs


def assert_no_less_accurate(got, plain, want, factor=1.5, each=2.0):
    """``got`` (loss and gradients, a lower precision) is about as accurate against ``want`` as
    ``plain`` (the separate layers at the same dtype): the root-sum-square of its relative errors
    is at most ``factor`` times plain's, and each error at most ``each`` times plain's (or 1e-2).

    Rounding noise, not a bound: in bfloat16 the tiny test models' gradients of the first layer
    carry 5-20% relative error from cancellations, and where a form rounds (W' or the output)
    moves single errors by up to 1.6x either way."""
    e_got, e_plain = rel_errors(got, want), rel_errors(plain, want)
    for n in e_plain:
        assert e_got[n] <= max(each * e_plain[n], 1e-2), (n, e_got[n], e_plain[n])
    total = (sum(e * e for e in e_got.values()) / sum(e * e for e in e_plain.values())) ** 0.5
    assert total <= factor, (total, e_got, e_plain)


def run(model, x=IDS):
    """The model's output tensor (logits or last hidden state) without autograd."""
    with torch.no_grad():
        out = model(x)
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out


def seeded(cls):
    """A builder of ``cls()`` with torch seeded 0 (the same weights every call)."""
    def build():
        torch.manual_seed(0)
        return cls()
    return build


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: tensors, module types, grad flags, adapter names."""
    import lorakit
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "types": [(n, type(m)) for n, m in model.named_modules()],
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "adapters": lorakit.adapter_names(model), "active": lorakit.active_adapter(model)}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    now = snapshot(model)
    assert now["types"] == before["types"]
    assert now["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(now["state"][k], v), k
    assert now["grad"] == before["grad"]
    assert (now["adapters"], now["active"]) == (before["adapters"], before["active"])


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.5) -> None:
    """Give every adapter parameter random values (B starts at zero, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny tensors run fastest on one thread, and on a loaded 2-core machine thread hand-offs dominate."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def clone():
    return copy.deepcopy
