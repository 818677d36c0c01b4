"""Triton kernels for the gated (SwiGLU) activation of a fused LoRA MLP.

Shapes (the plain-PyTorch reference of both functions is in ``lorakit.fused``; GPU tests
compare the two):

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

With LoRA beside W0 (``swiglu_lora_forward`` / ``swiglu_lora_backward``) the fused MLP hands
over the base GEMMs' outputs and the rank-r factors, and the low-rank terms are added here,
per (BM, BN) tile, from registers (tl.dot with K = r):

    g = g0 + sg (x Ag^T) Bg^T      u = u0 + su (x Au^T) Bu^T      (gu0 = [g0 | u0 | x Ag^T | x Au^T])
    dh = dh0 + sd (dY Bd) Ad                                       (backward, optional)

so that neither g|u (N, 2I) nor dh (N, I) takes a pass for the LoRA term: the forward keeps
gu0, and the backward adds the terms again where it reads g and u.
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
def _tile_lowrank(acc, a_ptr, s_a, b_ptr, s_b, rows, cols, mr, mc, R, scale, RP: tl.constexpr,
                  B_ROWS: tl.constexpr, PREC: tl.constexpr):
    """acc (BM, BN) + scale a[rows, :R] b: a (N, R) with row stride s_a (rows int64); b = B^T for
    B (I, R) with row stride s_b (B_ROWS False), or b (R, I) with row stride s_b (B_ROWS True)."""
    k = tl.arange(0, RP)
    mk = k < R
    a = tl.load(a_ptr + rows[:, None] * s_a + k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
    if B_ROWS:
        b = tl.load(b_ptr + k[:, None] * s_b + cols[None, :], mask=mk[:, None] & mc[None, :], other=0.0)
    else:
        b = tl.load(b_ptr + cols[None, :] * s_b + k[:, None], mask=mk[:, None] & mc[None, :], other=0.0)
    return acc + scale * tl.dot(a, b, input_precision=PREC)


@triton.jit
def _gu_tile(gu_ptr, bg_ptr, bu_ptr, rows, cols, mr, mc, I, s_gu, s_bg, s_bu, sg, su, RG, RU,
             RP: tl.constexpr, PREC: tl.constexpr):
    """(g, u) float32 tiles: g0, u0 read from gu0 plus their low-rank terms (x [Ag; Au]^T sits at
    column 2I of gu0)."""
    m = mr[:, None] & mc[None, :]
    off = rows[:, None] * s_gu + cols[None, :]
    g = tl.load(gu_ptr + off, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + off + I, mask=m, other=0.0).to(tl.float32)
    xa = gu_ptr + 2 * I
    g = _tile_lowrank(g, xa, s_gu, bg_ptr, s_bg, rows, cols, mr, mc, RG, sg, RP, False, PREC)
    u = _tile_lowrank(u, xa + RG, s_gu, bu_ptr, s_bu, rows, cols, mr, mc, RU, su, RP, False, PREC)
    return g, u


@triton.jit
def _fwd_lora_kernel(gu_ptr, bg_ptr, bu_ptr, h_ptr, N, I, s_gu, s_bg, s_bu, s_h, sg, su, RG, RU,
                     BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mr, mc = rows < N, cols < I
    g, u = _gu_tile(gu_ptr, bg_ptr, bu_ptr, rows, cols, mr, mc, I, s_gu, s_bg, s_bu, sg, su, RG, RU, RP, PREC)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows[:, None] * s_h + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=mr[:, None] & mc[None, :])


@triton.jit
def _bwd_lora_kernel(dh_ptr, gd_ptr, ad_ptr, gu_ptr, bg_ptr, bu_ptr, dgu_ptr, N, I, s_dh, s_gd, s_ad, s_gu,
                     s_bg, s_bu, s_dgu, sd, sg, su, RD, RG, RU, BM: tl.constexpr, BN: tl.constexpr,
                     RP: tl.constexpr, PREC: tl.constexpr, LORA_GU: tl.constexpr, LORA_DH: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mr, mc = rows < N, cols < I
    m = mr[:, None] & mc[None, :]
    off_dh = rows[:, None] * s_dh + cols[None, :]
    dh = tl.load(dh_ptr + off_dh, mask=m, other=0.0).to(tl.float32)
    if LORA_DH:
        dh = _tile_lowrank(dh, gd_ptr, s_gd, ad_ptr, s_ad, rows, cols, mr, mc, RD, sd, RP, True, PREC)
    if LORA_GU:
        g, u = _gu_tile(gu_ptr, bg_ptr, bu_ptr, rows, cols, mr, mc, I, s_gu, s_bg, s_bu, sg, su, RG, RU, RP, PREC)
    else:
        off = rows[:, None] * s_gu + cols[None, :]
        g = tl.load(gu_ptr + off, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + off + I, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    ty = dgu_ptr.dtype.element_ty
    off = rows[:, None] * s_dgu + cols[None, :]
    tl.store(dgu_ptr + off, (dh * u * s * (1.0 + g * (1.0 - s))).to(ty), mask=m)
    tl.store(dgu_ptr + off + I, (dh * silu).to(ty), mask=m)
    tl.store(dh_ptr + off_dh, (silu * u).to(dh_ptr.dtype.element_ty), mask=m)


_LAUNCHES: dict = {}


def _direct(kernel, n: int, i: int, tensors: tuple[Tensor, ...]):
    """The kernel's launch for these shapes, strides, dtype and alignments (``lorakit.kernels.launch``)."""
    key = launch.key(kernel, (n, i), *tensors)
    run = _LAUNCHES.get(key)
    if run is None:
        run = _LAUNCHES[key] = launch.Direct(kernel, (n, triton.cdiv(i, BLOCK)), dict(BLOCK=BLOCK))
    return run


