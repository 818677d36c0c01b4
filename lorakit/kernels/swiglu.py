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
"""

from __future__ import annotations

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
def _bwd_gs_kernel(dh_ptr, gu_ptr, dgu_ptr, bg_ptr, bu_ptr, gs_ptr, N, rg, ru, sg, su, s_dh, s_gu, s_dgu, s_gs,
                   I: tl.constexpr, RG: tl.constexpr, RU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
                   IEEE: tl.constexpr):
    """``_bwd_kernel`` for BLOCK_N rows over all I columns, which also accumulates
    gs = [sg dg Bg | su du Bu] (BLOCK_N, rg + ru) while dg and du are in registers."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mrow = rows < N
    r64 = rows.to(tl.int64)[:, None]
    rrg = tl.arange(0, RG)
    rru = tl.arange(0, RU)
    acc_g = tl.zeros((BLOCK_N, RG), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, RU), dtype=tl.float32)
    ty = dgu_ptr.dtype.element_ty
    for c0 in range(0, I, BLOCK_I):
        cols = c0 + tl.arange(0, BLOCK_I)
        mc = cols < I
        m = mrow[:, None] & mc[None, :]
        dh = tl.load(dh_ptr + r64 * s_dh + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(gu_ptr + r64 * s_gu + cols[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + r64 * s_gu + I + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = (dh * u * sig * (1.0 + g * (1.0 - sig))).to(ty)
        du = (dh * silu).to(ty)
        tl.store(dgu_ptr + r64 * s_dgu + cols[None, :], dg, mask=m)
        tl.store(dgu_ptr + r64 * s_dgu + I + cols[None, :], du, mask=m)
        tl.store(dh_ptr + r64 * s_dh + cols[None, :], (silu * u).to(dh_ptr.dtype.element_ty), mask=m)
        bg = tl.load(bg_ptr + cols[:, None] * rg + rrg[None, :], mask=mc[:, None] & (rrg < rg)[None, :], other=0.0)
        bu = tl.load(bu_ptr + cols[:, None] * ru + rru[None, :], mask=mc[:, None] & (rru < ru)[None, :], other=0.0)
        if IEEE:
            acc_g += tl.dot(dg, bg, input_precision="ieee")              # dg as stored, as torch.mm reads it
            acc_u += tl.dot(du, bu, input_precision="ieee")
        else:
            acc_g += tl.dot(dg, bg)
            acc_u += tl.dot(du, bu)
    gty = gs_ptr.dtype.element_ty
    tl.store(gs_ptr + r64 * s_gs + rrg[None, :], (acc_g * sg).to(gty), mask=mrow[:, None] & (rrg < rg)[None, :])
    tl.store(gs_ptr + r64 * s_gs + rg + rru[None, :], (acc_u * su).to(gty), mask=mrow[:, None] & (rru < ru)[None, :])


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


GS_BLOCK_N = 32
GS_BLOCK_I = 128


def swiglu_backward_gs(dh: Tensor, gu: Tensor, bg: Tensor, bu: Tensor, sg: float, su: float) -> tuple[Tensor, Tensor]:
    """``swiglu_backward`` that also returns gs = [sg dg Bg | su du Bu] (N, rg + ru), from the
    same pass (the separate GEMM would read dgu, (N, 2I), once more).

    bg (I, rg), bu (I, ru): contiguous, in gu's dtype. Overwrites dh with h, like swiglu_backward.
    """
    n, two_i = gu.shape
    i = two_i // 2
    rg, ru = bg.shape[1], bu.shape[1]
    dgu = torch.empty((n, two_i), dtype=gu.dtype, device=gu.device)
    gs = torch.empty((n, rg + ru), dtype=gu.dtype, device=gu.device)
    if n:
        key = launch.key(_bwd_gs_kernel, (n, i, rg, ru), dh, gu, dgu, bg, bu, gs)
        run = _LAUNCHES.get(key)
        if run is None:
            run = _LAUNCHES[key] = launch.Direct(
                _bwd_gs_kernel, (triton.cdiv(n, GS_BLOCK_N),),
                dict(I=i, RG=max(16, triton.next_power_of_2(rg)), RU=max(16, triton.next_power_of_2(ru)),
                     BLOCK_N=GS_BLOCK_N, BLOCK_I=GS_BLOCK_I, IEEE=gu.dtype == torch.float32),
                num_warps=4, num_stages=3)
        run(dh, gu, dgu, bg, bu, gs, n, rg, ru, float(sg), float(su), dh.stride(0), gu.stride(0), dgu.stride(0),
            gs.stride(0))
    return dgu, gs
