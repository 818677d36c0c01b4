"""The merged-weight kernel (lorakit/kernels/merge.py) against the copy bound, per tile shape.

W' = W0 + s B A reads W0 once and writes W' once: its floor is the time of ``W0.clone()``
(the same bytes, no math). For the weight shapes of the 1B and 8B Llama shapes, rank 16,
this times the kernel at several tile shapes and warp counts, and torch.addmm (cuBLAS,
which first copies W0), as medians of many calls (CUDA events), and reports each as
achieved bandwidth and as a ratio to the copy.

    PYTHONPATH=. python bench/merge_kernel.py --out bench/results/merge_kernel_h200
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

SHAPES = {"1b q/o": (2048, 2048), "1b k/v": (512, 2048), "1b gate/up": (8192, 2048), "1b down": (2048, 8192),
          "8b q/o": (4096, 4096), "8b gate/up": (14336, 4096), "8b down": (4096, 14336)}
CONFIGS = [(64, 256, 4), (64, 256, 8), (128, 128, 4), (128, 128, 8), (32, 512, 4), (128, 256, 8), (64, 512, 8)]


def median_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return common.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import triton
    from lorakit.kernels import merge
    rows = []
    for name, (d, k) in SHAPES.items():
        w = torch.randn(d, k, device="cuda", dtype=torch.bfloat16)
        B = torch.randn(d, args.rank, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(args.rank, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(w)
        gb = 2 * w.numel() * w.element_size() / 1e9
        copy = median_ms(lambda: out.copy_(w))
        row = dict(shape=name, d=d, k=k, copy_ms=copy, copy_tb_s=gb / copy,
                   addmm_ms=median_ms(lambda: torch.addmm(w, B, A, alpha=2.0, out=out)))
        want = torch.addmm(w.float(), B.float(), A.float(), alpha=2.0)
        for bd, bk, warps in CONFIGS:
            def run():
                grid = (triton.cdiv(d, bd), triton.cdiv(k, bk))
                merge._merge_kernel[grid](w, B, A, out, d, k, args.rank, 2.0, w.stride(0), B.stride(0), A.stride(0),
                                          out.stride(0), R=max(16, triton.next_power_of_2(args.rank)), BLOCK_D=bd,
                                          BLOCK_K=bk, IEEE=False, num_warps=warps)
            t = median_ms(run)
            err = ((out.float() - want).norm() / want.norm()).item()
            row[f"{bd}x{bk}w{warps}"] = t
            assert err < 1e-2, (name, bd, bk, err)
        rows.append(row)
        print(name, {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}, flush=True)
    keys = [f"{bd}x{bk}w{w}" for bd, bk, w in CONFIGS]
    for r in rows:
        r["addmm_x_copy"] = r["addmm_ms"] / r["copy_ms"]
        for kk in keys:
            r[kk + "_x_copy"] = r[kk] / r["copy_ms"]
    cols = [("shape", "shape", ""), ("copy_ms", "copy ms", "{:.4f}"), ("copy_tb_s", "copy TB/s", "{:.2f}"),
            ("addmm_x_copy", "addmm", "{:.2f}")] + [(kk + "_x_copy", kk, "{:.2f}") for kk in keys]
    table = common.markdown_table(rows, cols)
    print(table)
    if args.out:
        meta = dict(common.env_info("cuda"), title="Merged-weight kernel vs the copy bound",
                    setup=f"bfloat16, rank {args.rank}; median of 50 calls (CUDA events); columns after 'copy TB/s' "
                          "are time / copy time (1.00 = the bound: one read of W0 and one write of W'); "
                          "BDxBKwW = tile (BLOCK_D x BLOCK_K) and warps.")
        common.write_results(args.out, meta, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
