"""Can the SwiGLU kernels do the rank-r reductions that read h, so h is read once less? (experiment)

At the 8B shape every site of the fused MLP runs beside W0 (``lorakit.fused.mlp_forms``), and two
rank-r GEMMs there exist only to read h (N, I), the activation:

    forward:   has = h Ad^T                  (N, rd)   a pass over h after the kernel wrote it
    backward:  dAd = sd (dY Bd)^T h          (rd, I)   the kernel writes h (recomputed) for it,
                                                       and the GEMM reads it back

At N = 4096, I = 14336 that is 117 MB read forward and 117 MB written plus read backward, per
layer: about 60-90 us of a layer's MLP, 2-3 ms of the 8B step. The kernels hold h in registers
anyway, so they can feed it to tensor cores themselves:

* forward: programs over ROWS rows x a split of the columns; each loops over its columns in
  BLOCK steps, writes h, and accumulates h_tile (ROWS, BLOCK) @ Ad^T_tile (BLOCK, RP) into a
  float32 (ROWS, RP) accumulator; the splits' partial sums are added afterwards.
* backward: programs over BLOCK columns x a split of the rows; each loops over its rows in
  ROWS steps, writes dg and du, and accumulates gd^T_tile (RP, ROWS) @ h_tile (ROWS, BLOCK)
  (gd = dY Bd) into a float32 (RP, BLOCK) accumulator; h is never written.

RP is the rank padded to 16 (``tl.dot``'s least size); the padded ranks load zeros. Unlike the
earlier designs (``bench/swiglu_lora.py``), the dot's result is never combined with g, u or dh
elementwise: h is the dot's operand, the pattern of an ordinary GEMM's main loop, so g, u and dh
can keep 16-byte loads.

Result (``swiglu_reduce_h200_s13a.md``, ``_s13b.md``): the backward, with dBg = sg dg^T xag and
dBu = su du^T xau folded in too, took 214 us at 8B against 276 us for the plain kernel and the
three GEMMs (1B: 230 against 315 us), and went into the library (``lorakit.kernels.swiglu``). The
forward lost (160 us at best against 122 us): its reduction runs along rows, against the
programs' column blocks. The backward this file times is now the library's kernel
(``_bwd_reduce_kernel`` without its terms); the results above came from the experiment's own
copy, which the library took over (commit 50fc038 and after).

* ``--aot``: no GPU needed. Compiles each configuration for sm_90 and reports registers and
  global loads per thread, against the plain kernels.
* otherwise (CUDA): checks each configuration against a float32 reference, then times it against
  the plain kernel plus the GEMM it replaces, as medians of CUDA-graph replays.

    PYTHONPATH=. python bench/swiglu_reduce.py --aot
    PYTHONPATH=. python bench/swiglu_reduce.py --out bench/results/swiglu_reduce_h200
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
_P, _I, _F = "*bf16", "i32", "fp32"
# the library backward's signature for compile_sm90 (bfloat16 tensors)
BWD_SIG = dict(dh_ptr=_P, gu_ptr=_P, dgu_ptr=_P, gd_ptr=_P, bg_ptr=_P, bu_ptr=_P, ad_ptr=_P, part_ptr="*fp32", N=_I, I=_I,
               s_dh=_I, s_gu=_I, s_dgu=_I, s_gd=_I, s_bg=_I, s_bu=_I, s_ad=_I, rows_per=_I, sd=_F, sg=_F, su=_F,
               RD="constexpr", RG="constexpr", RU="constexpr", RP="constexpr", ROWS="constexpr", BLOCK="constexpr",
               AD="constexpr", DB="constexpr", GU="constexpr", DH="constexpr", PREC="constexpr")
# (ROWS, BLOCK, warps, splits, stages): forward splits the columns, backward the rows
FWD_CONFIGS = [(32, 128, 4, 4, 3), (32, 64, 4, 4, 4), (32, 64, 4, 8, 3), (32, 64, 4, 16, 3), (64, 64, 4, 8, 3),
               (64, 64, 4, 16, 3), (32, 128, 4, 8, 3), (64, 128, 8, 8, 3), (16, 64, 4, 16, 3)]
BWD_CONFIGS = [(32, 64, 4, 8, 3), (64, 64, 4, 4, 3), (32, 64, 4, 4, 3), (64, 64, 4, 8, 3), (32, 64, 4, 16, 3),
               (16, 64, 4, 8, 3), (32, 128, 4, 8, 3), (64, 128, 8, 8, 3), (32, 64, 4, 8, 4), (32, 64, 4, 8, 2),
               (64, 64, 8, 4, 3), (64, 64, 8, 8, 3), (32, 128, 8, 8, 3), (32, 64, 8, 8, 3)]


if triton is not None:
    @triton.jit
    def _fwd_kernel(gu_ptr, h_ptr, ad_ptr, part_ptr, N, I, s_gu, s_h, s_ad, cols_per,
                    R: tl.constexpr, RP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """h = silu(g) u for ROWS rows over columns [split * cols_per, +cols_per), and
        part[split, rows, :] = h[rows, cols] Ad^T[cols, :] (float32)."""
        sp = tl.program_id(1)
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        mr = rows < N
        kk = tl.arange(0, RP)
        mk = kk < R
        acc = tl.zeros((ROWS, RP), dtype=tl.float32)
        c0 = sp * cols_per
        c1 = tl.minimum(c0 + cols_per, I)
        for c in range(0, cols_per, BLOCK):
            cols = c0 + c + tl.arange(0, BLOCK)
            mc = cols < c1
            m = mr[:, None] & mc[None, :]
            o = rows[:, None] * s_gu + cols[None, :]
            g = tl.load(gu_ptr + o, mask=m, other=0.0).to(tl.float32)
            u = tl.load(gu_ptr + o + I, mask=m, other=0.0).to(tl.float32)
            h = (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + rows[:, None] * s_h + cols[None, :], h, mask=m)
            at = tl.load(ad_ptr + kk[None, :] * s_ad + cols[:, None], mask=mk[None, :] & mc[:, None], other=0.0)
            acc = tl.dot(h, at, acc)
        tl.store(part_ptr + (sp * N + rows[:, None]) * RP + kk[None, :], acc, mask=mr[:, None])


def forward(gu, ad, cfg):
    """(h (N, I), h Ad^T (N, r)) for gu = [g | u] (N, 2I) and Ad (r, I) (the kernel)."""
    from lorakit.kernels.swiglu import _rp
    rows, block, warps, splits, stages = cfg
    n, i, r = gu.shape[0], ad.shape[1], ad.shape[0]
    rp = _rp(r)
    h = torch.empty((n, i), dtype=gu.dtype, device=gu.device)
    per = triton.cdiv(triton.cdiv(i, splits), block) * block
    part = torch.empty((splits, n, rp), dtype=torch.float32, device=gu.device)
    _fwd_kernel[(triton.cdiv(n, rows), splits)](gu, h, ad, part, n, i, gu.stride(0), h.stride(0), ad.stride(0), per,
                                                R=r, RP=rp, ROWS=rows, BLOCK=block, num_warps=warps, num_stages=stages)
    has = (part[0] if splits == 1 else part.sum(0))[:, :r].to(gu.dtype)
    return h, has


def backward(dh, gu, gd, sd, cfg, rg=0, sg=1.0, su=1.0):
    """([dg | du] (N, 2I), sd gd^T h (rd, I)), and with ``rg`` (gu then [g | u | xag | xau]) also
    dBg = sg dg^T xag (I, rg) and dBu = su du^T xau (I, ru): the library's ``swiglu_backward_reduce``
    (no terms) in configuration ``cfg``; dh is not modified."""
    from lorakit.kernels import swiglu
    out = swiglu.swiglu_backward_reduce(dh, gu, gd, sd, rg, sg, su, rg > 0, cfg=cfg)
    return out if rg else out[:2]


def reference(gu, ad, dh, gd, sd, rg=0, sg=1.0, su=1.0):
    """(h, h Ad^T, [dg | du], sd gd^T h[, dBg, dBu]) in float32, h, dg and du rounded to gu's dtype
    as the kernels round them before their dots."""
    i = ad.shape[1]
    g, u = gu[:, :i].float(), gu[:, i:2 * i].float()
    s = torch.sigmoid(g)
    h = (g * s * u).to(gu.dtype).float()
    d = dh.float()
    dgu = torch.cat([d * u * s * (1 + g * (1 - s)), d * g * s], dim=1)
    out = (h, h @ ad.float().t(), dgu, sd * gd.float().t() @ h)
    if not rg:
        return out
    xa, dgr = gu[:, 2 * i:].float(), dgu.to(gu.dtype).float()
    return out + (sg * dgr[:, :i].t() @ xa[:, :rg], su * dgr[:, i:].t() @ xa[:, rg:])


def inputs(n, i, r, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, device=device, generator=g) * std).to(dtype)
    return dict(gu=rnd(n, 2 * i + 2 * r, std=2.0), dh=rnd(n, i), gd=rnd(n, r), ad=rnd(r, i, std=0.3))


def check(n, i, r, device, dtype, fcfgs, bcfgs, tol):
    """Largest relative error (Frobenius) of every output of every configuration against ``reference``."""
    t = inputs(n, i, r, device, dtype)
    want = reference(t["gu"], t["ad"], t["dh"], t["gd"], 0.5, r, 0.7, 1.3)
    gu2 = t["gu"][:, :2 * i]
    worst = 0.0
    for cfg in fcfgs:
        got = forward(gu2, t["ad"], cfg)
        for a, b in zip(got, want[:2]):
            worst = max(worst, ((a.float() - b).norm() / b.norm()).item())
    for cfg in bcfgs:
        dh = t["dh"].clone()
        got = backward(dh, gu2, t["gd"], 0.5, cfg) + backward(dh, t["gu"], t["gd"], 0.5, cfg, r, 0.7, 1.3)
        assert torch.equal(dh, t["dh"])
        for a, b in zip(got, want[2:4] + want[2:]):
            worst = max(worst, ((a.float() - b).norm() / b.norm()).item())
    assert worst < tol, worst
    return worst


def aot_rows(r: int) -> list[dict]:
    """Registers, stack and global loads per thread of each configuration, compiled for sm_90 here."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from swiglu_lora import compile_sm90
    from lorakit.kernels import swiglu
    i32, b16 = "i32", "*bf16"
    plain_f = dict(gu_ptr=b16, h_ptr=b16, I=i32, s_gu=i32, s_h=i32, BLOCK="constexpr")
    plain_b = dict(dh_ptr=b16, gu_ptr=b16, dgu_ptr=b16, I=i32, s_dh=i32, s_gu=i32, s_dgu=i32, BLOCK="constexpr")
    fwd = dict(gu_ptr=b16, h_ptr=b16, ad_ptr=b16, part_ptr="*fp32", N=i32, I=i32, s_gu=i32, s_h=i32, s_ad=i32,
               cols_per=i32, R="constexpr", RP="constexpr", ROWS="constexpr", BLOCK="constexpr")
    rows = [dict(kernel="plain fwd", config="1 x 1024, 4 warps",
                 **compile_sm90(swiglu._fwd_kernel, plain_f, dict(BLOCK=swiglu.BLOCK), 4, range(5))),
            dict(kernel="plain bwd", config="1 x 1024, 4 warps",
                 **compile_sm90(swiglu._bwd_kernel, plain_b, dict(BLOCK=swiglu.BLOCK), 4, range(7)))]
    for kernel, fn, sig, cfgs, n_aligned, extra in (
            ("reduce fwd", _fwd_kernel, fwd, FWD_CONFIGS, 10, dict(R=r)),
            ("reduce bwd", swiglu._bwd_reduce_kernel, BWD_SIG, BWD_CONFIGS, 18,
             dict(RD=r, RG=r, RU=r, AD=True, DB=False, GU=False, DH=False, PREC="tf32")),
            ("reduce bwd + dB", swiglu._bwd_reduce_kernel, BWD_SIG, BWD_CONFIGS, 18,
             dict(RD=r, RG=r, RU=r, AD=True, DB=True, GU=False, DH=False, PREC="tf32"))):
        for rows_, block, warps, splits, stages in cfgs:
            cex = dict(RP=swiglu._rp(r), ROWS=rows_, BLOCK=block, **extra)
            rows.append(dict(kernel=kernel, config=f"{rows_} x {block}, {warps} warps, {stages} stages",
                             **compile_sm90(fn, sig, cex, warps, range(n_aligned), stages)))
    for row in rows:
        print(f"{row['kernel']:<15} {row['config']:<30} registers {row['registers']:>3}  stack {row['stack']:>5}  "
              f"global loads {row['loads']:>4} (16-byte {row['loads_16B']}), 16-byte cp.async {row['async_16B']}", flush=True)
    return rows


