"""Host time: what the CPU spends per training step and per operation, where the GPU waits on it.

At the 1B shape a LoRA training step on the H200 is partly bound by the host: the GPU is idle
while the host launches the next kernel (``bench/train_step.py --timeline``). This benchmark
takes the GPU's work out of the picture to measure the host's side alone:

* **steps**: the Llama model of ``--size tiny`` (hidden 64, 16 layers: every kernel takes a few
  microseconds on the GPU) with batch 1 x ``--seq`` 128 tokens, large enough for the same forms
  as the 1B shape (merged W', fused MLP). Host ms of the forward (until it returns, no sync),
  of the backward, and of the whole step (synchronised), for the frozen bound, lorakit and PEFT;
  the medians of rounds that run every variant in turn.
* **ops**: host microseconds per call of the pieces a LoRA layer is built from, from back-to-back
  calls on small tensors (``torch.mm``, a Triton launch through the JIT entry and through
  ``lorakit.kernels.launch.Direct``, an empty ``autograd.Function``, a whole LoRA linear forward
  and backward against ``nn.Linear``'s).

``--profile VARIANTS`` adds torch.profiler's table of one step of each, sorted by host time;
``--cprofile VARIANTS`` Python's cProfile of each variant's forward and backward.
Results: ``--out STEM`` writes STEM.json and STEM.md, and the tables of both options to STEM.profile.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common, train_step  # noqa: E402

TINY = dict(hidden=64, layers=16, inter=256, heads=4, kv=2, vocab=256, tie=False)


def tiny_variant(name: str, args, dtype):
    """(model, optimizer, step, forward_loss) of variant ``name`` on the tiny model, batch 1 x ``args.seq``
    (with ``--size``, that shape's model at batch ``args.batch``)."""
    v = train_step.parse_variant(name)
    shape = TINY if args.size == "tiny" else common.SIZES[args.size]
    model = common.build_llama(shape, args.device, dtype, seed=0)
    ids, labels = common.random_batch(args.batch, args.seq, shape["vocab"], args.device)
    opt = train_step.setup(v, model)
    step, forward_loss = train_step.make_step(v, model, opt, ids, labels)
    return model, opt, step, forward_loss


def step_costs(variants: list[str], args, dtype) -> list[dict]:
    """Host ms per phase for each variant, stepped in turn for ``args.rounds`` rounds."""
    ps = []
    for name in variants:
        model, opt, _, forward_loss = tiny_variant(name, args, dtype)
        ps.append(dict(name=name, fl=forward_loss, opt=opt, model=model, f=[], b=[], o=[], s=[]))

    def one(p):
        common.sync(args.device)
        t0 = time.perf_counter()
        loss = p["fl"]()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if p["opt"] is not None:
            p["opt"].step()
            p["opt"].zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        common.sync(args.device)
        t4 = time.perf_counter()
        for k, t in zip("fbos", (t1 - t0, t2 - t1, t3 - t2, t4 - t0)):
            p[k].append(t * 1e3)

    for p in ps:
        for _ in range(5):
            one(p)
        for k in "fbos":
            p[k].clear()
    for i in range(args.rounds):
        for p in (ps if i % 2 == 0 else ps[::-1]):
            one(p)
    rows = []
    for p in ps:
        med = {k: common.median(p[k]) for k in "fbos"}
        rows.append(dict(kind="step", name=p["name"], forward_ms=med["f"], backward_ms=med["b"],
                         optimizer_ms=med["o"], step_ms=med["s"]))
    bound = next((r for r in rows if r["name"] == "bound"), None)
    for r in rows:
        if bound:
            r["extra_ms"] = r["forward_ms"] + r["backward_ms"] - bound["forward_ms"] - bound["backward_ms"]
    return rows


def _per_call_us(fn, device: str, calls: int) -> float:
    """Median over 5 repeats of host microseconds per call for ``calls`` back-to-back calls."""
    for _ in range(20):
        fn()
    common.sync(device)
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
        common.sync(device)
    return common.median(out)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def op_costs(args, dtype) -> list[dict]:
    import lorakit
    from lorakit import wprime
    dev = args.device
    n, d, r = 128, 64, 16
    x = torch.randn(n, d, device=dev, dtype=dtype)
    w = torch.randn(d, d, device=dev, dtype=dtype)
    A = torch.randn(r, d, device=dev, dtype=dtype)
    B = torch.randn(d, r, device=dev, dtype=dtype)
    out = torch.empty_like(w)
    cases = [("torch.mm (128x64 @ 64x64)", lambda: torch.mm(x, w)),
             ("F.linear", lambda: F.linear(x, w)),
             ("wprime.merged_weight (W', 64x64, r=16)", lambda: wprime.merged_weight(w, B, A, 2.0, out=out))]
    if dev.startswith("cuda"):
        from lorakit import kernels
        mk = kernels.load("merge")
        if mk is not None:
            cases.append(("Triton JIT entry (the W' kernel)", lambda: mk._merge_kernel[(1, 1)](
                w, B, A, out, out, out, d, d, r, 2.0, w.stride(0), B.stride(0), A.stride(0), out.stride(0),
                R=16, BLOCK_D=mk.BLOCK_D, BLOCK_K=mk.BLOCK_K, IEEE=False, STORE_A=False, STORE_B=False,
                num_warps=4)))
    xg = x.clone().requires_grad_(True)
    cases.append(("autograd.Function.apply (identity, forward)", lambda: _Identity.apply(xg)))

    base = torch.nn.Linear(d, d, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    model = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False, device=dev, dtype=dtype))
    model.requires_grad_(False)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=["0"]))
    layer = model[0]
    gy = torch.randn(n, d, device=dev, dtype=dtype)

    def fb(mod):
        def run():
            y = mod(xg)
            y.backward(gy)
        return run

    cases += [("nn.Linear forward + backward (frozen, dX only)", fb(base)),
              ("LoraLinear forward + backward", fb(layer))]
    rows = []
    for name, fn in cases:
        rows.append(dict(kind="op", name=name, host_us=_per_call_us(fn, dev, args.calls)))
        print(f"  {name:<52} {rows[-1]['host_us']:8.1f} us", flush=True)
    return rows


