"""Training-step benchmark: lorakit vs PEFT vs the frozen-base bound, side by side in one process.

Every variant runs the same model shape, the same random batch and the same loop::

    h    = model.model(ids).last_hidden_state          # decoder, (batch, seq, hidden)
    loss = CE(h @ W_head^T, labels)                    # logits upcast to float32, as transformers does
    loss.backward(); opt.step(); opt.zero_grad()       # AdamW over whatever trains

Variants (``--variants``, comma separated; ``@r64`` picks the rank):

    bound            every parameter frozen, gradients for activations only (the LoRA bound)
    full             full fine-tuning, AdamW over every parameter
    peft             PEFT LoRA, its defaults (float32 adapters on a bfloat16 base)
    peft-bf16        PEFT LoRA with adapters in the base dtype (autocast_adapter_dtype=False)
    lorakit          lorakit.inject, adapters in the base dtype (the default)
    lorakit-fp32     lorakit with adapter_dtype="float32"
    lorakit-unfused  lorakit with the gated MLPs unfused (lorakit.fused.detach): three LoRA linears each
    lorakit+fused-loss   lorakit with lorakit.loss.linear_cross_entropy (logits never materialised)
    X+ungrouped      lorakit X with q, k and v as three nodes (lorakit.grouped.detach), not one
    X+merged-mlp     lorakit X with the fused MLP's four GEMM sites all in the merged form
                     (lorakit.fused.mlp_forms overridden during its steps only)
    X+gemm-terms     lorakit X with the fused MLP's LoRA terms written by GEMMs before the big GEMMs
                     accumulate onto them (lorakit.fused.KERNEL_TERMS off), not added in the SwiGLU kernels
    X+gemm-reduce    X+gemm-terms, and the fused MLP's backward as the plain SwiGLU kernel (h written) and
                     cuBLAS for dAd, dBg, dBu, not one kernel (lorakit.activation.swiglu_backward_reduce_unfused)
    X+gu-beside      lorakit X with the fused MLP's gate|up backward beside W0 (its dA's gs a GEMM of its
                     own that reads [dg | du]), the other sites as lorakit.fused.mlp_forms picks them
    X+xa-apart       lorakit X with x A^T as a GEMM of its own in the merged forward of o_proj and of
                     q/k/v (lorakit.ops.XA_IN_GEMM off): the path before session 11
    X+dh-plain       lorakit X with the SwiGLU backward that adds dh's term alone in its own layout
                     (lorakit.kernels.swiglu.DH_VIA_GU off): the 1B shape's path before session 10
    X+fuse-all       lorakit X with the fused MLP node at every input size (lorakit.fused.fused_is_cheaper
                     overridden during its steps only)
    X+foreach        X with torch's default AdamW (foreach) instead of the fused AdamW with the lean
                     step that ``lorakit train`` uses (lorakit.train.optim; every other variant, PEFT's included)
    X+torch-fused    X with torch's own fused AdamW (its step walks every parameter in Python)
    X+compile        X with every decoder layer and the loss compiled (torch.compile, regional:
                     the 16 identical layers share one compiled graph). lorakit runs there as its
                     opaque operators (lorakit.compiled)

Columns: tokens/s and step ms (median), x bound (the eager bound; compiled variants: the
compiled bound), x PEFT (same rank and mode), peak GiB (CUDA), saved MiB (what autograd keeps
for backward, weights excluded; eager only), host fwd / bwd ms (how long the forward and the
backward took to *return* on the host, no synchronisation: on a GPU, when their sum nears the
step time the host, not the GPU, sets the pace; ``--timeline`` shows where the GPU waits),
spread ((max - min) / median). The JSON also has the process CPU time per step (on CPU the
compute itself; on CUDA the host spin-waits in synchronize).

Usage::

    PYTHONPATH=. python bench/train_step.py --device cpu            # SmolLM2-135M widths, 16 layers
    PYTHONPATH=. python bench/train_step.py --device cuda --size 1b  # the H200 anchor shape
    PYTHONPATH=. python bench/train_step.py --device cuda --size 8b --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common, timeline  # noqa: E402

CPU_VARIANTS = "bound,full,peft,lorakit,lorakit+fused-loss"
GPU_VARIANTS = ("bound,full,peft,peft-bf16,lorakit,lorakit-fp32,lorakit+fused-loss,peft@r64,peft-bf16@r64,lorakit@r64,"
                "bound+compile,peft+compile,lorakit+compile")


def parse_variant(spec: str) -> dict:
    """'peft-bf16@r64+compile' -> {kind: peft, bf16: True, r: 64, compile: True, fused_loss: False, fp32: False}."""
    name = spec.strip()
    compile_ = "+compile" in name
    fused = "+fused-loss" in name
    foreach = "+foreach" in name
    torch_fused = "+torch-fused" in name
    ungrouped = "+ungrouped" in name
    merged_mlp = "+merged-mlp" in name
    gu_beside = "+gu-beside" in name
    dh_plain = "+dh-plain" in name
    xa_apart = "+xa-apart" in name
    fuse_all = "+fuse-all" in name
    gemm_reduce = "+gemm-reduce" in name
    gemm_terms = "+gemm-terms" in name or gemm_reduce
    base = name
    for mod in ("+compile", "+fused-loss", "+foreach", "+torch-fused", "+ungrouped", "+merged-mlp", "+gu-beside",
                "+dh-plain", "+xa-apart", "+fuse-all", "+gemm-reduce", "+gemm-terms"):
        base = base.replace(mod, "")
    r = 16
    if "@r" in base:
        base, rs = base.split("@r")
        r = int(rs)
    kind = base.split("-")[0]
    if kind not in ("bound", "full", "peft", "lorakit"):
        raise SystemExit(f"unknown variant {spec!r}")
    return dict(name=name, kind=kind, r=r, compile=compile_, fused_loss=fused, foreach=foreach, torch_fused=torch_fused,
                ungrouped=ungrouped,
                merged_mlp=merged_mlp, gu_beside=gu_beside, dh_plain=dh_plain, xa_apart=xa_apart, fuse_all=fuse_all, gemm_reduce=gemm_reduce, gemm_terms=gemm_terms,
                bf16=base == "peft-bf16", fp32=base == "lorakit-fp32", unfused=base == "lorakit-unfused")


def standard_loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy with full logits, upcast to float32 (transformers' ForCausalLMLoss)."""
    logits = F.linear(h, w).float()                                   # (B, T, V) float32
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def fused_loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from lorakit.loss import linear_cross_entropy
    return linear_cross_entropy(h, w, labels)


