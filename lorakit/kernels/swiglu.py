"""Triton kernels for the gated (SwiGLU) activation of a fused LoRA MLP.

Shapes (the plain-PyTorch references of every function are in ``lorakit.activation``; GPU
tests compare the two):

    gu   (N, 2I)  the gate and up projections side by side: g = gu[:, :I], u = gu[:, I:]
    h    (N, I)   the activation: h = silu(g) * u = g sigmoid(g) u
    dh   (N, I)   the gradient reaching h
    dgu  (N, 2I)  the gradients of g and u side by side

Forward:  h = g s u,                      s = sigmoid(g)
Backward: du = dh g s
          dg = dh u s (1 + g (1 - s))     (d/dg of g sigmoid(g))
          and h recomputed (the fused MLP keeps g and u, not h), written over dh.

Everything is computed in float32 and rounded once to the storage dtype. One program per
(row, block of BLOCK columns); each element is read once and written once.

``swiglu_backward_reduce`` is the backward that also does the rank-r reductions of the fused
MLP's backward that read h, dg or du, so that h is never written and dg, du are not read again:

    dAd   = sd gd^T h      (rd, I)   gd = dY Bd (N, rd)
    dBg^T = sg xag^T dg    (rg, I)   xag = x Ag^T, xau = x Au^T: the columns gu keeps after [g | u]
    dBu^T = su xau^T du    (ru, I)

Programs over BLOCK columns x a split of the rows loop over their rows ROWS at a time and feed
the tiles of h, dg and du (rounded to the storage dtype, as the GEMMs they replace read them) to
``tl.dot`` against the (RP, ROWS) tiles of gd^T, xag^T and xau^T, accumulating in float32; the
splits' partial sums are added afterwards. Its configuration was chosen on the H200
(``bench/swiglu_reduce.py``, ``swiglu_reduce_h200_s13b.md``): at the 8B shape it takes 214 us
against 276 us for the plain kernel and the three GEMMs, at the 1B shape 230 against 315 us.
In a loop whose loads feed ``tl.dot`` Triton pipelines them through shared memory (16-byte
``cp.async``), which keeps the elementwise tiles' loads wide (``bench/swiglu_reduce.py --aot``).

``swiglu_forward_terms`` and the backward's GU / DH flags add the LoRA terms of the MLP's sites
beside W0 in the same shape, so the GEMMs write x Wg^T, x Wu^T and dY Wd alone:

    g = g0 + sg xag Bg^T     u = u0 + su xau Bu^T     (forward; rebuilt the same way in backward)
    dh = dh0 + sd gd Ad                               (backward)

in float32, never rounded; each program loads its (RP, BLOCK) tiles of Bg^T, Bu^T and Ad once.
The backward with dh's term alone runs the GU path with zero B's (``DH_VIA_GU``): dh's term comes
out of ``tl.dot`` in the dot's register layout, and g, u rebuilt by dots share it, where g, u as
loaded would be converted every row tile (1B shape: 232 against 264 us; 201-210 us since gd^T loads
through its own pointer, ``swiglu_bwd_h200_s15a.md``, ``_s15b.md``).
At the 8B shape: forward 124 us against 176 us for the plain kernel and the GEMMs writing the
terms; backward 211 us against 253 us (``bench/swiglu_terms.py``, ``swiglu_terms_h200.md``;
187-189 us since gd^T loads through its own pointer).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch

BLOCK = 1024


@triton.jit
def _fwd_kernel(gu_ptr, h_ptr, I, s_gu, s_h, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = col < I
    g = tl.load(gu_ptr + row * s_gu + col, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * s_gu + I + col, mask=m, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + row * s_h + col, h.to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(dh_ptr, gu_ptr, dgu_ptr, I, s_dh, s_gu, s_dgu, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = col < I
    dh = tl.load(dh_ptr + row * s_dh + col, mask=m, other=0.0).to(tl.float32)
    g = tl.load(gu_ptr + row * s_gu + col, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * s_gu + I + col, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dg = dh * u * s * (1.0 + g * (1.0 - s))
    du = dh * silu
    ty = dgu_ptr.dtype.element_ty
    tl.store(dgu_ptr + row * s_dgu + col, dg.to(ty), mask=m)
    tl.store(dgu_ptr + row * s_dgu + I + col, du.to(ty), mask=m)
    tl.store(dh_ptr + row * s_dh + col, (silu * u).to(dh_ptr.dtype.element_ty), mask=m)


@triton.jit
def _b_tile(b_ptr, s_b, cols, mc, R: tl.constexpr, RP: tl.constexpr):
    """B^T[:, cols] as an (RP, BLOCK) tile for B (I, R) with row stride s_b; ranks past R zero."""
    kk = tl.arange(0, RP)
    return tl.load(b_ptr + cols[None, :] * s_b + kk[:, None], mask=(kk < R)[:, None] & mc[None, :], other=0.0)


@triton.jit
def _load_gu(gu_ptr, rows, cols, mr, m, I, s_gu, sg, su, btg, btu, RG: tl.constexpr, RU: tl.constexpr,
             RP: tl.constexpr, GU: tl.constexpr, PREC: tl.constexpr):
    """(g, u) of a (ROWS, BLOCK) tile in float32: as stored, or with GU g0 + sg xag Bg^T and
    u0 + su xau Bu^T (gu = [g0 | u0 | xag | xau]; btg, btu: the B^T tiles)."""
    o = rows[:, None] * s_gu + cols[None, :]
    g = tl.load(gu_ptr + o, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + o + I, mask=m, other=0.0).to(tl.float32)
    if GU:
        kk = tl.arange(0, RP)
        xa = gu_ptr + rows[:, None] * s_gu + 2 * I + kk[None, :]
        xag = tl.load(xa, mask=mr[:, None] & (kk < RG)[None, :], other=0.0)
        xau = tl.load(xa + RG, mask=mr[:, None] & (kk < RU)[None, :], other=0.0)
        g += sg * tl.dot(xag, btg, input_precision=PREC)
        u += su * tl.dot(xau, btu, input_precision=PREC)
    return g, u


@triton.jit
def _fwd_terms_kernel(gu_ptr, bg_ptr, bu_ptr, h_ptr, N, I, s_gu, s_bg, s_bu, s_h, rows_per, sg, su,
                      RG: tl.constexpr, RU: tl.constexpr, RP: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK: tl.constexpr, PREC: tl.constexpr):
    """h = silu(g) u with g = g0 + sg xag Bg^T, u = u0 + su xau Bu^T, for BLOCK columns over rows
    [split * rows_per, +rows_per); the B^T tiles are loaded once per program."""
    sp = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mc = cols < I
    btg = _b_tile(bg_ptr, s_bg, cols, mc, RG, RP)
    btu = _b_tile(bu_ptr, s_bu, cols, mc, RU, RP)
    r0 = sp * rows_per
    r1 = tl.minimum(r0 + rows_per, N)
    for r in range(0, rows_per, ROWS):
        rows = (r0 + r + tl.arange(0, ROWS)).to(tl.int64)
        mr = rows < r1
        m = mr[:, None] & mc[None, :]
        g, u = _load_gu(gu_ptr, rows, cols, mr, m, I, s_gu, sg, su, btg, btu, RG, RU, RP, True, PREC)
        tl.store(h_ptr + rows[:, None] * s_h + cols[None, :], (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty),
                 mask=m)


@triton.jit
def _bwd_reduce_kernel(dh_ptr, gu_ptr, dgu_ptr, gd_ptr, bg_ptr, bu_ptr, ad_ptr, part_ptr, N, I, s_dh, s_gu, s_dgu,
                       s_gd, s_bg, s_bu, s_ad, rows_per, sd, sg, su, RD: tl.constexpr, RG: tl.constexpr,
                       RU: tl.constexpr, RP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                       AD: tl.constexpr, DB: tl.constexpr, GU: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr):
    """[dg | du] for BLOCK columns over rows [split * rows_per, +rows_per), and in float32, for the
    split's rows, part[split, 0] = sd gd^T h (AD), part[split, 1] = sg xag^T dg, part[split, 2] =
    su xau^T du (DB), each (RP, I) with ranks past RD, RG, RU zero. h is not written. With GU, g
    and u are rebuilt as ``_fwd_terms_kernel`` builds them; with DH, dh = dh0 + sd gd Ad."""
    sp = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mc = cols < I
    kk = tl.arange(0, RP)
    btg = None
    btu = None
    adt = None
    if GU:
        btg = _b_tile(bg_ptr, s_bg, cols, mc, RG, RP)
        btu = _b_tile(bu_ptr, s_bu, cols, mc, RU, RP)
    if DH:
        adt = tl.load(ad_ptr + kk[:, None] * s_ad + cols[None, :], mask=(kk < RD)[:, None] & mc[None, :], other=0.0)
    acc_d = tl.zeros((RP, BLOCK), dtype=tl.float32)
    acc_g = tl.zeros((RP, BLOCK), dtype=tl.float32)
    acc_u = tl.zeros((RP, BLOCK), dtype=tl.float32)
    r0 = sp * rows_per
    r1 = tl.minimum(r0 + rows_per, N)
    ty = dgu_ptr.dtype.element_ty
    for r in range(0, rows_per, ROWS):
        rows = (r0 + r + tl.arange(0, ROWS)).to(tl.int64)
        mr = rows < r1
        m = mr[:, None] & mc[None, :]
        g, u = _load_gu(gu_ptr, rows, cols, mr, m, I, s_gu, sg, su, btg, btu, RG, RU, RP, GU, PREC)
        dh = tl.load(dh_ptr + rows[:, None] * s_dh + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gdr = None
        if DH:
            gdr = tl.load(gd_ptr + rows[:, None] * s_gd + kk[None, :], mask=mr[:, None] & (kk < RD)[None, :], other=0.0)
            dh += sd * tl.dot(gdr, adt, input_precision=PREC)
        s = tl.sigmoid(g)
        silu = g * s
        dg = (dh * u * s * (1.0 + g * (1.0 - s))).to(ty)
        du = (dh * silu).to(ty)
        od = rows[:, None] * s_dgu + cols[None, :]
        tl.store(dgu_ptr + od, dg, mask=m)
        tl.store(dgu_ptr + od + I, du, mask=m)
        if AD:
            # gd^T through its own pointer: as tl.trans(gdr) the pipeliner left gd's load synchronous,
            # waited on every row tile (232 -> 201 us at the 1B shape, swiglu_bwd_h200_s15a.md)
            gt = tl.load(gd_ptr + rows[None, :] * s_gd + kk[:, None], mask=(kk < RD)[:, None] & mr[None, :],
                         other=0.0)
            acc_d = tl.dot(gt, (silu * u).to(ty), acc_d, input_precision=PREC)
        if DB:
            xa = gu_ptr + rows[None, :] * s_gu + 2 * I + kk[:, None]
            acc_g = tl.dot(tl.load(xa, mask=(kk < RG)[:, None] & mr[None, :], other=0.0), dg, acc_g,
                           input_precision=PREC)
            acc_u = tl.dot(tl.load(xa + RG, mask=(kk < RU)[:, None] & mr[None, :], other=0.0), du, acc_u,
                           input_precision=PREC)
    out = part_ptr + (sp * 3 * RP + kk[:, None]) * I + cols[None, :]
    if AD:
        tl.store(out, acc_d * sd, mask=mc[None, :])
    if DB:
        tl.store(out + RP * I, acc_g * sg, mask=mc[None, :])
        tl.store(out + 2 * RP * I, acc_u * su, mask=mc[None, :])


# ROWS, BLOCK, warps, most row splits, pipeline stages: the fastest at the 1B and 8B shapes of
# bench/swiglu_reduce.py (REDUCE: the backward without the terms) and bench/swiglu_terms.py
# (with them); a split covers at least SPLIT_ROWS rows
REDUCE = (16, 64, 4, 8, 3)
TERMS_BWD = (32, 64, 4, 8, 3)
TERMS_FWD = (32, 64, 4, 16, 3)
SPLIT_ROWS = 256
MAX_TERMS_RANK = 32         # the terms kernels keep three (RP, BLOCK) factor tiles in registers
DH_VIA_GU = True            # the backward with dh's term alone runs the GU path with zero B's (see there)

_LAUNCHES: dict = {}


def _direct(kernel, n: int, i: int, tensors: tuple[Tensor, ...]):
    """The kernel's launch for these shapes, strides, dtype and alignments (``lorakit.kernels.launch``)."""
    key = launch.key(kernel, (n, i), *tensors)
    run = _LAUNCHES.get(key)
    if run is None:
        run = _LAUNCHES[key] = launch.Direct(kernel, (n, triton.cdiv(i, BLOCK)), dict(BLOCK=BLOCK))
    return run


