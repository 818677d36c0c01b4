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
import functools
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
# ``--bwd-only``: the backward with every term (what both shapes run since DH_VIA_GU) in the library's
# row-major kernel (``_bwd_reduce_kernel``), ROW_CONFIGS: tiles, stages and row splits (the grid is
# I / BLOCK x splits programs, about 3 per SM: the splits set how full the last wave runs); with
# ``--transposed`` also the transposed kernel (``_transposed_kernel``, T_CONFIGS: 8 warps only with 128
# columns, where 64 would replicate the wgmma's rows)
ROW_CONFIGS = [(32, 64, 4, 8, 3), (64, 64, 4, 4, 3), (16, 64, 4, 8, 3), (32, 64, 4, 8, 4), (64, 64, 4, 8, 3),
               (32, 64, 4, 3, 3), (32, 64, 4, 6, 3), (32, 64, 4, 7, 3), (32, 64, 4, 9, 3), (32, 64, 4, 12, 3),
               (32, 64, 4, 8, 2), (32, 64, 4, 6, 2), (32, 32, 2, 8, 3), (32, 32, 2, 6, 3), (64, 64, 4, 6, 3)]
T_CONFIGS = [(32, 64, 4, 8, 3), (32, 64, 4, 8, 2), (32, 64, 4, 8, 4), (64, 64, 4, 4, 3), (64, 64, 4, 8, 3),
             (16, 64, 4, 8, 3), (32, 128, 8, 4, 3), (32, 128, 8, 8, 3), (64, 128, 8, 4, 3), (16, 128, 8, 8, 3),
             (32, 32, 2, 8, 3), (32, 64, 4, 16, 3), (64, 64, 4, 4, 2), (32, 128, 4, 8, 3)]