def adamw(v: dict, params) -> torch.optim.AdamW:
    """AdamW as ``lorakit train`` makes it (lorakit.train.loop.adamw: torch's fused kernel with
    lorakit's lean step), for every variant alike; ``+foreach`` picks torch's default
    implementation instead, ``+torch-fused`` torch's fused AdamW with its own step."""
    from lorakit.train.loop import adamw as lorakit_adamw
    params = list(params)
    if v["foreach"]:
        return torch.optim.AdamW(params, lr=1e-4)
    if v["torch_fused"]:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    return lorakit_adamw(params, lr=1e-4)


def setup(v: dict, model):
    """Freeze / inject per variant; returns the optimizer (None for the bound)."""
    if v["kind"] == "bound":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return None
    if v["kind"] == "full":
        return adamw(v, model.parameters())
    if v["kind"] == "peft":
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=v["r"], lora_alpha=2 * v["r"], lora_dropout=0.0, target_modules=common.TARGETS7)
        pm = get_peft_model(model, cfg, autocast_adapter_dtype=not v["bf16"])
        return adamw(v, [p for p in pm.parameters() if p.requires_grad])
    import lorakit
    cfg = lorakit.LoraConfig(r=v["r"], alpha=2 * v["r"], target_modules=common.TARGETS7,
                             adapter_dtype="float32" if v["fp32"] else "auto")
    lorakit.inject(model, cfg)
    from lorakit import fused, grouped
    if v["unfused"]:
        fused.detach(model)
    if v["ungrouped"]:
        grouped.detach(model)
    return adamw(v, [p for p in model.parameters() if p.requires_grad])


