"""Many adapters on one base: per-row mixed batches, lorakit vs PEFT, side by side in one process.

Model: Llama-shaped, random weights, bfloat16, built on the GPU (hidden 2048, 16 layers, MLP
8192, 32 heads, 8 KV heads, vocabulary 128256, untied head: the 1B shape of issue 5).
Adapters: rank 16, alpha 32, on q, k, v, o, gate, up, down, B random (never zeros).

Measured (inference, torch.inference_mode):

    prefill   model(ids) on a batch of 32 x 512 random tokens, full logits       -> tokens/s
    decode    32 steps of one token per row after that prefill, with the KV cache -> ms/step

for: the base model; lorakit with one adapter (set_adapter); lorakit mixed batches where row i
of batch j uses adapter (32 j + i) mod K of K = 8, 32, 128 loaded adapters (entering
batch_adapters is inside the timed region, once per batch); lorakit mixed K=32 with the torch
path instead of the Triton kernels; PEFT with one adapter and with ``adapter_names`` mixed
batches of K = 8 and 32 (32 adapters loaded, PEFT's defaults: float32 adapter weights). Also
the cost of set_adapter (lorakit with 128 adapters loaded; PEFT with 32 and with 8), of
entering batch_adapters, and of loading a rank-16 adapter from disk (warm page cache).

Usage::

    PYTHONPATH=. python bench/multi_adapter.py --out bench/results           # H200
    PYTHONPATH=. python bench/multi_adapter.py --size tiny --device cpu      # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lorakit  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "1b": dict(hidden=2048, layers=16, inter=8192, heads=32, kv=8, vocab=128256, batch=32, seq=512, steps=32,
               ks=(8, 32, 128), iters=7, warmup=2),
    "tiny": dict(hidden=64, layers=2, inter=128, heads=4, kv=2, vocab=256, batch=8, seq=16, steps=4,
                 ks=(2, 8, 16), iters=2, warmup=1),
}


def build(size: dict, device: str, dtype: torch.dtype):
    """The benchmark's Llama (random weights, untied head, KV cache on for decoding), in eval mode."""
    from common import build_llama      # bench/common.py (this script's folder is on sys.path)
    return build_llama(size, device, dtype, seed=0, use_cache=True).eval()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, iters) -> list[float]:
    """Seconds of each of ``iters`` synchronised calls of fn(i) after ``warmup`` calls."""
    for i in range(warmup):
        fn(i)
    sync(device)
    out = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(warmup + i)
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def randomize_b(params, seed=0):
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02, generator=g)


