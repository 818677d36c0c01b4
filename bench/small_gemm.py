"""The rank-r GEMMs of a LoRA training step, alone: time and bandwidth per site.

Beside each big GEMM with the merged weight, a LoRA layer runs four skinny GEMMs, each one pass
over a large activation (x: (N, k), or dY: (N, d)) against a rank-r factor::

    xa = x A^T    (N, r)        gs = dY B    (N, r)        dA = gs^T x   (r, k)      dB = dY^T xa  (d, r)

At bandwidth each would cost (bytes of its large operand) / (HBM bandwidth); this prints what
cuBLAS takes at the stacked sites of the 1B and 8B shapes (q|k|v, o, gate|up, down), with a
plain copy of the same operand for scale (the copy moves twice the bytes). Median of
interleaved rounds of back-to-back calls (CUDA events), as ``bench/append_gemm.py``.

    PYTHONPATH=. python bench/small_gemm.py --out bench/results/small_gemm_h200
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402
from bench.append_gemm import time_cases  # noqa: E402


def sites(size: str, r: int) -> list[tuple[str, int, int, int, int]]:
    """(name, N, d = rows of the stacked weight, k, total rank) per stacked site of one layer."""
    s = common.SIZES[size]
    h, kv, m = s["hidden"], s["hidden"] // s["heads"] * s["kv"], s["inter"]
    n = 8192 if size == "1b" else 4096
    return [("q|k|v", n, h + 2 * kv, h, 3 * r), ("o", n, h, h, r), ("gate|up", n, 2 * m, h, 2 * r),
            ("down", n, h, m, r)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = common.gemm_args(p).parse_args(argv)
    args.r = int(args.r)
    rows = []
    for size in args.sizes.split(","):
        for name, N, d, k, R in sites(size, args.r):
            g = torch.Generator(device="cuda").manual_seed(0)
            rn = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
            x, dy, A, B, xa, gs = rn(N, k), rn(N, d), rn(R, k), rn(d, R), rn(N, R), rn(N, R)
            cases = {"xa = x A^T": (lambda: torch.mm(x, A.t()), x, 1),
                     "gs = dY B": (lambda: torch.mm(dy, B), dy, 1),
                     "dA = gs^T x": (lambda: torch.mm(gs.t(), x), x, 1),
                     "dB = dY^T xa": (lambda: torch.addmm(B, dy.t(), xa, beta=0, alpha=2.0), dy, 1),
                     "copy of x": (lambda: x.clone(), x, 2),
                     "copy of dY": (lambda: dy.clone(), dy, 2)}
            t = time_cases({c: f for c, (f, _, _) in cases.items()}, args.rounds, args.calls)
            for c, (_, big, passes) in cases.items():
                gb = big.numel() * 2 * passes / 1e9
                rows.append(dict(size=size, site=name, N=N, d=d, k=k, r=R, op=c, us=t[c] * 1e3,
                                 tb_s=gb / t[c], bytes_gb=gb))
                print(f"{size} {name:8} {c:14} {t[c] * 1e3:8.1f} us  {gb / t[c]:5.2f} TB/s", flush=True)
    cols = [("size", "size", ""), ("site", "site", ""), ("N", "N", ""), ("d", "d", ""), ("k", "k", ""),
            ("r", "r", ""), ("op", "op", ""), ("us", "us", "{:.1f}"), ("tb_s", "TB/s", "{:.2f}")]
    common.report(rows, cols, args.out, "cuda", "The rank-r GEMMs of a LoRA training step, alone",
                  f"bfloat16, r={args.r} per projection; median over {args.rounds} interleaved rounds of "
                  f"{args.calls} back-to-back calls (CUDA events); TB/s counts the large operand's bytes "
                  "(twice for a copy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