def _plain_bwd(swiglu, dh, gu, gd, rg=0):
    """What the library ran before: the plain kernel (h written over a copy of dh), then sd gd^T h,
    and with ``rg`` (gu = [g | u | xag | xau]) the two dB GEMMs reading dg and du."""
    i = dh.shape[1]
    h = dh.clone()
    dgu = swiglu.swiglu_backward(h, gu[:, :2 * i])
    dad = torch.addmm(h[:gd.shape[1]], gd.t(), h, beta=0, alpha=0.5)
    if not rg:
        return dad
    xas = gu[:, 2 * i:]
    return (dad, torch.addmm(dgu[:, :rg], dgu[:, :i].t(), xas[:, :rg], beta=0, alpha=0.7),
            torch.addmm(dgu[:, :rg], dgu[:, i:].t(), xas[:, rg:], beta=0, alpha=1.3))


def gpu_rows(sizes: list[str], r: int, rounds: int, calls: int) -> list[dict]:
    """Correctness against ``reference``, then medians of CUDA-graph replays per call."""
    from lorakit.kernels import swiglu
    rows = []
    for size in sizes:
        n, i = SHAPES[size]
        err = check(n, i, r, "cuda", torch.bfloat16, FWD_CONFIGS, BWD_CONFIGS, 1e-2)
        print(f"{size}: worst relative error {err:.2e}", flush=True)
        t = inputs(n, i, r, "cuda")
        gu, ad, gd = t["gu"][:, :2 * i], t["ad"], t["gd"]
        h = swiglu.swiglu_forward(gu)
        fns = {"plain fwd": lambda: swiglu.swiglu_forward(gu),
               "plain fwd + h Ad^T": lambda: torch.mm(swiglu.swiglu_forward(gu), ad.t()),
               "GEMM h Ad^T": lambda: torch.mm(h, ad.t()),
               "plain bwd": lambda: swiglu.swiglu_backward(t["dh"].clone(), gu),
               "plain bwd + gd^T h": lambda: _plain_bwd(swiglu, t["dh"], gu, gd),
               "plain bwd + gd^T h + dB GEMMs": lambda: _plain_bwd(swiglu, t["dh"], t["gu"], gd, r),
               "GEMM gd^T h": lambda: torch.mm(gd.t(), h),
               "clone of dh": lambda: t["dh"].clone()}
        for cfg in FWD_CONFIGS:
            fns[f"reduce fwd {cfg}"] = lambda cfg=cfg: forward(gu, ad, cfg)
        for cfg in BWD_CONFIGS:
            fns[f"reduce bwd {cfg}"] = lambda cfg=cfg: backward(t["dh"], gu, gd, 0.5, cfg)
            fns[f"reduce bwd + dB {cfg}"] = lambda cfg=cfg: backward(t["dh"], t["gu"], gd, 0.5, cfg, r, 0.7, 1.3)
        med = {k: ms * 1e3 for k, ms in common.graph_times(fns, rounds, calls).items()}
        clone = med.pop("clone of dh")
        for k in ("plain bwd", "plain bwd + gd^T h", "plain bwd + gd^T h + dB GEMMs"):
            med[k] -= clone                                 # the benchmark's copy of dh, not the kernel's work
        for k, us in med.items():
            base = med["plain fwd + h Ad^T" if "fwd" in k else
                       "plain bwd + gd^T h + dB GEMMs" if "dB" in k else "plain bwd + gd^T h"]
            rows.append(dict(size=size, N=n, I=i, r=r, variant=k, us=us, vs_plain_pair=us - base))
            print(f"{size} {k:<34} {us:8.1f} us  ({us - base:+.1f} against plain kernel + GEMM)", flush=True)
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
        raise SystemExit("bench/swiglu_reduce.py needs Triton")
    if args.aot:
        rows = aot_rows(args.r)
        cols = [("kernel", "kernel", ""), ("config", "rows x columns, warps", ""), ("registers", "registers", ""),
                ("stack", "stack bytes", ""), ("loads", "global loads / thread", ""), ("loads_16B", "of them 16-byte", ""), ("async_16B", "16-byte cp.async", "")]
        common.report(rows, cols, args.out, "cpu", "SwiGLU with the h reductions: resources, compiled for sm_90",
                      f"r={args.r}; Triton {triton.__version__}, its bundled ptxas; pointers and integers multiples of 16")
        return 0
    rows = gpu_rows(args.sizes.split(","), args.r, args.rounds, args.calls)
    cols = [("size", "size", ""), ("N", "N", ""), ("I", "I", ""), ("r", "r", ""), ("variant", "variant", ""),
            ("us", "us per call", "{:.1f}"), ("vs_plain_pair", "against plain kernel + GEMM", "{:+.1f}")]
    common.report(rows, cols, args.out, "cuda", "SwiGLU doing the h reductions vs the plain kernel + cuBLAS",
                  f"bfloat16, r={args.r}; medians of {args.rounds} interleaved CUDA-graph replays of {args.calls} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
