"""Does the LoRA factor ride along in the base GEMM for free? Appended rows and columns, timed.

The merged training path runs, per LoRA linear (or q/k/v, or gate|up, stacked), the big GEMM with
W' = W0 + s B A and, beside it, small GEMMs that each read a large activation once more::

    forward   y = x W'^T      (N, d)       xa = x A^T    (N, r)   reads x again
    backward  dX = dY W'      (N, k)       gs = dY B     (N, r)   reads dY again

Appending A's rows to W' ([W'; A], (d + r, k)) gives [y | xa] from one GEMM, and appending B's
columns ([W' | B], (d, k + r)) gives [dX | gs]: the extra reads disappear, but the output is r
columns wider than a multiple of the GEMM's tile, which can cost a partial tile column. This
benchmark times both forms at the shapes of the 1B and 8B training steps (median of many
interleaved rounds of back-to-back calls, CUDA events) and reports the ratio appended / separate.

    PYTHONPATH=. python bench/append_gemm.py --device cuda --out bench/results/append_gemm_h200
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402


def sites(size: str, tokens: int, r: int) -> list[dict]:
    """The stacked GEMMs of one decoder layer: (name, N, d = output rows of W, k, r appended)."""
    s = common.SIZES[size]
    h, kv, m = s["hidden"], s["hidden"] // s["heads"] * s["kv"], s["inter"]
    return [dict(site="q|k fwd (+A q,k,v)", N=tokens, d=h + kv, k=h, r=3 * r, dir="fwd"),
            dict(site="o fwd", N=tokens, d=h, k=h, r=r, dir="fwd"),
            dict(site="gate|up fwd", N=tokens, d=2 * m, k=h, r=2 * r, dir="fwd"),
            dict(site="down fwd", N=tokens, d=h, k=m, r=r, dir="fwd"),
            dict(site="q|k|v bwd", N=tokens, d=h + 2 * kv, k=h, r=3 * r, dir="bwd"),
            dict(site="o bwd", N=tokens, d=h, k=h, r=r, dir="bwd"),
            dict(site="gate|up bwd", N=tokens, d=2 * m, k=h, r=2 * r, dir="bwd"),
            dict(site="down bwd", N=tokens, d=h, k=m, r=r, dir="bwd")]


def cases(site: dict, device: str, dtype):
    """{variant: fn} for one site: the separate GEMMs and the appended one."""
    N, d, k, r = site["N"], site["d"], site["k"], site["r"]
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=g)  # noqa: E731
    if site["dir"] == "fwd":
        x = rnd(N, k)
        WA = rnd(d + r, k)                      # [W'; A]
        W, A = WA[:d], WA[d:]
        return {"separate": lambda: (torch.mm(x, W.t()), torch.mm(x, A.t())),
                "appended": lambda: torch.mm(x, WA.t()),
                "base only": lambda: torch.mm(x, W.t())}
    dy = rnd(N, d)
    WB = rnd(d, k + r)                          # [W' | B]
    W, B = WB[:, :k], WB[:, k:]
    Wc, Bc = W.contiguous(), B.contiguous()
    return {"separate": lambda: (torch.mm(dy, Wc), torch.mm(dy, Bc)),
            "appended": lambda: torch.mm(dy, WB),
            "base only": lambda: torch.mm(dy, Wc)}


def time_cases(fns: dict, rounds: int, calls: int) -> dict:
    """{variant: median ms per call}: ``calls`` back-to-back calls timed with CUDA events, rounds interleaved."""
    for f in fns.values():
        for _ in range(3):
            f()
    ts = common.interleaved({n: common.cuda_timer(f, calls) for n, f in fns.items()}, rounds)
    return {n: common.median(v) for n, v in ts.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    args = common.gemm_args(p, r_default="16,64").parse_args(argv)
    rows = []
    for size in args.sizes.split(","):
        tokens = 8192 if size == "1b" else 4096
        for r in map(int, args.r.split(",")):
            for site in sites(size, tokens, r):
                t = time_cases(cases(site, args.device, torch.bfloat16), args.rounds, args.calls)
                row = dict(size=size, lora_r=r, **site, separate_ms=t["separate"], appended_ms=t["appended"],
                           base_ms=t["base only"], ratio=t["appended"] / t["separate"],
                           saved_us=(t["separate"] - t["appended"]) * 1e3)
                rows.append(row)
                print(f"{size} r={r:<3} {site['site']:<20} separate {row['separate_ms']:.4f}  appended "
                      f"{row['appended_ms']:.4f}  base {row['base_ms']:.4f} ms  ratio {row['ratio']:.3f}", flush=True)
    cols = [("size", "size", ""), ("lora_r", "r", ""), ("site", "GEMM", ""), ("N", "N", ""), ("d", "d", ""),
            ("k", "k", ""), ("r", "appended", ""), ("base_ms", "base ms", "{:.4f}"),
            ("separate_ms", "separate ms", "{:.4f}"), ("appended_ms", "appended ms", "{:.4f}"),
            ("ratio", "appended / separate", "{:.3f}"), ("saved_us", "saved us", "{:.1f}")]
    common.report(rows, cols, args.out, args.device, "LoRA factors appended to the base GEMM vs separate GEMMs",
                  f"bfloat16; median over {args.rounds} interleaved rounds of {args.calls} back-to-back "
                  "calls (CUDA events); 1B at 8192 tokens, 8B at 4096")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