def make_step(v: dict, model, opt, ids, labels):
    """(step, forward_loss): one full training step, and the forward + loss alone."""
    backbone, head_w = model.model, model.lm_head.weight
    loss_fn = fused_loss if v["fused_loss"] else standard_loss
    if v["compile"]:
        for layer in backbone.layers:
            layer.compile()
        if not v["fused_loss"]:             # the fused loss is a chunked loop: it stays eager
            loss_fn = torch.compile(loss_fn)

    def forward_loss():
        return loss_fn(backbone(input_ids=ids).last_hidden_state, head_w, labels)

    host = []                                       # per step: host seconds of forward, backward, optimizer
    from lorakit import fused
    overrides = []                                  # (module, name, value) replaced during this variant's steps
    if v.get("merged_mlp"):
        overrides.append((fused, "mlp_forms", lambda *a, **k: (True,) * 4))
    if v.get("gu_beside"):
        forms = fused.mlp_forms
        overrides.append((fused, "mlp_forms", lambda *a, **k: forms(*a, **k)[:3] + (False,)))
    if v.get("xa_apart"):
        from lorakit import ops
        overrides.append((ops, "XA_IN_GEMM", False))
    if overrides and v["compile"]:
        # torch.compile's caches key a graph on its code, not on what the overrides change (dX's
        # layout, which the operators' fake kernels state): this variant compiles without them
        torch._functorch.config.enable_autograd_cache = False
        torch._inductor.config.fx_graph_cache = False
    if v.get("fuse_all"):
        overrides.append((fused, "fused_is_cheaper", lambda *a: True))
    if v.get("gemm_terms"):
        overrides.append((fused, "KERNEL_TERMS", False))
    if v.get("gemm_reduce"):
        from lorakit import activation

        def unfused(dh, gu, gd, sd, rg, sg, su, db, *terms, want_ad=True):
            return activation.swiglu_backward_reduce_unfused(dh, gu, gd if want_ad else None, sd, rg, sg, su, db)
        overrides.append((fused, "swiglu_backward_reduce", unfused))
    if v.get("dh_plain"):
        from lorakit import kernels
        swiglu = kernels.load("swiglu")
        if swiglu is not None:                      # (no Triton: nothing to switch)
            overrides.append((swiglu, "DH_VIA_GU", False))

    def overridden(fn):
        def run():
            saved = [(mod, name, getattr(mod, name)) for mod, name, _ in overrides]
            for mod, name, value in overrides:
                setattr(mod, name, value)
            try:
                return fn()
            finally:
                for mod, name, value in reversed(saved):
                    setattr(mod, name, value)
        return run if overrides else fn

    def _step():
        t0 = time.perf_counter()
        with record_function("phase:forward"):       # (three ranges per step: bench/timeline.py reads them)
            loss = forward_loss()
        t1 = time.perf_counter()
        with record_function("phase:backward"):
            loss.backward()
        t2 = time.perf_counter()
        if opt is not None:
            with record_function("phase:optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        host.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        return loss

    step = overridden(_step)
    step.host = host

    return step, overridden(forward_loss)


def prepare(v: dict, args, dtype) -> dict:
    """Build the model, inject/freeze per variant, and measure the bytes saved for backward."""
    model = common.build_llama(args.size, args.device, dtype, seed=0, layers=args.layers)
    ids, labels = common.random_batch(args.batch, args.seq, model.config.vocab_size, args.device)
    opt = setup(v, model)
    step, forward_loss = make_step(v, model, opt, ids, labels)
    saved = None if v["compile"] else common.saved_bytes(forward_loss, model) / 2**20
    return dict(v=v, model=model, opt=opt, step=step, saved=saved, times=[], cpu_times=[])


def result_row(p: dict, args) -> dict:
    v, times = p["v"], p["times"]
    med = common.median(times)
    host = p["step"].host[-len(times):] if times else []      # the timed steps' (the last ones)
    hf, hb = (common.median([h[i] for h in host]) * 1e3 if host else None for i in (0, 1))
    return dict(host_fwd_ms=hf, host_bwd_ms=hb,variant=v["name"], r=v["r"] if v["kind"] in ("peft", "lorakit") else None,
                step_ms=med * 1e3, tokens_per_s=args.batch * args.seq / med,
                cpu_step_ms=common.median(p["cpu_times"]) * 1e3 if p["cpu_times"] else None,
                peak_gib=p.get("peak"), saved_mib=p["saved"], spread=(max(times) - min(times)) / med)


def profile_step(p: dict, args) -> str:
    """The top kernels of one step (torch.profiler), as a text table."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        p["step"]()
        common.sync(args.device)
    key = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    text = f"== {p['v']['name']}\n" + prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=60)
    return text + ("\n" + kernel_table(prof) if args.device.startswith("cuda") else "")


def kernel_table(prof, rows: int = 60) -> str:
    """The step's GPU kernels alone, by total time: us, launches, us per launch, full name (cut
    at 110 characters), and the total: what separates two variants' GPU work, kernel by kernel."""
    kern = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kern.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kern)
    lines = [f"kernels: {total / 1e3:.2f} ms in {sum(e.count for e in kern)} launches",
             f"{'us':>9} {'calls':>6} {'us/call':>8}  name"]
    for e in kern[:rows]:
        lines.append(f"{e.self_device_time_total:9.1f} {e.count:6d} {e.self_device_time_total / e.count:8.1f}  "
                     f"{e.key[:110]}")
    return "\n".join(lines)


