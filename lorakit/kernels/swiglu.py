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
per (BM, BN) tile, from registers (r outer products in float32):

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
def _lowrank(acc, a_ptr, s_a, bt_ptr, s_bt, rows, cols, mr, mc, scale, R: tl.constexpr):
    """acc (BM, BN) + scale a[rows, :R] bt[:R, cols], as R outer products in float32 registers
    (no tensor-core layouts: every tile stays in the elementwise layout of its loads).
    a: (N, >= R) with row stride s_a; bt: (R, I) with row stride s_bt, unit column stride."""
    lr = tl.zeros_like(acc)
    for k in tl.static_range(R):
        av = tl.load(a_ptr + rows * s_a + k, mask=mr, other=0.0).to(tl.float32)
        bv = tl.load(bt_ptr + k * s_bt + cols, mask=mc, other=0.0).to(tl.float32)
        lr += av[:, None] * bv[None, :]
    return acc + scale * lr


@triton.jit
def _gu_tile(gu_ptr, bt_ptr, rows, cols, mr, mc, I, s_gu, s_bt, sg, su, RG: tl.constexpr, RU: tl.constexpr):
    """(g, u) float32 tiles: g0, u0 read from gu0 plus their low-rank terms. x [Ag; Au]^T sits at
    column 2I of gu0; bt = [Bg^T; Bu^T] (RG + RU, I)."""
    m = mr[:, None] & mc[None, :]
    off = rows[:, None] * s_gu + cols[None, :]
    g = tl.load(gu_ptr + off, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + off + I, mask=m, other=0.0).to(tl.float32)
    xa = gu_ptr + 2 * I
    g = _lowrank(g, xa, s_gu, bt_ptr, s_bt, rows, cols, mr, mc, sg, RG)
    u = _lowrank(u, xa + RG, s_gu, bt_ptr + RG * s_bt, s_bt, rows, cols, mr, mc, su, RU)
    return g, u


@triton.jit
def _fwd_lora_kernel(gu_ptr, bt_ptr, h_ptr, N, I, s_gu, s_bt, s_h, sg, su,
                     RG: tl.constexpr, RU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mr, mc = rows < N, cols < I
    g, u = _gu_tile(gu_ptr, bt_ptr, rows, cols, mr, mc, I, s_gu, s_bt, sg, su, RG, RU)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows[:, None] * s_h + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=mr[:, None] & mc[None, :])


@triton.jit
def _bwd_lora_kernel(dh_ptr, gd_ptr, ad_ptr, gu_ptr, bt_ptr, dgu_ptr, N, I, s_dh, s_gd, s_ad, s_gu, s_bt, s_dgu,
                     sd, sg, su, RD: tl.constexpr, RG: tl.constexpr, RU: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr):
    """RD = 0: dh as given; RG = RU = 0: gu = [g | u] as they are."""
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mr, mc = rows < N, cols < I
    m = mr[:, None] & mc[None, :]
    off_dh = rows[:, None] * s_dh + cols[None, :]
    dh = tl.load(dh_ptr + off_dh, mask=m, other=0.0).to(tl.float32)
    if RD > 0:
        dh = _lowrank(dh, gd_ptr, s_gd, ad_ptr, s_ad, rows, cols, mr, mc, sd, RD)
    g, u = _gu_tile(gu_ptr, bt_ptr, rows, cols, mr, mc, I, s_gu, s_bt, sg, su, RG, RU)
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


# (BM, BN) tiles of the LoRA-aware kernels: each element's low-rank terms are r multiply-adds
# per factor in float32, which the tiles' memory traffic hides for ranks up to 16 on the H200
# (lorakit.fused.lora_activation uses them up to that rank)
BM, BN, WARPS = 32, 256, 8


def _lora_direct(kernel, n: int, i: int, tensors: tuple[Tensor, ...], ranks: dict[str, int]):
    key = launch.key(kernel, (n, i, tuple(ranks.items())), *tensors)
    run = _LAUNCHES.get(key)
    if run is None:
        run = _LAUNCHES[key] = launch.Direct(kernel, (triton.cdiv(n, BM), triton.cdiv(i, BN)),
                                             dict(**ranks, BM=BM, BN=BN), num_warps=WARPS)
    return run


def _bt(bg: Tensor, bu: Tensor) -> Tensor:
    """[Bg^T; Bu^T] (rg + ru, I), contiguous: the kernels read one row of it per rank."""
    return torch.cat([bg.t(), bu.t()])


def swiglu_lora_forward(gu: Tensor, bg: Tensor, bu: Tensor, sg: float, su: float) -> Tensor:
    """h = silu(g) * u with g = g0 + sg xag Bg^T, u = u0 + su xau Bu^T, for gu = [g0 | u0 | xag | xau]
    (N, 2I + rg + ru, unit column stride) and Bg (I, rg), Bu (I, ru) in gu's dtype; returns h (N, I)."""
    n = gu.shape[0]
    i, rg = bg.shape
    ru = bu.shape[1]
    bt = _bt(bg, bu)
    h = torch.empty((n, i), dtype=gu.dtype, device=gu.device)
    if n:
        _lora_direct(_fwd_lora_kernel, n, i, (gu, bt, h), dict(RG=rg, RU=ru))(
            gu, bt, h, n, i, gu.stride(0), bt.stride(0), h.stride(0), sg, su)
    return h


def swiglu_lora_backward(dh: Tensor, gu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor], sg: float, su: float,
                         gd: Optional[Tensor], ad: Optional[Tensor], sd: float) -> Tensor:
    """``swiglu_backward`` with the low-rank terms added where given: dh = dh0 + sd gd Ad for gd
    (N, rd), Ad (rd, I); g and u as ``swiglu_lora_forward`` rebuilds them when Bg, Bu are given
    (gu then holds x [Ag; Au]^T at column 2I), else gu = [g | u] as they are. Returns dgu
    (N, 2I); overwrites dh with h."""
    n, i = dh.shape
    rg, ru = (bg.shape[1], bu.shape[1]) if bg is not None else (0, 0)
    bt = _bt(bg, bu) if bg is not None else dh
    rd = ad.shape[0] if gd is not None else 0
    gd, ad = (gd, ad.contiguous()) if gd is not None else (dh, dh)
    dgu = torch.empty((n, 2 * i), dtype=gu.dtype, device=gu.device)
    if n:
        _lora_direct(_bwd_lora_kernel, n, i, (dh, gd, ad, gu, bt, dgu), dict(RD=rd, RG=rg, RU=ru))(
            dh, gd, ad, gu, bt, dgu, n, i, dh.stride(0), gd.stride(0), ad.stride(0), gu.stride(0), bt.stride(0),
            dgu.stride(0), sd, sg, su)
    return dgu
