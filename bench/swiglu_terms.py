"""The LoRA terms added inside the SwiGLU kernels, fourth design: the pipelined loop

Beside W0 the fused MLP writes the rank-r products into g|u (N, 2I) and dh (N, I) before the big
GEMMs accumulate onto them (``lorakit.fused.mlp_forms``); at the 8B shape these writes and their
epilogue reads are the largest passes the MLP still adds. Three designs that added the terms in
the activation kernels lost (``bench/swiglu_lora.py``): Triton gave the loaded tiles the dot's
register layout (2-byte loads), or the terms ran on the CUDA cores.

``bench/swiglu_reduce.py`` found a shape that keeps tensor cores and 16-byte loads: programs own
BLOCK columns and loop over rows, and Triton pipelines the loads through shared memory
(cp.async), from where any register layout is cheap. This file puts the terms in that shape:

    forward    g = g0 + sg xag Bg^T,  u = u0 + su xau Bu^T,  h = silu(g) u      (g0 = x Wg^T ...)
    backward   the same g, u rebuilt, dh = dh0 + sd gd Ad (dh0 = dY Wd, gd = dY Bd), then
               [dg | du] and, as lorakit's backward kernel does, dAd = sd gd^T h, dBg, dBu

B^T's tile (RP, BLOCK) is loaded once per program. g and u are never stored complete, so the
backward rebuilds them (the same fp32 arithmetic: the same values). The kernels are the
library's (``lorakit.kernels.swiglu``); this file sweeps their configurations. (Its results were
measured on the experiment's own copy of the kernels, which the library took over, adding
its flags, in commit bc455aa.)

Result (``swiglu_terms_h200.md``): at 8B the forward took 124 us against 176 us for the plain
kernel and the GEMMs writing the terms, and the backward 211 us against 253 us. The design went
into the library (``lorakit.kernels.swiglu``); the 8B training step went from 0.947x to 0.967x of
the bound.

    PYTHONPATH=. python bench/swiglu_terms.py --aot
    PYTHONPATH=. python bench/swiglu_terms.py --out bench/results/swiglu_terms_h200
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

SHAPES = {"1b": (8192, 8192), "8b": (4096, 14336)}          # (N tokens, I)
# (ROWS, BLOCK, warps, splits, stages)
CONFIGS = [(16, 64, 4, 8, 3), (32, 64, 4, 8, 3), (16, 128, 4, 8, 3), (32, 128, 4, 4, 3), (64, 64, 4, 4, 3),
           (16, 64, 4, 4, 3), (32, 64, 4, 16, 3), (64, 128, 8, 4, 3)]
# the backward with dh's term alone (gate|up forward merged: the 1B shape), as the library runs it
# there (``REDUCE``, the first), and narrower, more split or more warped candidates
# (s14e swept 16-row ones, swiglu_terms_h200_s14e.md: none beat REDUCE by more than 9 us, while the
# terms backward with GU ran in 223 us at 64 x 64; s14f the larger tiles)
DH_CONFIGS = [(16, 64, 4, 8, 3), (16, 32, 2, 8, 3), (64, 64, 4, 4, 3), (32, 64, 4, 8, 3), (32, 64, 4, 4, 3),
              (64, 64, 8, 4, 3), (64, 64, 8, 8, 3), (32, 64, 8, 4, 3), (64, 64, 4, 8, 3), (32, 32, 2, 8, 3)]




def forward(gu, bg, bu, sg, su, cfg):
    """h (N, I) for gu = [g0 | u0 | xag | xau] (N, 2I + rg + ru), Bg (I, rg), Bu (I, ru): the
    library's ``swiglu_forward_terms`` in configuration ``cfg``."""
    from lorakit.kernels import swiglu
    return swiglu.swiglu_forward_terms(gu, bg, bu, sg, su, cfg)


def backward(dh, gu, bg, bu, ad, gd, sg, su, sd, cfg):
    """([dg | du], dAd (rd, I), dBg (I, rg), dBu (I, ru)) with g, u rebuilt as ``forward`` and
    dh = dh0 + sd gd Ad: the library's ``swiglu_backward_reduce`` with every term, configuration ``cfg``."""
    from lorakit.kernels import swiglu
    return swiglu.swiglu_backward_reduce(dh, gu, gd, sd, bg.shape[1], sg, su, True, bg, bu, ad, cfg=cfg)


