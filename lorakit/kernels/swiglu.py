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


_LAUNCHES: dict = {}


def _direct(kernel, n: int, i: int, tensors: tuple[Tensor, ...]):
    """The kernel's launch for these shapes, strides, dtype and alignments (``lorakit.kernels.launch``)."""
    key = launch.key(kernel, (n, i), *tensors)
    run = _LAUNCHES.get(key)
    if run is None:
        run = _LAUNCHES[key] = launch.Direct(kernel, (n, triton.cdiv(i, BLOCK)), dict(BLOCK=BLOCK))
    return run


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