def swiglu_forward(gu: Tensor) -> Tensor:
    """h = silu(g) * u for gu (N, 2I) with unit column stride; returns h (N, I)."""
    n, two_i = gu.shape
    i = two_i // 2
    h = torch.empty((n, i), dtype=gu.dtype, device=gu.device)
    if n:
        _direct(_fwd_kernel, n, i, (gu, h))(gu, h, i, gu.stride(0), h.stride(0))
    return h


def swiglu_backward(dh: Tensor, gu: Tensor) -> Tensor:
    """Returns dgu (N, 2I) = [dg | du]; overwrites dh (N, I) with h = silu(g) * u."""
    n, two_i = gu.shape
    i = two_i // 2
    dgu = torch.empty((n, two_i), dtype=gu.dtype, device=gu.device)
    if n:
        _direct(_bwd_kernel, n, i, (dh, gu, dgu))(dh, gu, dgu, i, dh.stride(0), gu.stride(0), dgu.stride(0))
    return dgu


# (BM, BN) tiles of the LoRA-aware kernels: 64 x 128 elements, a rank-r dot per tile
BM, BN = 64, 128


def _rank_pad(*rs: int) -> int:
    """The dots' K: the largest rank, at least 16 (tl.dot's minimum), a power of two."""
    return max(16, triton.next_power_of_2(max(rs)))


def _lora_direct(kernel, n: int, i: int, tensors: tuple[Tensor, ...], ranks: tuple[int, ...], **flags):
    key = launch.key(kernel, (n, i, ranks, tuple(flags.items())), *tensors)
    run = _LAUNCHES.get(key)
    if run is None:
        prec = "ieee" if tensors[0].dtype == torch.float32 else "tf32"
        run = _LAUNCHES[key] = launch.Direct(kernel, (triton.cdiv(n, BM), triton.cdiv(i, BN)),
                                             dict(BM=BM, BN=BN, RP=_rank_pad(*ranks), PREC=prec, **flags),
                                             num_warps=8)
    return run


def _unit(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def swiglu_lora_forward(gu: Tensor, bg: Tensor, bu: Tensor, sg: float, su: float) -> Tensor:
    """h = silu(g) * u with g = g0 + sg xag Bg^T, u = u0 + su xau Bu^T, for gu = [g0 | u0 | xag | xau]
    (N, 2I + rg + ru) and Bg (I, rg), Bu (I, ru) in gu's dtype; returns h (N, I)."""
    n = gu.shape[0]
    i, rg = bg.shape
    ru = bu.shape[1]
    bg, bu = _unit(bg), _unit(bu)
    h = torch.empty((n, i), dtype=gu.dtype, device=gu.device)
    if n:
        _lora_direct(_fwd_lora_kernel, n, i, (gu, bg, bu, h), (rg, ru))(
            gu, bg, bu, h, n, i, gu.stride(0), bg.stride(0), bu.stride(0), h.stride(0), sg, su, rg, ru)
    return h


def swiglu_lora_backward(dh: Tensor, gu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor], sg: float, su: float,
                         gd: Optional[Tensor], ad: Optional[Tensor], sd: float) -> Tensor:
    """``swiglu_backward`` with the low-rank terms added where given: dh = dh0 + sd gd Ad for gd
    (N, rd), Ad (rd, I); g and u as ``swiglu_lora_forward`` rebuilds them when Bg, Bu are given
    (gu then holds x [Ag; Au]^T at column 2I), else gu = [g | u] as they are. Returns dgu
    (N, 2I); overwrites dh with h."""
    n = gu.shape[0]
    i = dh.shape[1]
    lora_gu, lora_dh = bg is not None, gd is not None
    bg, bu = (_unit(bg), _unit(bu)) if lora_gu else (dh, dh)
    gd, ad = (_unit(gd), _unit(ad)) if lora_dh else (dh, dh)
    rg, ru = (bg.shape[1], bu.shape[1]) if lora_gu else (0, 0)
    rd = ad.shape[0] if lora_dh else 0
    dgu = torch.empty((n, 2 * i), dtype=gu.dtype, device=gu.device)
    if n:
        _lora_direct(_bwd_lora_kernel, n, i, (dh, gd, ad, gu, bg, bu, dgu), (rd, rg, ru), LORA_GU=lora_gu,
                     LORA_DH=lora_dh)(dh, gd, ad, gu, bg, bu, dgu, n, i, dh.stride(0), gd.stride(0), ad.stride(0),
                                      gu.stride(0), bg.stride(0), bu.stride(0), dgu.stride(0), sd, sg, su, rd, rg, ru)
    return dgu