def _split(n: int, cfg: tuple) -> tuple[int, int]:
    """(row splits, rows per split) for N rows under a (ROWS, BLOCK, warps, most splits, stages) config."""
    rows, most = cfg[0], cfg[3]
    splits = max(1, min(most, triton.cdiv(n, SPLIT_ROWS)))
    return splits, triton.cdiv(triton.cdiv(n, splits), rows) * rows


def _launch(kernel, cfg: tuple, n: int, i: int, ints: tuple, constexprs: dict, tensors: tuple[Tensor, ...]):
    """The ``Direct`` launch of a column-block x row-split kernel (grid (I / BLOCK, splits))."""
    k = launch.key(kernel, (n, i, cfg) + ints + tuple(constexprs.values()), *tensors)
    run = _LAUNCHES.get(k)
    if run is None:
        rows, block, warps, _, stages = cfg
        prec = "ieee" if tensors[0].dtype == torch.float32 else "tf32"
        run = _LAUNCHES[k] = launch.Direct(kernel, (triton.cdiv(i, block), _split(n, cfg)[0]),
                                           dict(**constexprs, ROWS=rows, BLOCK=block, PREC=prec),
                                           num_warps=warps, num_stages=stages)
    return run


def _rp(*ranks: int) -> int:
    return max(16, triton.next_power_of_2(max(ranks)))