@functools.cache
def _transposed_kernel():
    """The experiment ``--bwd-only`` compares (s15a: slower in every configuration, so the library
    keeps its row-major kernel; see ``swiglu_bwd_h200_s15a.md``)."""
    @triton.jit
    def _bwd_reduce_t_kernel(dh_ptr, gu_ptr, dgu_ptr, gd_ptr, bg_ptr, bu_ptr, ad_ptr, part_ptr, N, I, s_dh, s_gu, s_dgu,
                             s_gd, s_bg, s_bu, s_ad, rows_per, sd, sg, su, RD: tl.constexpr, RG: tl.constexpr,
                             RU: tl.constexpr, RP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                             AD: tl.constexpr, DB: tl.constexpr, GU: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr):
        """The library's ``_bwd_reduce_kernel`` (``lorakit.kernels.swiglu``) on transposed tiles, (BLOCK
        columns, ROWS rows), so that h, dg and du, computed in the accumulator layout of the dots that rebuild g, u and dh, are the *first* operand
        of the reductions (part^T (BLOCK, RP) += h^T (BLOCK, ROWS) gd (ROWS, RP)), whose K runs along the
        accumulator's second dimension: they stay in registers (the flash-attention P V pattern), where
        as the second operand (part (RP, BLOCK) += gd^T h) each went through shared memory every row
        tile. Every small operand is loaded through its own pointer in the layout its dot reads, so the
        pipeliner streams them all (a ``tl.trans`` of a loaded tile is a synchronous load)."""
        sp = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mc = cols < I
        kk = tl.arange(0, RP)
        mg = kk < RG
        mu = kk < RU
        md = kk < RD
        if GU:                                                                  # Bg, Bu (BLOCK, RP), once
            bgt = tl.load(bg_ptr + cols[:, None] * s_bg + kk[None, :], mask=mc[:, None] & mg[None, :], other=0.0)
            but = tl.load(bu_ptr + cols[:, None] * s_bu + kk[None, :], mask=mc[:, None] & mu[None, :], other=0.0)
        if DH:                                                                  # Ad^T (BLOCK, RP), once
            adt = tl.load(ad_ptr + kk[None, :] * s_ad + cols[:, None], mask=mc[:, None] & md[None, :], other=0.0)
        acc_d = tl.zeros((BLOCK, RP), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK, RP), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK, RP), dtype=tl.float32)
        r0 = sp * rows_per
        r1 = tl.minimum(r0 + rows_per, N)
        ty = dgu_ptr.dtype.element_ty
        for r in range(0, rows_per, ROWS):
            rows = (r0 + r + tl.arange(0, ROWS)).to(tl.int64)
            mr = rows < r1
            m = mc[:, None] & mr[None, :]                                       # (BLOCK, ROWS)
            o = rows[None, :] * s_gu + cols[:, None]
            g = tl.load(gu_ptr + o, mask=m, other=0.0).to(tl.float32)          # g^T, u^T (BLOCK, ROWS)
            u = tl.load(gu_ptr + o + I, mask=m, other=0.0).to(tl.float32)
            xat = gu_ptr + rows[None, :] * s_gu + 2 * I + kk[:, None]          # xag^T, xau^T (RP, ROWS)
            xar = gu_ptr + rows[:, None] * s_gu + 2 * I + kk[None, :]          # xag, xau (ROWS, RP)
            if GU:
                g += sg * tl.dot(bgt, tl.load(xat, mask=mg[:, None] & mr[None, :], other=0.0), input_precision=PREC)
                u += su * tl.dot(but, tl.load(xat + RG, mask=mu[:, None] & mr[None, :], other=0.0),
                                 input_precision=PREC)
            dh = tl.load(dh_ptr + rows[None, :] * s_dh + cols[:, None], mask=m, other=0.0).to(tl.float32)
            gdp = gd_ptr + rows[None, :] * s_gd + kk[:, None]                   # gd^T (RP, ROWS)
            if DH:
                dh += sd * tl.dot(adt, tl.load(gdp, mask=md[:, None] & mr[None, :], other=0.0), input_precision=PREC)
            s = tl.sigmoid(g)
            silu = g * s
            dg = (dh * u * s * (1.0 + g * (1.0 - s))).to(ty)
            du = (dh * silu).to(ty)
            od = rows[None, :] * s_dgu + cols[:, None]
            tl.store(dgu_ptr + od, dg, mask=m)
            tl.store(dgu_ptr + od + I, du, mask=m)
            if AD:
                gdr = tl.load(gd_ptr + rows[:, None] * s_gd + kk[None, :], mask=mr[:, None] & md[None, :], other=0.0)
                acc_d = tl.dot((silu * u).to(ty), gdr, acc_d, input_precision=PREC)
            if DB:
                acc_g = tl.dot(dg, tl.load(xar, mask=mr[:, None] & mg[None, :], other=0.0), acc_g, input_precision=PREC)
                acc_u = tl.dot(du, tl.load(xar + RG, mask=mr[:, None] & mu[None, :], other=0.0), acc_u,
                               input_precision=PREC)
        out = part_ptr + (sp * 3 * RP + kk[None, :]) * I + cols[:, None]     # part[split, slot] (RP, I), transposed
        if AD:
            tl.store(out, acc_d * sd, mask=mc[:, None])
        if DB:
            tl.store(out + RP * I, acc_g * sg, mask=mc[:, None])
            tl.store(out + 2 * RP * I, acc_u * su, mask=mc[:, None])

    return _bwd_reduce_t_kernel


def forward(gu, bg, bu, sg, su, cfg):
    """h (N, I) for gu = [g0 | u0 | xag | xau] (N, 2I + rg + ru), Bg (I, rg), Bu (I, ru): the
    library's ``swiglu_forward_terms`` in configuration ``cfg``."""
    from lorakit.kernels import swiglu
    return swiglu.swiglu_forward_terms(gu, bg, bu, sg, su, cfg)


def backward(dh, gu, bg, bu, ad, gd, sg, su, sd, cfg, transposed=False):
    """([dg | du], dAd (rd, I), dBg (I, rg), dBu (I, ru)) with g, u rebuilt as ``forward`` and
    dh = dh0 + sd gd Ad: the library's ``swiglu_backward_reduce`` with every term, configuration ``cfg``,
    in the transposed kernel when ``transposed``."""
    from lorakit.kernels import swiglu
    return swiglu.swiglu_backward_reduce(dh, gu, gd, sd, bg.shape[1], sg, su, True, bg, bu, ad, cfg=cfg,
                                         kernel=_transposed_kernel() if transposed else None)


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