def reference(gu, bg, bu, ad, dh, gd, sg, su, sd):
    """(h, [dg | du], dAd, dBg, dBu) in float32, with the kernels' roundings (h, dg, du to gu's dtype)."""
    i, rg = bg.shape
    f = gu.float()
    xa = f[:, 2 * i:]
    g = f[:, :i] + sg * xa[:, :rg] @ bg.float().t()
    u = f[:, i:2 * i] + su * xa[:, rg:] @ bu.float().t()
    s = torch.sigmoid(g)
    h = (g * s * u).to(gu.dtype).float()
    d = dh.float() + sd * gd.float() @ ad.float()
    dg = (d * u * s * (1 + g * (1 - s))).to(gu.dtype).float()
    du = (d * g * s).to(gu.dtype).float()
    return h, torch.cat([dg, du], 1), sd * gd.float().t() @ h, sg * dg.t() @ xa[:, :rg], su * du.t() @ xa[:, rg:]


def inputs(n, i, r, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, device=device, generator=g) * std).to(dtype)
    return dict(gu=rnd(n, 2 * i + 2 * r, std=2.0), bg=rnd(i, r, std=0.3), bu=rnd(i, r, std=0.3), ad=rnd(r, i, std=0.3),
                dh=rnd(n, i), gd=rnd(n, r))


def check(n, i, r, device, dtype, cfgs, tol):
    t = inputs(n, i, r, device, dtype)
    want = reference(t["gu"], t["bg"], t["bu"], t["ad"], t["dh"], t["gd"], 0.7, 1.3, 0.5)
    worst = 0.0
    for cfg in cfgs:
        got = (forward(t["gu"], t["bg"], t["bu"], 0.7, 1.3, cfg),
               *backward(t["dh"], t["gu"], t["bg"], t["bu"], t["ad"], t["gd"], 0.7, 1.3, 0.5, cfg))
        for a, b in zip(got, want):
            worst = max(worst, ((a.float() - b).norm() / b.norm()).item())
    assert worst < tol, worst
    return worst