def swiglu_forward_terms(gu: Tensor, bg: Tensor, bu: Tensor, sg: float, su: float,
                         cfg: Optional[tuple] = None) -> Tensor:
    """h = silu(g) u (N, I) with g = g0 + sg xag Bg^T and u = u0 + su xau Bu^T, for
    gu = [g0 | u0 | xag | xau] (N, 2I + rg + ru), Bg (I, rg), Bu (I, ru), unit column strides;
    ranks up to ``MAX_TERMS_RANK``. g and u are added in float32 and never rounded. ``cfg``:
    (ROWS, BLOCK, warps, most splits, stages), default ``TERMS_FWD`` (benchmarks sweep it)."""
    cfg = cfg or TERMS_FWD
    i, rg = bg.shape
    ru, n = bu.shape[1], gu.shape[0]
    h = torch.empty((n, i), dtype=gu.dtype, device=gu.device)
    if n:
        _, per = _split(n, cfg)
        run = _launch(_fwd_terms_kernel, cfg, n, i, (per,), dict(RG=rg, RU=ru, RP=_rp(rg, ru)), (gu, bg, bu, h))
        run(gu, bg, bu, h, n, i, gu.stride(0), bg.stride(0), bu.stride(0), h.stride(0), per, float(sg), float(su))
    return h


