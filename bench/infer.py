"""Inference benchmark: the base model vs one unmerged adapter (lorakit, PEFT) vs the merged model.

Two measurements per variant, same model, same random prompts, side by side in one process:

* prefill: ``model(ids, logits_to_keep=1)`` under ``torch.inference_mode`` (what generation's
  first step computes), batch x seq tokens; tokens/s (median of ``--steps`` calls);
* decoding: greedy ``model.generate`` with its KV cache from ``--prompt``-token prompts, 1 + n
  new tokens (each step runs one new token per sequence);
  milliseconds per step = the median time between consecutive steps (noted by a logits
  processor), the first token (which carries the prefill) excluded. All variants' models stay
  resident and run in turn, round after round (``--gen-reps`` rounds), since decoding is
  bound by the host and the host's speed drifts.

Variants::

    base             the plain model (no LoRA)
    lorakit          lorakit.inject, one active unmerged adapter (B random, not zero)
    lorakit-3ops     the same, decoding with the few-rows kernel off (three torch ops per layer)
    lorakit-merged   the same adapter folded in and unloaded (lorakit.unload(merge=True)):
                     plain modules again, the cost of any merged model
    peft             PEFT, one unmerged adapter, its defaults (float32 adapter weights)
    peft-bf16        PEFT, adapter weights in the base dtype

    PYTHONPATH=. python bench/infer.py --device cpu
    PYTHONPATH=. python bench/infer.py --device cuda --size 1b
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

VARIANTS = "base,lorakit,lorakit-3ops,lorakit-merged,peft,peft-bf16"


def randomize(params, std: float = 0.02) -> None:
    """Non-zero adapters (zeros can run faster than real data and would hide a skipped term)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def prepare(name: str, args, dtype):
    model = common.build_llama(args.size, args.device, dtype, seed=0, layers=args.layers).eval()
    model.generation_config.pad_token_id = 0
    if name.startswith("lorakit"):
        import lorakit
        lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=2 * args.r, target_modules=common.TARGETS7))
        randomize(list(lorakit.adapter_parameters(model)))
        if name == "lorakit-merged":
            model = lorakit.unload(model, merge=True)
        model._bench_no_kernel = name == "lorakit-3ops"
    elif name.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=common.TARGETS7)
        get_peft_model(model, cfg, autocast_adapter_dtype=name == "peft")
        randomize([p for n, p in model.named_parameters() if "lora_" in n])
    return model


def inputs(args, vocab: int):
    ids, _ = common.random_batch(args.batch, args.seq, vocab, args.device, seed=0)
    prompts, _ = common.random_batch(args.gen_batch, args.prompt, vocab, args.device, seed=1)
    return ids, prompts


def measure_prefill(model, args) -> dict:
    ids, _ = inputs(args, model.config.vocab_size)

    def prefill():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    common.reset_peak(args.device)
    t_pre = common.median(common.time_steps(prefill, args.device, args.warmup, args.steps))
    return dict(prefill_ms=t_pre * 1e3, prefill_tok_s=args.batch * args.seq / t_pre,
                prefill_peak_gib=common.peak_gib(args.device))


class StepClock:
    """A logits processor that only notes the time of each decoding step (generate calls it
    once per new token, after that step's forward)."""

    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        import time
        self.t.append(time.perf_counter())
        return scores


def generate_fn(model, args, clock: StepClock):
    from transformers import LogitsProcessorList
    from lorakit import kernels
    _, prompts = inputs(args, model.config.vocab_size)
    n = 1 + args.new_tokens

    def run():
        clock.t.clear()
        off = kernels.disabled("skinny") if getattr(model, "_bench_no_kernel", False) else contextlib.nullcontext()
        with torch.inference_mode(), off:
            model.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                           attention_mask=torch.ones_like(prompts), logits_processor=LogitsProcessorList([clock]))
        return [b - a for a, b in zip(clock.t, clock.t[1:])]       # the n steps after the first token
    return run


