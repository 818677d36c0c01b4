"""The gated (SwiGLU) activation of the fused LoRA MLP (lorakit.fused): h = silu(g) * u for
gu = [g | u] (N, 2I), and its gradient, which also recomputes h (the fused MLP keeps g and u,
not h).

``swiglu_forward`` / ``swiglu_backward`` run the Triton kernels on the GPU
(``lorakit.kernels.swiglu``, one pass each) and the plain-PyTorch references elsewhere; the
references compute in float32 and round once, as the kernels do, and GPU tests compare the two.
``swiglu_backward_reduce`` is the fused MLP's backward step: the gradient, plus the rank-r
reductions that read h, dg and du (dAd, dBg, dBu), in one kernel on the GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import kernels


def swiglu_forward_reference(gu: Tensor) -> Tensor:
    """h = silu(g) * u for gu = [g | u] (N, 2I); returns (N, I), computed in float32."""
    i = gu.shape[1] // 2
    g, u = gu[:, :i].float(), gu[:, i:].float()
    return (g * torch.sigmoid(g) * u).to(gu.dtype)


def swiglu_backward_reference(dh: Tensor, gu: Tensor) -> Tensor:
    """[dg | du] (N, 2I) from dh (N, I) and gu; overwrites dh with h (as the Triton kernel does).

    du = dh g s;  dg = dh u s (1 + g (1 - s)),  s = sigmoid(g).
    """
    i = gu.shape[1] // 2
    g, u, d = gu[:, :i].float(), gu[:, i:].float(), dh.float()
    s = torch.sigmoid(g)
    silu = g * s
    dgu = torch.empty_like(gu)
    dgu[:, :i] = d * u * s * (1 + g * (1 - s))
    dgu[:, i:] = d * silu
    dh.copy_(silu * u)
    return dgu


def swiglu_forward(gu: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """h (N, I) for gu = [g | u] (N, 2I) with unit column stride; written into ``out`` when
    given (an (N, I) column slice of a wider buffer is fine)."""
    k = kernels.load("swiglu") if gu.is_cuda else None
    if k is not None:
        return k.swiglu_forward(gu, out)
    h = swiglu_forward_reference(gu)
    return h if out is None else out.copy_(h)


def swiglu_backward(dh: Tensor, gu: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """[dg | du] (N, 2I), written into ``out`` when given; overwrites dh with h."""
    k = kernels.load("swiglu") if gu.is_cuda else None
    if k is not None:
        return k.swiglu_backward(dh, gu, out)
    dgu = swiglu_backward_reference(dh, gu)
    return dgu if out is None else out.copy_(dgu)


def swiglu_backward_reduce_unfused(dh: Tensor, gu: Tensor, gd: Optional[Tensor], sd: float, rg: int,
                                     sg: float, su: float, db: bool):
    """``swiglu_backward_reduce`` as separate steps: ``swiglu_backward`` (dh overwritten with h),
    then the GEMMs, each scale applied in the GEMM's float32 accumulator (``alpha``) and rounded
    once. The CPU path, and the GPU tests' reference."""
    i = dh.shape[1]
    dgu = swiglu_backward(dh, gu[:, :2 * i])                               # dh := h
    zero = dh.new_zeros(())                                                 # beta = 0: ignored
    dad = torch.addmm(zero, gd.t(), dh, beta=0, alpha=sd) if gd is not None else None
    if not db:
        return dgu, dad, None, None
    xas = gu[:, 2 * i:]
    return (dgu, dad, torch.addmm(zero, dgu[:, :i].t(), xas[:, :rg], beta=0, alpha=sg),
            torch.addmm(zero, dgu[:, i:].t(), xas[:, rg:], beta=0, alpha=su))


def swiglu_backward_reduce(dh: Tensor, gu: Tensor, gd: Optional[Tensor], sd: float, rg: int, sg: float,
                           su: float, db: bool):
    """(dgu, dAd, dBg, dBu) of the fused MLP's backward for dh (N, I) and gu = [g | u | xag | xau]
    (N, 2I + rg + ru; (N, 2I) is enough without ``db``), unit column strides:

        dgu = [dg | du] (N, 2I)                       as ``swiglu_backward``
        dAd = sd gd^T h (rd, I)                       when gd = dY Bd (N, rd) is given, else None
        dBg = sg dg^T xag (I, rg), dBu = su du^T xau  with ``db``, else None

    h, dg and du enter the reductions rounded to gu's dtype, as when they are written and read
    back. On the GPU one Triton kernel does it all without writing h; elsewhere dh is overwritten
    with h (the caller must not need dh afterwards)."""
    k = kernels.load("swiglu") if gu.is_cuda else None
    if k is not None:
        return k.swiglu_backward_reduce(dh, gu, gd, sd, rg, sg, su, db)
    return swiglu_backward_reduce_unfused(dh, gu, gd, sd, rg, sg, su, db)
