"""Can a Triton kernel do LoRA's rank-r reductions over the tokens faster than cuBLAS? (experiment)

dA = s gs^T x (r, k) and dB = s dY^T xa (d, r) both reduce over N tokens: C = alpha P^T Q with
P a large (N, M) activation and Q a skinny (N, R) one. cuBLAS runs them at 1.1-1.6 TB/s of P
when P is an (8192, 2048) activation (``bench/small_gemm.py``), where one read of P at 3.5-4
TB/s would take a third of the time. This benchmark times, at the sites of the 1B and 8B
shapes, ``torch.mm(P.t(), Q)`` against a Triton kernel that splits N over S programs per block
of M columns and reduces the S partial sums in float32:

* ``two-pass``: the partial sums go to a float32 workspace, a second launch adds them;
* ``one-pass``: the last program of each column block to finish (an atomic counter, reset by
  that program) adds them, in the same launch.

It checks each result against float64 first. Times are GPU times: each variant's back-to-back
calls are captured in a CUDA graph and the replays timed, so the host's launch cost (the
Triton JIT entry costs 25-40 us a call on the H200's host) does not enter; the first run,
timed with plain launches, measured the host instead (every Triton variant 42-63 us, cuBLAS
25-46 us). The kernel lives here, not in ``lorakit``, until a run shows where it wins.

    PYTHONPATH=. python bench/rank_reduce.py --out bench/results/rank_reduce_h200
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:                                          # pragma: no cover - CPU-only installs
    triton = tl = None


if triton is not None:
    @triton.jit
    def _reduce_kernel(p_ptr, q_ptr, o_ptr, ws_ptr, cnt_ptr, N, M, R, alpha, s_p, s_q, s_om, s_or,
                       BN: tl.constexpr, BM: tl.constexpr, RP: tl.constexpr, S: tl.constexpr, CHUNK: tl.constexpr,
                       ONE_PASS: tl.constexpr, IEEE: tl.constexpr):
        """out[m, j] = alpha sum_n P[n, m] Q[n, j]. Program (i, s): columns [i BM, (i + 1) BM) of P,
        rows [s CHUNK, (s + 1) CHUNK) (CHUNK: a multiple of BN). S == 1: store directly. Else the partial goes to
        ws[s, m, j] (float32); ONE_PASS: the last program of column block i (counter) sums them."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rr = tl.arange(0, RP)
        mm, mr = rm < M, rr < R
        acc = tl.zeros((BM, RP), dtype=tl.float32)                  # sum over this program's rows
        for off in range(0, CHUNK, BN):
            rn = pid_s * CHUNK + off + tl.arange(0, BN)
            mn = rn < N
            rn64 = rn.to(tl.int64)
            p = tl.load(p_ptr + rn64[:, None] * s_p + rm[None, :], mask=mn[:, None] & mm[None, :], other=0.0)
            q = tl.load(q_ptr + rn64[:, None] * s_q + rr[None, :], mask=mn[:, None] & mr[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(tl.trans(p), q, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(p), q)
        omask = mm[:, None] & mr[None, :]
        optr = o_ptr + rm[:, None].to(tl.int64) * s_om + rr[None, :] * s_or
        if S == 1:
            tl.store(optr, (alpha * acc).to(o_ptr.dtype.element_ty), mask=omask)
        else:
            wsp = ws_ptr + (pid_s * M + rm[:, None]).to(tl.int64) * RP + rr[None, :]
            tl.store(wsp, acc, mask=mm[:, None])
            if ONE_PASS:
                tl.debug_barrier()                                   # every thread's partial is written
                old = tl.atomic_add(cnt_ptr + pid_m, 1, sem="acq_rel", scope="gpu")
                if old == S - 1:                                     # the last of the S: sum them
                    tot = tl.zeros((BM, RP), dtype=tl.float32)
                    for s in range(S):
                        w = ws_ptr + (s * M + rm[:, None]).to(tl.int64) * RP + rr[None, :]
                        tot += tl.load(w, mask=mm[:, None], other=0.0, cache_modifier=".cg")
                    tl.store(optr, (alpha * tot).to(o_ptr.dtype.element_ty), mask=omask)
                    tl.atomic_xchg(cnt_ptr + pid_m, 0)              # ready for the next launch

    @triton.jit
    def _sum_kernel(ws_ptr, o_ptr, M, R, alpha, s_om, s_or, BM: tl.constexpr, RP: tl.constexpr, S: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, RP)
        mm, mr = rm < M, rr < R
        tot = tl.zeros((BM, RP), dtype=tl.float32)
        for s in range(S):
            tot += tl.load(ws_ptr + (s * M + rm[:, None]).to(tl.int64) * RP + rr[None, :], mask=mm[:, None], other=0.0)
        tl.store(o_ptr + rm[:, None].to(tl.int64) * s_om + rr[None, :] * s_or, (alpha * tot).to(o_ptr.dtype.element_ty),
                 mask=mm[:, None] & mr[None, :])


_COUNTERS: dict = {}


def reduce_rows(P: torch.Tensor, Q: torch.Tensor, alpha: float, out: torch.Tensor, splits: int, one_pass: bool,
                BM: int = 128, BN: int = 64, num_warps: int = 8) -> torch.Tensor:
    """out (M, R) [any strides] = alpha P^T Q for P (N, M), Q (N, R), unit column strides."""
    N, M = P.shape
    R = Q.shape[1]
    RP = max(16, triton.next_power_of_2(R))
    grid_m = triton.cdiv(M, BM)
    S = max(1, splits)
    chunk = triton.cdiv(triton.cdiv(N, S), BN) * BN
    S = triton.cdiv(N, chunk)
    ws = torch.empty((S, M, RP), device=P.device, dtype=torch.float32) if S > 1 else out
    cnt = _COUNTERS.get(P.device)
    if cnt is None or cnt.numel() < grid_m:
        cnt = _COUNTERS[P.device] = torch.zeros(max(grid_m, 1024), device=P.device, dtype=torch.int32)
    ieee = P.dtype == torch.float32
    _reduce_kernel[(grid_m, S)](P, Q, out, ws, cnt, N, M, R, float(alpha), P.stride(0), Q.stride(0),
                                out.stride(0), out.stride(1), BN=BN, BM=BM, RP=RP, S=S, CHUNK=chunk,
                                ONE_PASS=one_pass, IEEE=ieee, num_warps=num_warps)
    if S > 1 and not one_pass:
        _sum_kernel[(grid_m,)](ws, out, M, R, float(alpha), out.stride(0), out.stride(1), BM=BM, RP=RP, S=S,
                               num_warps=4)
    return out


def sites(size: str, r: int) -> list[tuple[str, int, int, int]]:
    """(name, N, M = columns of P, R) for each reduction of one layer's backward (stacked sites)."""
    s = common.SIZES[size]
    h, kv, m = s["hidden"], s["hidden"] // s["heads"] * s["kv"], s["inter"]
    n = 8192 if size == "1b" else 4096
    return [("dA q|k|v (x)", n, h, 3 * r), ("dB q|k|v (dY)", n, h + 2 * kv, 3 * r), ("dA o (x)", n, h, r),
            ("dB o (dY)", n, h, r), ("dA gate|up (x)", n, h, 2 * r), ("dB gate (dY)", n, m, r),
            ("dA down (h)", n, m, r), ("dB down (dY)", n, h, r)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", default="1,4,8,16")
    args = common.gemm_args(p).parse_args(argv)
    args.r = int(args.r)
    rows = []
    for size in args.sizes.split(","):
        for name, N, M, R in sites(size, args.r):
            g = torch.Generator(device="cuda").manual_seed(0)
            P = torch.randn(N, M, device="cuda", generator=g).to(torch.bfloat16)
            Q = torch.randn(N, R, device="cuda", generator=g).to(torch.bfloat16)
            want = (P.double().t() @ Q.double()) * 2.0
            out = torch.empty(M, R, device="cuda", dtype=torch.bfloat16)
            fns = {"cublas": lambda: torch.addmm(out, P.t(), Q, beta=0, alpha=2.0)}
            errs = {}
            for S in map(int, args.splits.split(",")):
                for one in ((False, True) if S > 1 else (False,)):
                    key = f"S{S}{'-1pass' if one else ''}"
                    fns[key] = (lambda S=S, one=one: reduce_rows(P, Q, 2.0, out, S, one))
                    got = fns[key]().double()
                    errs[key] = ((got - want).abs().max() / want.abs().max()).item()
            t = common.graph_times(fns, args.rounds, args.calls)
            gb = P.numel() * 2 / 1e9
            row = dict(size=size, site=name, N=N, M=M, R=R, cublas_us=t["cublas"] * 1e3,
                       cublas_tb_s=gb / t["cublas"])
            best = min((k for k in t if k != "cublas"), key=t.get)
            row.update(best=best, best_us=t[best] * 1e3, best_tb_s=gb / t[best], speedup=t["cublas"] / t[best],
                       max_rel_err=max(errs.values()), times_us={k: v * 1e3 for k, v in t.items()})
            rows.append(row)
            print(f"{size} {name:16} cublas {row['cublas_us']:6.1f} us ({row['cublas_tb_s']:.2f} TB/s)  best {best} "
                  f"{row['best_us']:6.1f} us ({row['best_tb_s']:.2f} TB/s)  x{row['speedup']:.2f}  "
                  f"err {row['max_rel_err']:.1e}  " + " ".join(f"{k}={v * 1e3:.1f}" for k, v in t.items()), flush=True)
    cols = [("size", "size", ""), ("site", "site", ""), ("N", "N", ""), ("M", "M", ""), ("R", "R", ""),
            ("cublas_us", "cuBLAS us", "{:.1f}"), ("cublas_tb_s", "TB/s", "{:.2f}"), ("best", "best Triton", ""),
            ("best_us", "us", "{:.1f}"), ("best_tb_s", "TB/s", "{:.2f}"), ("speedup", "cuBLAS / Triton", "{:.2f}"),
            ("max_rel_err", "max rel err", "{:.1e}")]
    common.report(rows, cols, args.out, "cuda",
                  "LoRA's rank-r reductions over the tokens: cuBLAS vs a split-N Triton kernel",
                  f"bfloat16 P (N, M), Q (N, R), r={args.r} per projection; out = 2 P^T Q; median over "
                  f"{args.rounds} interleaved rounds of {args.calls} back-to-back calls replayed from a CUDA "
                  "graph (GPU time, no launch cost); "
                  "TB/s counts P's bytes; errors against float64, relative to the largest entry")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
