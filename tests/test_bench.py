"""The benchmarks measure what they say: a cheap CPU check of bench/infer.py's decoding loop."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lorakit  # noqa: E402
from lorakit import ops  # noqa: E402


def test_infer_decoding_runs_one_token_per_sequence_per_step(monkeypatch):
    """generate with the KV cache: after the prompt, every adapted layer sees one new token per
    sequence (the bench once decoded without the cache and re-ran the whole sequence each step)."""
    from bench import common, infer
    size = dict(hidden=32, layers=2, inter=64, heads=4, kv=2, vocab=97, tie=False)
    model = common.build_llama(size, "cpu", torch.float32, seed=0).eval()     # its config says use_cache=False
    model.generation_config.pad_token_id = 0
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=common.TARGETS7))
    rows = []
    real = ops._lora_linear_nograd

    def spy(x, *a):
        rows.append(tuple(x.shape[:-1]))
        return real(x, *a)

    monkeypatch.setattr(ops, "_lora_linear_nograd", spy)
    args = SimpleNamespace(batch=1, seq=4, gen_batch=3, prompt=5, new_tokens=4, device="cpu")
    steps = infer.generate_fn(model, args, infer.StepClock())()
    assert len(steps) == args.new_tokens                      # one time per step after the first token
    per_call = set(rows)
    assert (3, 5) in per_call and (3, 1) in per_call and per_call <= {(3, 5), (3, 1)}


def test_longest_fitting_sequence_search():
    from bench.longest_seq import longest
    for limit_fit in (1024, 1300, 5000, 8192, 100_000):
        asked = []

        def fits(n):
            asked.append(n)
            return n <= limit_fit
        got = longest(fits, 1024, 256, 65536)
        assert got == min(limit_fit // 256 * 256, 65536) and got <= limit_fit
        assert len(asked) <= 2 + 7 + 8                           # doublings, then a bisection to 256
    assert longest(lambda n: n <= 500, 1024, 256, 65536) is None  # not even the start fits
    assert longest(lambda n: True, 1024, 256, 3000) == 3000       # capped by the limit
