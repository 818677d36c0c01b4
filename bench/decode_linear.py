"""One LoRA linear while decoding (a few rows): GPU time and host time, side by side.

Decoding with an unmerged adapter is bound by the host: every adapted layer of every step
dispatches its kernels from Python. For each projection of a decoder layer at N rows
(default 8: a batch of 8 sequences, one token each), bfloat16:

GPU microseconds per call (no host in it: 20 calls captured in a CUDA graph, the graph
replayed, CUDA events around the replays; median of ``--reps``):

    base     x W0^T (cuBLAS): what a merged model runs
    plain    x W0^T, x A^T, += s (x A^T) B^T: three kernels (lorakit's form without the kernel)
    kernel   lorakit.kernels.skinny: the whole LoRA linear in one launch
    best     the fastest of the kernel's block configurations swept (``--sweep``)

Host microseconds per call (calls issued back to back, wall time / calls, with the GPU
faster than the host at these sizes):

    nn.Linear        the merged model's module
    LoraLinear       lorakit's layer, no_grad (the default path: the kernel)
    LoraLinear-plain the same layer with the kernel switched off (three torch ops)
    F.linear / kernel-call   the bare operations

    PYTHONPATH=. python bench/decode_linear.py --out bench/results/decode_linear_1b_h200
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402
from bench.linear_op import projections  # noqa: E402
import lorakit  # noqa: E402
from lorakit import kernels, ops  # noqa: E402


def gpu_us(fn, reps: int, per_graph: int = 20) -> float:
    """Median GPU microseconds per call of ``fn`` (captured in a CUDA graph, replayed)."""
    g = common.cuda_graph(fn, per_graph)
    ts = [common.cuda_timer(g.replay, 1)() * 1e3 / per_graph for _ in range(reps)]
    return common.median(ts)


def host_us(fn, calls: int = 2000, rounds: int = 5) -> float:
    """Median over ``rounds`` of wall microseconds per call, ``calls`` calls back to back."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e6 / calls)
    return common.median(ts)


def plain(x, w, A, B, s):
    out = F.linear(x, w)
    xa = F.linear(x, A)
    out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), B.t(), alpha=s)
    return out