def aot_rows(r: int) -> list[dict]:
    """Registers, stack and loads per thread of the library's terms kernels in each configuration, for sm_90."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from swiglu_lora import compile_sm90
    from swiglu_reduce import BWD_SIG
    from lorakit.kernels import swiglu
    i32, b16, f32 = "i32", "*bf16", "fp32"
    fwd = dict(gu_ptr=b16, bg_ptr=b16, bu_ptr=b16, h_ptr=b16, N=i32, I=i32, s_gu=i32, s_bg=i32, s_bu=i32, s_h=i32,
               rows_per=i32, sg=f32, su=f32, RG="constexpr", RU="constexpr", RP="constexpr", ROWS="constexpr",
               BLOCK="constexpr", PREC="constexpr")
    rows = []
    for kernel, fn, sig, n_aligned, extra in (
            ("terms fwd", swiglu._fwd_terms_kernel, fwd, 11, dict(RG=r, RU=r)),
            ("terms bwd", swiglu._bwd_reduce_kernel, BWD_SIG, 18, dict(RD=r, RG=r, RU=r, AD=True, DB=True, GU=True,
                                                                      DH=True))):
        for rows_, block, warps, splits, stages in CONFIGS:
            cex = dict(RP=swiglu._rp(r), ROWS=rows_, BLOCK=block, PREC="tf32", **extra)
            rows.append(dict(kernel=kernel, config=f"{rows_} x {block}, {warps} warps, {stages} stages",
                             **compile_sm90(fn, sig, cex, warps, range(n_aligned), stages)))
    for row in rows:
        print(f"{row['kernel']:<10} {row['config']:<30} registers {row['registers']:>3}  stack {row['stack']:>5}  "
              f"global loads {row['loads']:>4} (16-byte {row['loads_16B']}), 16-byte cp.async {row['async_16B']}",
              flush=True)
    return rows


def gpu_rows(sizes: list[str], r: int, rounds: int, calls: int) -> list[dict]:
    from lorakit.kernels import swiglu
    rows = []
    for size in sizes:
        n, i = SHAPES[size]
        err = check(n, i, r, "cuda", torch.bfloat16, CONFIGS, 1e-2)
        print(f"{size}: worst relative error {err:.2e}", flush=True)
        t = inputs(n, i, r, "cuda")
        gu, bg, bu, ad, gd, dh = t["gu"], t["bg"], t["bu"], t["ad"], t["gd"], t["dh"]
        xa = gu[:, 2 * i:]
        tgu = torch.empty((n, 2 * i), dtype=gu.dtype, device="cuda")
        tdh = torch.empty((n, i), dtype=gu.dtype, device="cuda")
        fns = {"plain fwd": lambda: swiglu.swiglu_forward(gu[:, :2 * i]),
               "GEMMs writing the terms, fwd": lambda: (
                   torch.addmm(tgu[:, :i], xa[:, :r], bg.t(), beta=0, alpha=0.7, out=tgu[:, :i]),
                   torch.addmm(tgu[:, i:], xa[:, r:], bu.t(), beta=0, alpha=1.3, out=tgu[:, i:])),
               "reduce bwd (library)": lambda: swiglu.swiglu_backward_reduce(dh, gu, gd, 0.5, r, 0.7, 1.3, True),
               "GEMM writing the term, bwd": lambda: torch.addmm(tdh, gd, ad, beta=0, alpha=0.5, out=tdh)}
        for cfg in CONFIGS:
            fns[f"terms fwd {cfg}"] = lambda cfg=cfg: forward(gu, bg, bu, 0.7, 1.3, cfg)
            fns[f"terms bwd {cfg}"] = lambda cfg=cfg: backward(dh, gu, bg, bu, ad, gd, 0.7, 1.3, 0.5, cfg)
        for cfg in DH_CONFIGS:                      # dh's term, dAd, dBg, dBu; g, u as stored
            fns[f"dh-terms bwd {cfg}"] = lambda cfg=cfg: swiglu.swiglu_backward_reduce(
                dh, gu, gd, 0.5, r, 0.7, 1.3, True, None, None, ad, cfg=cfg)
        want = None
        for k in [k for k in fns if k.startswith("dh-terms")]:    # each configuration against the first
            try:
                got = [t.float() for t in fns[k]()]
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported, not fatal
                print(f"{size} {k}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                del fns[k]
                continue
            want = want or got
            err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, want))
            print(f"{size} {k}: relative difference to {DH_CONFIGS[0]} {err:.1e}", flush=True)
            assert err < 1e-2, (k, err)
        med = {k: ms * 1e3 for k, ms in common.graph_times(fns, rounds, calls).items()}
        base_f = med["plain fwd"] + med["GEMMs writing the terms, fwd"]
        base_b = med["reduce bwd (library)"] + med["GEMM writing the term, bwd"]
        for k, us in med.items():
            base = base_f if "fwd" in k else base_b
            rows.append(dict(size=size, N=n, I=i, r=r, variant=k, us=us, vs_pair=us - base))
            print(f"{size} {k:<36} {us:8.1f} us  ({us - base:+.1f} against kernel + GEMM writing the terms)", flush=True)
        common.free(t)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aot", action="store_true", help="compile for sm_90 here and report resources (no GPU)")
    p.add_argument("--sizes", default="8b,1b")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if triton is None:
        raise SystemExit("bench/swiglu_terms.py needs Triton")
    if args.aot:
        rows = aot_rows(args.r)
        cols = [("kernel", "kernel", ""), ("config", "rows x columns, warps", ""), ("registers", "registers", ""),
                ("stack", "stack bytes", ""), ("loads", "global loads / thread", ""), ("loads_16B", "of them 16-byte", ""),
                ("async_16B", "16-byte cp.async", "")]
        common.report(rows, cols, args.out, "cpu", "SwiGLU with the LoRA terms, pipelined: resources, compiled for sm_90",
                      f"r={args.r}; Triton {triton.__version__}, its bundled ptxas; pointers and integers multiples of 16")
        return 0
    rows = gpu_rows(args.sizes.split(","), args.r, args.rounds, args.calls)
    cols = [("size", "size", ""), ("N", "N", ""), ("I", "I", ""), ("r", "r", ""), ("variant", "variant", ""),
            ("us", "us per call", "{:.1f}"), ("vs_pair", "against kernel + GEMM writing the terms", "{:+.1f}")]
    common.report(rows, cols, args.out, "cuda", "SwiGLU adding the LoRA terms (pipelined) vs kernel + GEMMs",
                  f"bfloat16, r={args.r}; medians of {args.rounds} interleaved CUDA-graph replays of {args.calls} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
