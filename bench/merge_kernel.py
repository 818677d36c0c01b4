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

try:
    import triton
    import triton.language as tl
except ImportError:                 # the module still imports (for --help) without Triton
    triton = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

SHAPES = {"1b q/o": (2048, 2048), "1b k/v": (512, 2048), "1b gate/up": (8192, 2048), "1b down": (2048, 8192),
          "8b q/o": (4096, 4096), "8b gate/up": (14336, 4096), "8b down": (4096, 14336)}
# (kernel, BLOCK_D, BLOCK_K, warps): the shipped tile (64 x 256, 4 warps) first. A kernel doing the
# rank-r update as r float32 FMA passes in the W0 tile's layout (no tensor cores) measured 2.1-3.5x
# the copy at rank 16 and 8-12x at rank 64 on the H200, so it is not kept.
CONFIGS = [("dot", 64, 256, 4), ("dot", 64, 256, 8), ("dot", 128, 128, 8), ("copy", 64, 256, 4)]


if triton is not None:
    @triton.jit
    def _copy_kernel(w_ptr, o_ptr, D, K, s_w, s_o, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
        """W0 -> out with the merge kernel's tiling: Triton's own floor for the same bytes."""
        rd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        m = (rd < D)[:, None] & (rk < K)[None, :]
        rd64 = rd.to(tl.int64)
        tl.store(o_ptr + rd64[:, None] * s_o + rk[None, :], tl.load(w_ptr + rd64[:, None] * s_w + rk[None, :], mask=m),
                 mask=m)


def median_ms(fn, reps: int = 30, inner: int = 20) -> float:
    """Median over ``reps`` of the mean time of ``inner`` back-to-back calls (the host queues
    them ahead, so the launch cost of each call is hidden as it is in a training step)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return common.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()
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
        R = max(16, triton.next_power_of_2(args.rank))
        for kind, bd, bk, warps in CONFIGS:
            grid = (triton.cdiv(d, bd), triton.cdiv(k, bk))

            def run():
                if kind == "dot":
                    merge._merge_kernel[grid](w, B, A, out, out, out, d, k, args.rank, 2.0, w.stride(0), B.stride(0),
                                              A.stride(0), out.stride(0), R=R, BLOCK_D=bd, BLOCK_K=bk, IEEE=False,
                                              STORE_A=False, STORE_B=False, num_warps=warps)
                else:
                    _copy_kernel[grid](w, out, d, k, w.stride(0), out.stride(0), BLOCK_D=bd, BLOCK_K=bk,
                                             num_warps=warps)
            t = median_ms(run)
            row[f"{kind}{bd}x{bk}w{warps}"] = t
            if kind != "copy":
                err = ((out.float() - want).norm() / want.norm()).item()
                assert err < 1e-2, (name, kind, bd, bk, err)
        rows.append(row)
        print(name, {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}, flush=True)
    keys = [f"{kind}{bd}x{bk}w{w}" for kind, bd, bk, w in CONFIGS]
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
                    setup=f"bfloat16, rank {args.rank}; median over 30 rounds of the mean time of 20 back-to-back calls (CUDA events); columns after 'copy TB/s' "
                          "are time / copy time (1.00 = the bound: one read of W0 and one write of W'); "
                          "dot: lorakit's kernel, copy: a Triton copy with its tiling; BDxBKwW = tile (BLOCK_D x BLOCK_K) and warps.")
        common.write_results(args.out, meta, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