def sweep(sk, x, w, A, B, s, reps: int) -> tuple[float, str]:
    """The fastest plan (BLOCK_D x SPLIT x BLOCK_K x stages; BLOCK_N and warps as chosen) in GPU us."""
    import triton
    d, k = w.shape
    n = x.numel() // k
    block_n, _, _, _, _, warps, _ = sk.plan(n, d, k, A.shape[0], x.element_size())
    y = torch.empty(n, d, dtype=x.dtype, device=x.device)
    best = (float("inf"), "")
    for bd, split, bk, ns in itertools.product((32, 64), (1, 2, 4, 8), (128, 256), (3, 4)):
        k_per = triton.cdiv(triton.cdiv(k, split), bk) * bk
        if k_per * (split - 1) >= k:
            continue
        plan = (block_n, bd, bk, split, k_per, warps, ns)

        def f(plan=plan):
            sk.launch_plan(x, w, None, A, B, s, y, plan)
        try:
            f()                                      # compiled, and its buffers made, outside the graph
            t = gpu_us(f, max(5, reps // 4))
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile (shared memory) is skipped
            print(f"  config D{bd} S{split} K{bk} s{ns} failed: {type(e).__name__}: {e}")
            continue
        if t < best[0]:
            best = (t, f"D{bd} S{split} K{bk} s{ns}")
    return best


def run(args) -> list[dict]:
    dt = torch.bfloat16
    sk = kernels.load("skinny")
    rows, swept = [], {}
    for name, d, k in projections(args.size):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(args.tokens, 1, k, device="cuda", dtype=dt, generator=g)
        w = torch.randn(d, k, device="cuda", dtype=dt, generator=g) / k ** 0.5
        A = torch.randn(args.r, k, device="cuda", dtype=dt, generator=g) / k ** 0.5
        B = torch.randn(d, args.r, device="cuda", dtype=dt, generator=g) * 0.02
        s = 2.0
        ref = ops.lora_linear_reference(x.float(), w.float(), None, A.float(), B.float(), s)
        got = sk.lora_linear(x, w, None, A, B, s)
        err = ((got.float() - ref).norm() / ref.norm()).item()
        pl_err = ((plain(x, w, A, B, s).float() - ref).norm() / ref.norm()).item()
        row = dict(proj=name, d=d, k=k, rel_err_kernel=err, rel_err_plain=pl_err)
        row["gpu_base"] = gpu_us(lambda: F.linear(x, w), args.reps)
        row["gpu_plain"] = gpu_us(lambda: plain(x, w, A, B, s), args.reps)
        row["gpu_kernel"] = gpu_us(lambda: sk.lora_linear(x, w, None, A, B, s), args.reps)
        if args.sweep:
            if (d, k) not in swept:                  # o, v and up have the shapes of q, k and gate
                swept[(d, k)] = sweep(sk, x, w, A, B, s, args.reps)
            row["gpu_best"], row["best_config"] = swept[(d, k)]
        # host: the modules as a model calls them
        lin = nn.Linear(k, d, bias=False, device="cuda", dtype=dt)
        holder = nn.Sequential(nn.Linear(k, d, bias=False, device="cuda", dtype=dt))
        lorakit.inject(holder, lorakit.LoraConfig(r=args.r, alpha=2 * args.r, target_modules=["0"]))
        ll = holder[0]
        with torch.no_grad():
            row["host_nn_linear"] = host_us(lambda: lin(x))
            row["host_lora_linear"] = host_us(lambda: ll(x))
            with kernels.disabled("skinny"):
                row["host_lora_linear_plain"] = host_us(lambda: ll(x))
            row["host_f_linear"] = host_us(lambda: F.linear(x, w))
            row["host_kernel_call"] = host_us(lambda: sk.lora_linear(x, w, None, A, B, s))
            row["host_plain_ops"] = host_us(lambda: plain(x, w, A, B, s))
        rows.append(row)
        print({kk: (round(v, 2) if isinstance(v, float) else v) for kk, v in row.items()}, flush=True)
    total = {"proj": "layer"}
    for key in rows[0]:
        if key.startswith(("gpu_", "host_")):
            total[key] = sum(r[key] for r in rows)
    rows.append(total)
    for r in rows:
        r["gpu_kernel_x"] = r["gpu_kernel"] / r["gpu_base"]
        r["gpu_plain_x"] = r["gpu_plain"] / r["gpu_base"]
        r["host_extra"] = r["host_lora_linear"] - r["host_nn_linear"]
        r["host_extra_plain"] = r["host_lora_linear_plain"] - r["host_nn_linear"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1b", choices=sorted(common.SIZES))
    p.add_argument("--tokens", type=int, default=8, help="rows (sequences decoding one token each)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="also time every block configuration of the kernel")
    p.add_argument("--out", default=None, help="result stem (STEM.json, STEM.md)")
    args = p.parse_args(argv)
    rows = run(args)
    cols = [("proj", "proj", ""), ("d", "d", ""), ("k", "k", ""),
            ("gpu_base", "GPU us base", "{:.2f}"), ("gpu_plain", "plain", "{:.2f}"), ("gpu_plain_x", "x", "{:.2f}"),
            ("gpu_kernel", "kernel", "{:.2f}"), ("gpu_kernel_x", "x", "{:.2f}")]
    if args.sweep:
        cols += [("gpu_best", "best", "{:.2f}"), ("best_config", "config", "")]
    cols += [("host_nn_linear", "host us nn.Linear", "{:.1f}"), ("host_lora_linear", "LoraLinear", "{:.1f}"),
             ("host_lora_linear_plain", "LoraLinear plain", "{:.1f}"), ("host_f_linear", "F.linear", "{:.1f}"),
             ("host_kernel_call", "kernel call", "{:.1f}"), ("host_plain_ops", "3 ops", "{:.1f}"),
             ("rel_err_kernel", "rel err kernel", "{:.1e}"), ("rel_err_plain", "plain", "{:.1e}")]
    table = common.markdown_table(rows, cols)
    print(table)
    if args.out:
        meta = common.env_info("cuda")
        meta.update(title=f"One LoRA linear while decoding: {args.size} widths, {args.tokens} rows, r={args.r}",
                    setup=f"bfloat16; GPU: median of {args.reps} replays of a CUDA graph of 20 calls; host: median "
                          f"of 5 rounds of 2000 calls back to back; rel err: against a float32 reference")
        common.write_results(args.out, meta, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