# ---------------------------------------------------------------------------- one variant
def measure(model, size, device, ids, run, enter=None, steps=None):
    """Prefill tokens/s and decode ms/step of ``run(i, ids, past)``; ``enter(i)`` gives the
    context (a batch_adapters block) for batch i, entered inside the timed region."""
    import contextlib
    enter = enter or (lambda i: contextlib.nullcontext())
    B, T = ids.shape
    steps = steps or size["steps"]

    def prefill(i):
        with enter(i):
            run(ids, None)

    t_pre = timed(prefill, device, size["warmup"], size["iters"])

    nxt = ids[:, -1:].clone()
    state = {}

    def decode(i):
        with enter(i):
            out = run(ids, "new")
            past = out.past_key_values
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                out = run(nxt, past)
                past = out.past_key_values
            sync(device)
            state.setdefault("t", []).append((time.perf_counter() - t0) / steps)

    timed(decode, device, 1, max(2, size["iters"] // 3))
    t_dec = state["t"][1:]
    med_pre, med_dec = statistics.median(t_pre), statistics.median(t_dec)
    return dict(prefill_tok_s=B * T / med_pre, prefill_ms=med_pre * 1e3, decode_ms_step=med_dec * 1e3,
                decode_tok_s=B / med_dec, prefill_times=t_pre, decode_times=t_dec)


def hf_run(model, **extra):
    def run(x, past):
        if past is None:
            return model(input_ids=x, use_cache=False, **extra)
        if past == "new":
            return model(input_ids=x, use_cache=True, **extra)
        return model(input_ids=x, past_key_values=past, use_cache=True, **extra)
    return run


def mixed_names(K, B, i):
    return [f"a{(B * i + r) % K}" for r in range(B)]


# ---------------------------------------------------------------------------- the run
def run_lorakit(model, size, device, ids, results, only_load=False, kmax=None):
    kmax = kmax or max(size["ks"])
    t0 = time.perf_counter()
    cfg = lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS)
    lorakit.inject(model, cfg, name="a0")
    randomize_b([p for n, p in model.named_parameters() if "lora_B" in n])
    load_times(model, results, device, "1_loaded")
    for k in range(1, kmax):
        lorakit.inject(model, cfg, name=f"a{k}")
    for p in model.parameters():
        p.requires_grad_(False)
    randomize_b([p for n, p in model.named_parameters() if "lora_B" in n])
    sync(device)
    results["lorakit_setup_s"] = time.perf_counter() - t0
    if not only_load:
        with torch.inference_mode():
            measure_lorakit(model, size, device, ids, results)
    if kmax > 1:
        load_times(model, results, device, f"{kmax}_loaded")
    lorakit.unload(model)


def measure_lorakit(model, size, device, ids, results):
    B = ids.shape[0]
    kmax = max(size["ks"])
    run = hf_run(model)

    with lorakit.disable_adapters(model):
        results["variants"]["base"] = measure(model, size, device, ids, run)
    lorakit.set_adapter(model, "a0")
    results["variants"]["lorakit one adapter"] = measure(model, size, device, ids, run)
    for K in size["ks"]:
        results["variants"][f"lorakit mixed K={K}"] = measure(
            model, size, device, ids, run, enter=lambda i, K=K: lorakit.batch_adapters(model, mixed_names(K, B, i)))
    K = size["ks"][1]
    results["variants"][f"lorakit mixed K={K}, torch path"] = measure(
        model, size, device, ids, run,
        enter=lambda i: lorakit.batch_adapters(model, mixed_names(K, B, i), backend="torch"))

    names = [f"a{k}" for k in range(kmax)]
    results["lorakit_set_adapter_ms"] = 1e3 * statistics.median(
        timed(lambda i: lorakit.set_adapter(model, names[i % kmax]), device, 10, 200))
    for K in size["ks"]:
        def enter(i, K=K):
            with lorakit.batch_adapters(model, mixed_names(K, B, i)):
                pass
        results[f"lorakit_enter_batch_ms_K{K}"] = 1e3 * statistics.median(timed(enter, device, 2, 20))


def load_times(model, results, device, label):
    """Median time of load_adapter for a saved rank-16 adapter (onto the GPU, and device="cpu")
    into ``model`` as it is (``label`` says how many adapters it already holds)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = lorakit.save_adapter(model, os.path.join(tmp, "a0"), name="a0")
        results["adapter_file_MiB"] = os.path.getsize(os.path.join(path, "adapter_model.safetensors")) / 2**20
        for dev, key in ((None, "lorakit_load_ms"), ("cpu", "lorakit_load_host_ms")):
            def load(i, dev=dev):
                with torch.no_grad():
                    lorakit.load_adapter(model, path, name=f"load{i}", device=dev)
            results[f"{key}_{label}"] = 1e3 * statistics.median(timed(load, device, 1, 5))
            for n in [n for n in lorakit.adapter_names(model) if n.startswith("load")]:
                lorakit.delete_adapter(model, n)


def run_peft(model, size, device, ids, results):
    from peft import LoraConfig, get_peft_model
    t0 = time.perf_counter()
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    pm = get_peft_model(model, cfg, adapter_name="a0").eval()
    kmax = 32 if size["vocab"] > 1000 else size["ks"][1]
    for k in range(1, kmax):
        pm.add_adapter(f"a{k}", cfg)
    for p in pm.parameters():
        p.requires_grad_(False)
    randomize_b([p for n, p in pm.named_parameters() if "lora_B" in n])
    sync(device)
    results["peft_setup_s"] = time.perf_counter() - t0
    results["peft_adapter_dtype"] = str(next(p for n, p in pm.named_parameters() if "lora_A" in n).dtype)
    with torch.inference_mode():
        measure_peft(pm, size, device, ids, results, kmax)


def measure_peft(pm, size, device, ids, results, kmax):
    B = ids.shape[0]
    pm.set_adapter("a0")
    results["variants"]["PEFT one adapter"] = measure(pm, size, device, ids, hf_run(pm))
    for K in size["ks"][:2]:
        run = hf_run(pm, adapter_names=mixed_names(K, B, 0))
        results["variants"][f"PEFT adapter_names mixed K={K}"] = measure(pm, size, device, ids, run)
    names = [f"a{k}" for k in range(kmax)]
    results[f"peft_set_adapter_ms_{kmax}_loaded"] = 1e3 * statistics.median(
        timed(lambda i: pm.set_adapter(names[i % kmax]), device, 2, 20))
    for n in names[8:]:
        pm.delete_adapter(n)
    results["peft_set_adapter_ms_8_loaded"] = 1e3 * statistics.median(
        timed(lambda i: pm.set_adapter(names[i % 8]), device, 2, 20))


def env(device) -> dict:
    import transformers
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version())
    try:
        import peft
        info["peft"] = peft.__version__
    except ImportError:
        pass
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(results) -> str:
    v = results["variants"]
    single = v["lorakit one adapter"]
    lines = ["| variant | prefill tok/s | x base time | x lorakit single | decode ms/step | decode tok/s |",
             "|---|---|---|---|---|---|"]
    base = v["base"]
    for name, r in v.items():
        lines.append(f"| {name} | {r['prefill_tok_s'] / 1e3:.1f}k | {base['prefill_tok_s'] / r['prefill_tok_s']:.2f} | "
                     f"{single['prefill_tok_s'] / r['prefill_tok_s']:.2f} | {r['decode_ms_step']:.2f} | "
                     f"{r['decode_tok_s'] / 1e3:.2f}k |")
    return "\n".join(lines)


def checks(results, ks) -> list[str]:
    v = results["variants"]
    single = v["lorakit one adapter"]["prefill_ms"]
    k1, kmax = ks[1], ks[-1]
    out = []

    def line(what, value, ok):
        out.append(f"- {what}: {value} -> {'PASS' if ok else 'MISS'}")
    r = v[f"lorakit mixed K={k1}"]["prefill_ms"] / single
    line(f"lorakit mixed K={k1} prefill time / lorakit single (<= 1.2)", f"{r:.3f}", r <= 1.2)
    r = v[f"lorakit mixed K={kmax}"]["prefill_ms"] / single
    line(f"lorakit mixed K={kmax} prefill time / lorakit single (<= 1.3)", f"{r:.3f}", r <= 1.3)
    key = f"PEFT adapter_names mixed K={k1}"
    if key in v:
        r = v[key]["prefill_ms"] / v[f"lorakit mixed K={k1}"]["prefill_ms"]
        line(f"PEFT mixed K={k1} prefill time / lorakit mixed K={k1} (>= 5)", f"{r:.2f}", r >= 5)
    line("lorakit set_adapter (< 1 ms)", f"{results['lorakit_set_adapter_ms']:.4f} ms",
         results["lorakit_set_adapter_ms"] < 1)
    for key in [k for k in results if k.startswith("lorakit_load_ms_")]:
        line(f"lorakit load rank-16 adapter from disk, {key[16:].replace('_', ' ')} (< 50 ms)",
             f"{results[key]:.1f} ms", results[key] < 50)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--only-load", action="store_true", help="measure adapter load times only")
    ap.add_argument("--loaded", type=int, default=None,
                    help="with --only-load: also time loads with this many adapters loaded (default: the largest K; "
                         "1: only the first); e.g. --device cpu --dtype bfloat16 --only-load --loaded 1 on a laptop")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="model and adapter dtype (default: bfloat16 on cuda, float32 on cpu)")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if args.device == "cuda" else torch.float32
    results = dict(env=env(args.device), size=args.size, shape={k: size[k] for k in ("hidden", "layers", "inter",
                   "heads", "kv", "vocab")}, batch=size["batch"], seq=size["seq"], decode_steps=size["steps"],
                   rank=16, alpha=32, targets=TARGETS, dtype=str(dtype), variants={})
    model = build(size, args.device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, size["vocab"], (size["batch"], size["seq"]), generator=g).to(args.device)
    run_lorakit(model, size, args.device, ids, results, only_load=args.only_load,
                kmax=args.loaded if args.only_load else None)
    gc.collect()
    if args.only_load:
        name = "multi_adapter_load" if args.size == "1b" else f"multi_adapter_load_{args.size}"
        name += "" if args.device == "cuda" else f"_{args.device}"       # never overwrite the GPU results
        lines = [f"- {k}: {v:.4g}" for k, v in results.items() if isinstance(v, float)]
        text = f"# Adapter load times ({results['env'].get('gpu', args.device)}, {args.size} shape)\n\n" \
               f"{results['env']}\n\n" + "\n".join(lines) + "\n"
        write(args.out, name, results, text)
        return 0
    if not args.no_peft:
        run_peft(model, size, args.device, ids, results)
    md = [f"# Multi-adapter benchmark ({results['env'].get('gpu', args.device)}, {args.size} shape)", "",
          f"{results['env']}", "",
          f"batch {size['batch']} x {size['seq']} prefill (full logits), {size['steps']} decode steps; rank 16 "
          f"adapters on {', '.join(TARGETS)}; {dtype}; medians. PEFT: its defaults "
          f"({results.get('peft_adapter_dtype', '?')} adapter weights), 32 adapters loaded.", "",
          table(results), "",
          *[f"- {k}: {v:.4g}" for k, v in results.items() if isinstance(v, float)], "", "Targets:",
          *checks(results, size["ks"])]
    text = "\n".join(md) + "\n"
    write(args.out, "multi_adapter" if args.size == "1b" else f"multi_adapter_{args.size}", results, text)
    return 0


def write(out: str, name: str, results: dict, text: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, name + ".md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
