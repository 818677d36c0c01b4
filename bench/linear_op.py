"""One LoRA linear layer, forward + backward, every implementation side by side (the profile
behind bench/train_step.py: where a training step's LoRA overhead goes, projection by projection).

For each of the 7 projections of a decoder layer (q, k, v, o, gate, up, down) at N tokens::

    bound      y = x W0^T, backward dX = dY W0 only (every parameter frozen)
    reference  lorakit.ops.lora_linear_reference (plain autograd: what PEFT does, adapters in the base dtype)
    unmerged   lorakit.ops.lora_linear(mode="unmerged")
    merged     lorakit.ops.lora_linear(mode="merged")
    auto       lorakit.ops.lora_linear (the default: merged_is_cheaper decides)

Prints milliseconds per forward + backward and the ratio to the bound, per projection and
summed over the layer. ``--no-grad`` times the forward alone under torch.no_grad (inference).

    PYTHONPATH=. python bench/linear_op.py --device cpu --size smol --tokens 512
    PYTHONPATH=. python bench/linear_op.py --device cuda --size 1b --tokens 8192
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402
from lorakit import ops  # noqa: E402


def projections(size: str) -> list[tuple[str, int, int]]:
    """(name, d, k) of each adapted projection of one decoder layer."""
    s = common.SIZES[size]
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv"]
    return [("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h), ("gate", s["inter"], h),
            ("up", s["inter"], h), ("down", h, s["inter"])]


def impls(r: int):
    def bound(x, w, A, B):
        return F.linear(x, w)

    def ref(x, w, A, B):
        return ops.lora_linear_reference(x, w, None, A, B, 2.0)

    def mode(m):
        return lambda x, w, A, B: ops.lora_linear(x, w, None, A, B, 2.0, mode=m)

    return {"bound": bound, "reference": ref, "unmerged": mode("unmerged"), "merged": mode("merged"),
            "auto": mode("auto")}


def _clock(device: str):
    """(start, stop) -> seconds: CUDA events on GPU, process CPU time on CPU (robust to other load)."""
    if device.startswith("cuda"):
        def start():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        def stop(e):
            f = torch.cuda.Event(enable_timing=True)
            f.record()
            f.synchronize()
            return e.elapsed_time(f) / 1e3
        return start, stop
    return time.process_time, lambda t0: time.process_time() - t0


def time_interleaved(steps: dict, device: str, reps: int) -> dict:
    """{name: (median s, min s)}: the steps run in turn, one call each per round, after warm-up."""
    start, stop = _clock(device)
    for f in steps.values():
        for _ in range(3):
            f()
    def timed(f):
        def measure():
            t0 = start()
            f()
            return stop(t0)
        return measure

    ts = common.interleaved({n: timed(f) for n, f in steps.items()}, reps)
    return {n: (common.median(v), min(v)) for n, v in ts.items()}


def run(args) -> list[dict]:
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    rows = []
    for name, d, k in projections(args.size):
        g = torch.Generator(device=args.device).manual_seed(0)
        x = torch.randn(args.tokens, k, device=args.device, dtype=dtype, generator=g).requires_grad_(not args.no_grad)
        w = torch.randn(d, k, device=args.device, dtype=dtype, generator=g) / k ** 0.5
        A = (torch.randn(args.r, k, device=args.device, dtype=dtype, generator=g) / k ** 0.5).requires_grad_()
        B = (torch.randn(d, args.r, device=args.device, dtype=dtype, generator=g) * 0.01).requires_grad_()
        dy = torch.randn(args.tokens, d, device=args.device, dtype=dtype, generator=g)
        row = dict(proj=name, d=d, k=k, merged_chosen=ops.merged_is_cheaper(args.tokens, d, k, not args.no_grad))
        steps = {}
        for iname, f in impls(args.r).items():
            if args.no_grad:
                def step(f=f):
                    with torch.no_grad():
                        f(x, w, A, B)
            else:
                def step(f=f):
                    f(x, w, A, B).backward(dy)
                    x.grad = A.grad = B.grad = None
            steps[iname] = step
        for iname, (med, mn) in time_interleaved(steps, args.device, args.reps).items():
            row[iname] = (mn if args.stat == "min" else med) * 1e3
        rows.append(row)
    total = {"proj": "layer", "d": None, "k": None, "merged_chosen": None}
    for iname in impls(args.r):
        total[iname] = sum(r[iname] for r in rows)
    rows.append(total)
    for r in rows:
        for iname in impls(args.r):
            if iname != "bound":
                r[iname + "_x"] = r[iname] / r["bound"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default=None, choices=sorted(common.SIZES))
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--stat", default=None, choices=["median", "min"], help="default: median on GPU, min on CPU")
    p.add_argument("--no-grad", action="store_true")
    p.add_argument("--out", default=None, help="result stem (STEM.json, STEM.md)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.size = args.size or ("smol" if cpu else "1b")
    args.tokens = args.tokens or (512 if cpu else 8192)
    args.reps = args.reps or (30 if cpu else 50)
    args.stat = args.stat or ("min" if cpu else "median")
    rows = run(args)
    cols = [("proj", "proj", ""), ("d", "d", ""), ("k", "k", ""), ("bound", "bound ms", "{:.3f}")]
    for iname in ("reference", "unmerged", "merged", "auto"):
        cols += [(iname, iname + " ms", "{:.3f}"), (iname + "_x", "x", "{:.2f}")]
    table = common.markdown_table(rows, cols)
    print(table)
    if args.out:
        meta = common.env_info(args.device)
        meta.update(title=f"One LoRA linear, {'forward' if args.no_grad else 'forward + backward'}, "
                          f"{args.size} widths, {args.tokens} tokens, r={args.r}",
                    setup=f"{args.stat} of {args.reps} interleaved repetitions; x: ratio to the bound (frozen W0)")
        common.write_results(args.out, meta, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