def measure_decode(models: dict, args) -> dict:
    """ms per decoding step for every model: the median of the times between consecutive
    steps of generate (the first token, which carries the prefill, excluded). Interleaved:
    each round runs every model once, so that drifts of the host's speed fall on all variants
    alike (decoding at batch 8 is bound by the host's time per kernel launch, not the GPU)."""
    runs = {name: generate_fn(m, args, StepClock()) for name, m in models.items()}
    for run in runs.values():                               # warm-up
        run()
    steps = {name: [] for name in runs}
    for rep in range(args.gen_reps):
        for name in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
            steps[name] += runs[name]()
    return {name: common.median(times) * 1e3 for name, times in steps.items()}


def add_ratios(rows: list[dict]) -> None:
    by = {r["variant"]: r for r in rows if "error" not in r}
    base, merged = by.get("base"), by.get("lorakit-merged")
    for r in by.values():
        if base and "prefill_ms" in r and "prefill_ms" in base:
            r["prefill_x_base"] = r["prefill_ms"] / base["prefill_ms"]
        if base and "decode_ms_per_step" in r and "decode_ms_per_step" in base:
            r["decode_x_base"] = r["decode_ms_per_step"] / base["decode_ms_per_step"]
        if merged and "decode_ms_per_step" in r and "decode_ms_per_step" in merged:
            r["decode_x_merged"] = r["decode_ms_per_step"] / merged["decode_ms_per_step"]


COLUMNS = [("variant", "variant", ""), ("prefill_tok_s", "prefill tok/s", "{:,.0f}"),
           ("prefill_x_base", "prefill time x base", "{:.3f}"), ("decode_ms_per_step", "decode ms/step", "{:.2f}"),
           ("decode_x_merged", "decode x merged", "{:.2f}"), ("decode_x_base", "decode x base", "{:.2f}"),
           ("prefill_peak_gib", "prefill peak GiB", "{:.2f}")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default=None, choices=sorted(common.SIZES))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=None, help="prefill batch (rows)")
    p.add_argument("--seq", type=int, default=None, help="prefill tokens per row")
    p.add_argument("--gen-batch", type=int, default=None)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--gen-reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=VARIANTS)
    p.add_argument("--out", default=None, help="result stem (STEM.json, STEM.md)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.size = args.size or ("smol" if cpu else "1b")
    args.batch = args.batch or (4 if cpu else 32)
    args.seq = args.seq or (128 if cpu else 512)
    args.gen_batch = args.gen_batch or (2 if cpu else 8)
    args.prompt = args.prompt if not cpu or args.prompt != 128 else 32
    args.new_tokens = args.new_tokens or (8 if cpu else 32)
    args.gen_reps = args.gen_reps or (3 if cpu else 10)
    if cpu:
        args.steps = min(args.steps, 10)
    dtype = torch.float32 if cpu else torch.bfloat16
    meta = common.env_info(args.device)
    meta.update(title=f"Inference, {args.size} shape, {args.device}", size=args.size, r=args.r,
                setup=(f"Llama shape `{args.size}`, {str(dtype).replace('torch.', '')}, random weights; LoRA "
                       f"r={args.r} on all 7 projections. Prefill: batch {args.batch} x {args.seq} tokens, "
                       f"last-token logits, median of {args.steps}. Decoding: greedy generate with the KV cache, batch "
                       f"{args.gen_batch}, {args.prompt}-token prompts, 1 + {args.new_tokens} new tokens; ms per step: median "
                       f"time between consecutive steps over {args.gen_reps} interleaved rounds (the first token "
                       f"excluded)."))
    rows, models = [], {}
    for name in args.variants.split(","):
        try:
            before = torch.cuda.memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0
            models[name] = prepare(name, args, dtype)
            row = dict(variant=name, **measure_prefill(models[name], args))
            if row["prefill_peak_gib"] is not None:         # the other variants' resident models excluded
                row["prefill_peak_gib"] -= before
            rows.append(row)
        except Exception as e:  # noqa: BLE001 - one failing variant is reported, the others still run
            models.pop(name, None)
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
        print(rows[-1], flush=True)
    decode = measure_decode(models, args)
    for r in rows:
        if r["variant"] in decode:
            r["decode_ms_per_step"] = decode[r["variant"]]
    add_ratios(rows)
    if args.out:
        common.write_results(args.out, meta, rows, common.markdown_table(rows, COLUMNS))
    table = common.markdown_table(rows, COLUMNS)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