def profile_table(name: str, args, dtype) -> str:
    """torch.profiler's table of one step of variant ``name`` (tiny model), sorted by host time."""
    from torch.profiler import ProfilerActivity, profile
    _, _, step, _ = tiny_variant(name, args, dtype)
    for _ in range(5):
        step()
    common.sync(args.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        step()
        common.sync(args.device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
    return f"== torch.profiler {name}, one step\n" + table


def cprofile_table(name: str, args, dtype, steps: int = 10) -> str:
    """Python's cProfile of ``steps`` forward calls of variant ``name`` and, separately, of their
    backward calls (the device synchronised before each, so that neither waits on the other's
    work): where the host's time goes, by function (own time first, then lorakit's functions by
    cumulative time)."""
    import cProfile
    import io
    import pstats
    _, _, step, forward_loss = tiny_variant(name, args, dtype)
    for _ in range(5):
        step()
    common.sync(args.device)
    fwd, bwd = cProfile.Profile(), cProfile.Profile()
    for _ in range(steps):
        common.sync(args.device)
        fwd.enable()
        loss = forward_loss()
        fwd.disable()
        common.sync(args.device)
        bwd.enable()
        loss.backward()
        bwd.disable()
    common.sync(args.device)
    out = io.StringIO()
    for what, prof in (("forward", fwd), ("backward", bwd)):
        out.write(f"--- {what}\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(40)
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats("lorakit", 40)   # the library's own frames
    return f"== cProfile {name}, {steps} x forward, then backward\n" + out.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default="bound,lorakit,peft-bf16")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--size", default="tiny", choices=["tiny", *sorted(common.SIZES)],
                   help="the model (tiny: GPU work negligible; 1b: the host's time with the real shapes' forms)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--profile", default="", help="comma-separated variants to profile with torch.profiler "
                   "(one step each, sorted by host time)")
    p.add_argument("--cprofile", default="", help="comma-separated variants to run under cProfile (Python's "
                   "view of the host time, e.g. lorakit+compile)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    rows = step_costs(args.variants.split(","), args, dtype)
    for r in rows:
        print(f"{r['name']:<16} forward {r['forward_ms']:7.2f}  backward {r['backward_ms']:7.2f}  "
              f"optimizer {r['optimizer_ms']:6.2f}  step {r['step_ms']:7.2f} ms (host)", flush=True)
    rows += op_costs(args, dtype)
    texts = [profile_table(name, args, dtype) for name in filter(None, args.profile.split(","))]
    texts += [cprofile_table(name, args, dtype) for name in filter(None, args.cprofile.split(","))]
    for text in texts:
        print(text)
    if texts and args.out:
        with open(args.out + ".profile.txt", "w") as f:
            f.write("\n\n".join(texts))
    meta = common.env_info(args.device)
    meta.update(title=f"Host time per step and per operation, {args.device}", seq=args.seq, rounds=args.rounds,
                setup=("Llama shape hidden 64, 16 layers, MLP 256 (GPU work negligible)" if args.size == "tiny"
                       else f"Llama shape {args.size}") + f", batch {args.batch} x {args.seq}, "
                      f"{str(dtype).replace('torch.', '')}, LoRA r=16 on the 7 projections; medians of "
                      f"{args.rounds} rounds (steps) and of 5 x {args.calls} back-to-back calls (ops).")
    cols = [("name", "what", ""), ("forward_ms", "forward ms", "{:.2f}"), ("backward_ms", "backward ms", "{:.2f}"),
            ("optimizer_ms", "optimizer ms", "{:.2f}"), ("step_ms", "step ms (synced)", "{:.2f}"),
            ("extra_ms", "fwd+bwd over bound ms", "{:.2f}"), ("host_us", "host us per call", "{:.1f}")]
    table = common.markdown_table(rows, cols)
    print("\n" + table)
    if args.out:
        common.write_results(args.out, meta, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