def bwd_rows(sizes: list[str], r: int, rounds: int, calls: int, transposed: bool) -> list[dict]:
    """The backward with every term: each kernel and configuration checked against the float32
    reference, then timed against the library's default in the same CUDA-graph rounds."""
    from lorakit.kernels import swiglu
    rows = []
    for size in sizes:
        n, i = SHAPES[size]
        t = inputs(n, i, r, "cuda")
        want = reference(t["gu"], t["bg"], t["bu"], t["ad"], t["dh"], t["gd"], 0.7, 1.3, 0.5)[1:]
        args = (t["dh"], t["gu"], t["bg"], t["bu"], t["ad"], t["gd"], 0.7, 1.3, 0.5)
        fns = {"library default": lambda: swiglu.swiglu_backward_reduce(
            t["dh"], t["gu"], t["gd"], 0.5, r, 0.7, 1.3, True, t["bg"], t["bu"], t["ad"])}
        kernels = (("row-major", ROW_CONFIGS, False),) + ((("transposed", T_CONFIGS, True),) if transposed else ())
        for name, cfgs, tr in kernels:
            for cfg in cfgs:
                k = f"{name} {cfg}"
                try:
                    got = backward(*args, cfg, transposed=tr)
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported, not fatal
                    print(f"{size} {k}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                err = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, want))
                print(f"{size} {k}: relative error {err:.1e}", flush=True)
                assert err < 1e-2, (k, err)
                fns[k] = lambda cfg=cfg, tr=tr: backward(*args, cfg, transposed=tr)
        med = {k: ms * 1e3 for k, ms in common.graph_times(fns, rounds, calls).items()}
        for k, us in med.items():
            gbs = 5 * n * i * t["gu"].element_size() / (us * 1e-6) / 1e12
            rows.append(dict(size=size, N=n, I=i, r=r, variant=k, us=us, tbs=gbs, vs_default=us / med["library default"]))
            print(f"{size} {k:<36} {us:8.1f} us  {gbs:4.2f} TB/s  x{us / med['library default']:.3f}", flush=True)
        common.free(t)
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
    p.add_argument("--bwd-only", action="store_true", help="the backward with every term in ROW_CONFIGS")
    p.add_argument("--transposed", action="store_true", help="with --bwd-only: the transposed kernel too (T_CONFIGS)")
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
    if args.bwd_only:
        rows = bwd_rows(args.sizes.split(","), args.r, args.rounds, args.calls, args.transposed)
        cols = [("size", "size", ""), ("N", "N", ""), ("I", "I", ""), ("r", "r", ""), ("variant", "kernel (ROWS, BLOCK, warps, splits, stages)", ""),
                ("us", "us per call", "{:.1f}"), ("tbs", "TB/s (dh, g, u read, dg, du written)", "{:.2f}"),
                ("vs_default", "x library default", "{:.3f}")]
        common.report(rows, cols, args.out, "cuda", "SwiGLU backward with the LoRA terms: row-major vs transposed tiles",
                      f"bfloat16, r={args.r}; medians of {args.rounds} interleaved CUDA-graph replays of {args.calls} calls")
        return 0
    rows = gpu_rows(args.sizes.split(","), args.r, args.rounds, args.calls)
    cols = [("size", "size", ""), ("N", "N", ""), ("I", "I", ""), ("r", "r", ""), ("variant", "variant", ""),
            ("us", "us per call", "{:.1f}"), ("vs_pair", "against kernel + GEMM writing the terms", "{:+.1f}")]
    common.report(rows, cols, args.out, "cuda", "SwiGLU adding the LoRA terms (pipelined) vs kernel + GEMMs",
                  f"bfloat16, r={args.r}; medians of {args.rounds} interleaved CUDA-graph replays of {args.calls} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
