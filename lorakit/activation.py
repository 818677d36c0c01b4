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


def swiglu_forward_terms_reference(gu: Tensor, bg: Tensor, bu: Tensor, sg: float, su: float) -> Tensor:
    """``swiglu_forward_terms`` in plain PyTorch (float32, h rounded once)."""
    g, u = _terms(gu, bg, bu, sg, su)
    return (g * torch.sigmoid(g) * u).to(gu.dtype)


def _terms(gu: Tensor, bg: Tensor, bu: Tensor, sg: float, su: float) -> tuple[Tensor, Tensor]:
    """(g, u) in float32: g0 + sg xag Bg^T and u0 + su xau Bu^T for gu = [g0 | u0 | xag | xau]."""
    i, rg = bg.shape
    f = gu.float()
    xa = f[:, 2 * i:]
    return (torch.addmm(f[:, :i], xa[:, :rg], bg.float().t(), alpha=sg),
            torch.addmm(f[:, i:2 * i], xa[:, rg:], bu.float().t(), alpha=su))


def swiglu_forward_terms(gu: Tensor, bg: Tensor, bu: Tensor, sg: float, su: float) -> Tensor:
    """h = silu(g) u (N, I) with the LoRA terms added to the frozen projections' outputs:

        g = g0 + sg xag Bg^T,  u = u0 + su xau Bu^T        gu = [g0 | u0 | xag | xau] (N, 2I + rg + ru)

    (g0 = x Wg^T, xag = x Ag^T, Bg (I, rg); u likewise), in float32 and never rounded: the fused
    MLP beside W0 then keeps g0 and u0 only, and its backward rebuilds g and u the same way. One
    Triton kernel on the GPU (ranks up to ``lorakit.kernels.swiglu.MAX_TERMS_RANK``)."""
    k = kernels.load("swiglu") if gu.is_cuda else None
    if k is not None and max(bg.shape[1], bu.shape[1]) <= k.MAX_TERMS_RANK:
        return k.swiglu_forward_terms(gu, bg, bu, sg, su)
    return swiglu_forward_terms_reference(gu, bg, bu, sg, su)


def swiglu_backward_reduce_reference(dh: Tensor, gu: Tensor, gd: Optional[Tensor], sd: float, rg: int, sg: float,
                                     su: float, db: bool, bg: Optional[Tensor] = None, bu: Optional[Tensor] = None,
                                     ad: Optional[Tensor] = None, want_ad: bool = True):
    """``swiglu_backward_reduce`` in plain PyTorch, float32, with the kernel's roundings: h, dg
    and du rounded to gu's dtype before the reductions, each output rounded once. dh is not
    modified."""
    i = dh.shape[1]
    if bg is not None:
        g, u = _terms(gu, bg, bu, sg, su)
    else:
        g, u = gu[:, :i].float(), gu[:, i:2 * i].float()
    d = dh.float()
    if ad is not None:
        d = torch.addmm(d, gd.float(), ad.float(), alpha=sd)
    s = torch.sigmoid(g)
    ty = gu.dtype
    h = (g * s * u).to(ty).float()
    dg = (d * u * s * (1 + g * (1 - s))).to(ty)
    du = (d * g * s).to(ty)
    dad = (sd * gd.float().t() @ h).to(ty) if gd is not None and want_ad else None
    dbg = dbu = None
    if db:
        xa = gu[:, 2 * i:].float()
        dbg = (sg * dg.float().t() @ xa[:, :rg]).to(ty)
        dbu = (su * du.float().t() @ xa[:, rg:]).to(ty)
    return torch.cat([dg, du], 1), dad, dbg, dbu


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
                           su: float, db: bool, bg: Optional[Tensor] = None, bu: Optional[Tensor] = None,
                           ad: Optional[Tensor] = None, want_ad: bool = True):
    """(dgu, dAd, dBg, dBu) of the fused MLP's backward for dh (N, I) and gu = [g | u | xag | xau]
    (N, 2I + rg + ru; (N, 2I) is enough without ``db`` or terms), unit column strides:

        dgu = [dg | du] (N, 2I)                       as ``swiglu_backward``
        dAd = sd gd^T h (rd, I)                       when gd = dY Bd (N, rd) is given and ``want_ad``
        dBg = sg dg^T xag (I, rg), dBu = su du^T xau  with ``db``, else None

    With bg and bu (the terms), gu holds g0 and u0 and g, u are rebuilt as ``swiglu_forward_terms``
    builds them; with ad (rd, I), dh holds dh0 = dY Wd and dh = dh0 + sd gd Ad. h, dg and du enter
    the reductions rounded to gu's dtype, as when they are written and read back. On the GPU one
    Triton kernel does it all without writing h (dh unchanged); elsewhere, without terms, the
    plain steps run and dh is overwritten with h (the caller must not need dh afterwards)."""
    k = kernels.load("swiglu") if gu.is_cuda else None
    ranks = [t.shape[1] for t in (bg, bu) if t is not None] + ([ad.shape[0]] if ad is not None else [])   # the terms'
    if k is not None and (not ranks or max(ranks) <= k.MAX_TERMS_RANK):
        return k.swiglu_backward_reduce(dh, gu, gd, sd, rg, sg, su, db, bg, bu, ad, want_ad)
    if ranks:
        return swiglu_backward_reduce_reference(dh, gu, gd, sd, rg, sg, su, db, bg, bu, ad, want_ad)
    return swiglu_backward_reduce_unfused(dh, gu, gd if want_ad else None, sd, rg, sg, su, db)