def swiglu_backward_reduce(dh: Tensor, gu: Tensor, gd: Optional[Tensor], sd: float, rg: int, sg: float, su: float,
                           db: bool, bg: Optional[Tensor] = None, bu: Optional[Tensor] = None,
                           ad: Optional[Tensor] = None, want_ad: bool = True, cfg: Optional[tuple] = None,
                           kernel=None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dgu, dAd, dBg, dBu) for dh (N, I) and gu = [g | u | xag | xau] (N, 2I + rg + ru), unit
    column strides: dgu = [dg | du] (N, 2I); dAd = sd gd^T h (rd, I) when gd (N, rd) is given;
    with ``db`` dBg = sg dg^T xag (I, rg) and dBu = su du^T xau (I, ru), contiguous. With bg and
    bu, gu holds g0 and u0 and g, u are rebuilt as ``swiglu_forward_terms`` builds them; with ad
    (rd, I), dh holds dh0 and dh = dh0 + sd gd Ad (gd required); ``want_ad`` False: no dAd even
    with gd. dh is not modified (h is never written). ``cfg`` as ``swiglu_forward_terms``'s,
    default ``TERMS_BWD`` with the terms and ``REDUCE`` without. ``kernel``: a Triton kernel with
    ``_bwd_reduce_kernel``'s signature and outputs, run in its place (benchmarks try variants)."""
    n, i = dh.shape
    if DH_VIA_GU and ad is not None and bg is None and db and gu.shape[1] > 2 * i:
        # dh's term is a tl.dot result, in the dot's register layout, while g and u load in another:
        # every row tile would convert. Rebuilding g and u through the terms' dots with zero B's
        # (g + sg xag 0 = g exactly) gives all three one layout: 264 -> 232 us at the 1B shape
        # (swiglu_terms_h200_s14e.md: "dh-terms bwd" against "terms bwd")
        zb = torch.zeros((i, gu.shape[1] - 2 * i), dtype=gu.dtype, device=gu.device)
        bg, bu = zb[:, :rg], zb[:, rg:]
    terms = bg is not None
    ru = gu.shape[1] - 2 * i - rg if db or terms else 0
    rd = gd.shape[1] if gd is not None else 0
    dgu = torch.empty((n, 2 * i), dtype=gu.dtype, device=gu.device)
    need_ad = gd is not None and want_ad
    if n == 0:
        z = torch.zeros
        return (dgu, z((rd, i), dtype=gu.dtype, device=gu.device) if need_ad else None,
                *((z((i, rg), dtype=gu.dtype, device=gu.device), z((i, ru), dtype=gu.dtype, device=gu.device))
                  if db else (None, None)))
    rgk = rg if db or terms else 0
    rp = _rp(rd, rgk, ru)
    g = gd if gd is not None else dh
    b0 = bg if terms else dh
    b1 = bu if terms else dh
    a0 = ad if ad is not None else dh
    cfg = cfg or (TERMS_BWD if terms else REDUCE)
    splits, per = _split(n, cfg)
    run = _launch(kernel or _bwd_reduce_kernel, cfg, n, i, (per,),
                  dict(RD=rd, RG=rgk, RU=ru, RP=rp, AD=need_ad, DB=db, GU=terms, DH=ad is not None),
                  (dh, gu, dgu, g, b0, b1, a0))
    part = torch.empty((splits, 3, rp, i), dtype=torch.float32, device=gu.device)
    run(dh, gu, dgu, g, b0, b1, a0, part, n, i, dh.stride(0), gu.stride(0), dgu.stride(0), g.stride(0),
        b0.stride(0), b1.stride(0), a0.stride(0), per, float(sd), float(sg), float(su))
    if not (need_ad or db):
        return dgu, None, None, None
    first = 0 if need_ad else 1                                             # the slots the kernel wrote
    tot = part[:, first:3 if db else 1].sum(0)                              # over the row splits
    dad = tot[0, :rd].to(gu.dtype) if need_ad else None
    if not db:
        return dgu, dad, None, None
    return dgu, dad, _transposed(tot[1 - first, :rg], gu.dtype), _transposed(tot[2 - first, :ru], gu.dtype)


def _transposed(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t^T, contiguous, in ``dtype`` (one copy)."""
    return torch.empty((t.shape[1], t.shape[0]), dtype=dtype, device=t.device).copy_(t.t())


def swiglu_forward(gu: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """h = silu(g) * u for gu (N, 2I) with unit column stride; returns h (N, I), written into
    ``out`` when given (unit column stride; a column slice of a wider buffer is fine)."""
    n, two_i = gu.shape
    i = two_i // 2
    h = torch.empty((n, i), dtype=gu.dtype, device=gu.device) if out is None else out
    if n:
        _direct(_fwd_kernel, n, i, (gu, h))(gu, h, i, gu.stride(0), h.stride(0))
    return h


def swiglu_backward(dh: Tensor, gu: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Returns dgu (N, 2I) = [dg | du] (written into ``out`` when given, unit column stride);
    overwrites dh (N, I) with h = silu(g) * u."""
    n, two_i = gu.shape
    i = two_i // 2
    dgu = torch.empty((n, two_i), dtype=gu.dtype, device=gu.device) if out is None else out
    if n:
        _direct(_bwd_kernel, n, i, (dh, gu, dgu))(dh, gu, dgu, i, dh.stride(0), gu.stride(0), dgu.stride(0))
    return dgu