def timeline_step(p: dict, args) -> str:
    """Where one step's GPU waits (bench/timeline.py): a profiled step after the timed ones."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        common.sync(args.device)
        p["step"]()
        common.sync(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return timeline.report(timeline.analyze(json.load(f)), p["v"]["name"])


def run_sequential(v: dict, args, dtype) -> dict:
    """One variant alone on the device (GPU: its peak memory is its own)."""
    common.reset_peak(args.device)
    if v["compile"]:
        torch._dynamo.reset()           # compiled afresh: the graphs of another variant's forms (dX's layout) never serve it
    p = prepare(v, args, dtype)
    common.reset_peak(args.device)
    p["times"] = common.time_steps(p["step"], args.device, args.warmup, args.steps, p["cpu_times"])
    p["peak"] = common.peak_gib(args.device)
    row = result_row(p, args)
    if v["name"] in args.profile and args.out:
        with open(args.out + ".profile.txt", "a") as f:
            f.write(profile_step(p, args) + "\n\n")
    if v["name"] in args.timeline:
        text = timeline_step(p, args)
        print(text, flush=True)
        if args.out:
            with open(args.out + ".timeline.txt", "a") as f:
                f.write(text + "\n\n")
    p.clear()
    common.free()
    return row


def run_interleaved(specs: list[dict], args, dtype) -> list[dict]:
    """CPU: all variants built at once and stepped in turn, one step each per round, so that
    load from other processes on a shared machine falls on every variant alike."""
    import time
    ps = [prepare(v, args, dtype) for v in specs]
    for p in ps:
        for _ in range(args.warmup):
            p["step"]()
    for i in range(args.steps):
        for p in (ps if i % 2 == 0 else ps[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            p["step"]()
            p["times"].append(time.perf_counter() - t0)
            p["cpu_times"].append(time.process_time() - c0)
        print(f"round {i + 1}/{args.steps}", flush=True)
    return [result_row(p, args) for p in ps]


def add_ratios(rows: list[dict]) -> None:
    """x bound (eager bound; compiled variants also vs the compiled bound) and x PEFT (same rank, same mode)."""
    by = {r["variant"]: r for r in rows}

    def tps(name):
        return by[name]["tokens_per_s"] if name in by else None

    for r in rows:
        comp = "+compile" in r["variant"]
        bound = tps("bound+compile" if comp else "bound")
        r["x_bound"] = r["tokens_per_s"] / bound if bound else None
        rb = by.get("bound+compile" if comp else "bound")
        if rb and rb.get("peak_gib") and r.get("peak_gib"):
            r["mem_x_bound"] = r["peak_gib"] / rb["peak_gib"]
        suffix = "" if r["r"] in (None, 16) else f"@r{r['r']}"
        peft = tps("peft" + suffix + ("+compile" if comp else ""))
        r["x_peft"] = r["tokens_per_s"] / peft if peft and r["r"] is not None else None
        peft16 = tps("peft-bf16" + suffix)
        r["x_peft_bf16"] = r["tokens_per_s"] / peft16 if peft16 and r["r"] is not None and not comp else None


COLUMNS = [("variant", "variant", ""), ("tokens_per_s", "tokens/s", "{:,.0f}"), ("step_ms", "step ms", "{:.1f}"),
           ("x_bound", "x bound", "{:.3f}"), ("x_peft", "x PEFT", "{:.2f}"), ("x_peft_bf16", "x PEFT-bf16", "{:.2f}"),
           ("peak_gib", "peak GiB", "{:.2f}"), ("mem_x_bound", "mem x bound", "{:.3f}"),
           ("saved_mib", "saved MiB", "{:,.0f}"), ("host_fwd_ms", "host fwd ms", "{:.1f}"),
           ("host_bwd_ms", "host bwd ms", "{:.1f}"),
           ("spread", "spread", "{:.0%}")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default=None, choices=sorted(common.SIZES), help="default: smol on cpu, 1b on cuda")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--variants", default=None)
    p.add_argument("--sequential", action="store_true", help="cpu: one variant after another, not interleaved")
    p.add_argument("--profile", default="", help="comma-separated variants to profile one step of (STEM.profile.txt)")
    p.add_argument("--timeline", default="", help="comma-separated variants whose GPU idle time to report "
                   "per phase (STEM.timeline.txt, bench/timeline.py)")
    p.add_argument("--out", default=None, help="result stem (writes STEM.json and STEM.md)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.size = args.size or ("smol" if cpu else "1b")
    args.batch = args.batch or (4 if cpu else 8)
    args.seq = args.seq or (128 if cpu else 1024)
    args.warmup = args.warmup if args.warmup is not None else (3 if cpu else 5)
    if cpu:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.float32 if cpu else torch.bfloat16
    args.profile = [x for x in args.profile.split(",") if x]
    args.timeline = [x for x in args.timeline.split(",") if x]
    for ext in (".profile.txt", ".timeline.txt"):
        if args.out and os.path.exists(args.out + ext):
            os.remove(args.out + ext)
    specs = [parse_variant(s) for s in (args.variants or (CPU_VARIANTS if cpu else GPU_VARIANTS)).split(",")]
    meta = common.env_info(args.device)
    s = common.SIZES[args.size]
    meta.update(title=f"Training step, {args.size} shape, {args.device}", size=args.size, batch=args.batch,
                seq=args.seq, steps=args.steps, warmup=args.warmup, dtype=str(dtype),
                setup=(f"Llama shape `{args.size}` (hidden {s['hidden']}, {args.layers or s['layers']} layers, "
                       f"MLP {s['inter']}, {s['heads']} heads, {s['kv']} KV heads, vocab {s['vocab']}, "
                       f"{'tied' if s['tie'] else 'untied'} head), {str(dtype).replace('torch.', '')}, batch "
                       f"{args.batch} x {args.seq} tokens, LoRA alpha = 2r on {', '.join(common.TARGETS7)}, "
                       f"dropout 0, AdamW (torch's fused kernel with lorakit's lean step, as lorakit train makes it; "
                       f"+foreach: torch's default, +torch-fused: torch's fused step); median of {args.steps} steps after {args.warmup} warm-up steps."))
    if cpu and not args.sequential:
        rows = run_interleaved(specs, args, dtype)
    else:
        rows = []
        for v in specs:
            try:
                rows.append(run_sequential(v, args, dtype))
            except Exception as e:  # noqa: BLE001 - a variant that fails (OOM, compile) is reported, not fatal
                import traceback
                traceback.print_exc()
                rows.append(dict(variant=v["name"], r=v["r"], error=f"{type(e).__name__}: {str(e)[:160]}",
                                 tokens_per_s=0.0))
                common.free()
            print(f"{rows[-1]['variant']:<32} {rows[-1]['tokens_per_s']:>12,.0f} tok/s  "
                  f"peak {rows[-1].get('peak_gib') or 0:6.2f} GiB", flush=True)
            finish(rows, meta, args, quiet=True)          # partial results survive a killed run
    finish(rows, meta, args)
    return 0


def finish(rows: list[dict], meta: dict, args, quiet: bool = False) -> None:
    add_ratios([r for r in rows if "error" not in r])
    table = common.markdown_table(rows, COLUMNS)
    if not quiet:
        print("\n" + table)
    if args.out:
        common.write_results(args.out, meta, rows, table)

if __name__ == "__main__":
    raise SystemExit(main())
