"""The merged weight W' = W0 + s B A, as the fast path builds it (and drops it) per call.

* ``merged_weight``: one (d, k) W', rounded once to W0's dtype: one Triton pass on the GPU
  (``lorakit.kernels.merge``: one read of W0, one write of W'), ``torch.addmm`` elsewhere and
  while torch.compile traces.
* ``stacked_merged_weight``: the W' of layers that read one input (q, k, v; gate, up), stacked
  along rows, optionally with the LoRA factors appended (A's rows, or B's columns as a block
  diagonal) so that the GEMM with W' also computes the rank-r product the gradients need.
* ``split_rows``: the row blocks of a stacked result ([dA_1; dA_2; ...]).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import kernels


def merged_weight(weight: Tensor, B: Tensor, A: Tensor, scale: float, out: Optional[Tensor] = None) -> Tensor:
    """W' = W0 + s B A: (d, k) + s (d, r) (r, k), rounded once to W0's dtype.

    On the GPU one Triton pass (``lorakit.kernels.merge``: reads W0 once, writes W' once);
    elsewhere, and while torch.compile traces, one GEMM with W0 as its accumulator
    (``torch.addmm``, which first copies W0 into its output). ``out``: where to write W'.
    """
    return _merge_into(weight, B, A, scale, torch.empty_like(weight) if out is None else out)


def _merge_into(weight: Tensor, B: Tensor, A: Tensor, scale: float, out: Tensor,
                a_out: Optional[Tensor] = None, b_out: Optional[Tensor] = None) -> Tensor:
    """out = W0 + s B A, plus a copy of A into ``a_out`` and of B into ``b_out`` when given
    (on the GPU all in the one Triton pass); returns out."""
    if weight.is_cuda and not torch.compiler.is_compiling():
        k = kernels.load("merge")
        if k is not None and k.supported(weight, B, A):
            return k.merged_weight(weight, B, A, scale, out, a_out=a_out, b_out=b_out)
    torch.addmm(weight, B, A, alpha=scale, out=out)
    if a_out is not None:
        a_out.copy_(A)
    if b_out is not None:
        b_out.copy_(B)
    return out


def stacked_merged_weight(weights: list[Tensor], Bs: list[Tensor], As: list[Tensor], scales: list[float],
                          append_a: bool = False, append_b: bool = False) -> Tensor:
    """[W_1 + s_1 B_1 A_1; ...; W_m + s_m B_m A_m]: the merged weights of layers that read the
    same input, stacked along rows into one (D = sum of d_i, k) tensor (one GEMM then serves them all).

    The LoRA factors can ride along, so that the GEMM with the merged weights also computes the
    small product the LoRA gradients need, without a second read of its large input:

    * ``append_a``: [W'; A_1; ...; A_m] (D + R, k), R = sum of r_i: x [W'; A]^T = [y | x A^T];
    * ``append_b``: [W' | blockdiag(B_1, ..., B_m)] (D, k + R): dY [W' | B] = [dX | dY_i B_i ...].

    On the GPU one Triton launch (``lorakit.kernels.merge``: up to three parts); otherwise one
    merge per part, each written in place into its rows, and the factors copied."""
    assert not (append_a and append_b)
    w0 = weights[0]
    D, k = sum(w.shape[0] for w in weights), w0.shape[1]
    R = sum(A.shape[0] for A in As)
    out = torch.empty((D + R * append_a, k + R * append_b), dtype=w0.dtype, device=w0.device)
    W = out[:D, :k]
    a_out = out[D:] if append_a else None
    b_out = out[:, k:] if append_b else None
    if w0.is_cuda and not torch.compiler.is_compiling():
        kern = kernels.load("merge")
        if kern is not None and len(weights) == 1 and kern.supported(w0, Bs[0], As[0]):
            kern.merged_weight(w0, Bs[0], As[0], scales[0], W, a_out=a_out, b_out=b_out)
            return out
        if kern is not None and len(weights) > 1 and kern.group_supported(weights, Bs, As):
            kern.merged_weights(weights, Bs, As, scales, W, a_out=a_out, b_out=b_out)
            return out
    if b_out is not None and len(weights) > 1:
        b_out.zero_()                                                       # blockdiag's off-diagonal blocks
    o = r0 = 0
    for w, B, A, s in zip(weights, Bs, As, scales):
        d, r = w.shape[0], A.shape[0]
        _merge_into(w, B, A, s, W[o:o + d], a_out=None if a_out is None else a_out[r0:r0 + r],
                    b_out=None if b_out is None else b_out[o:o + d, r0:r0 + r])
        o += d
        r0 += r
    return out


def split_rows(t: Optional[Tensor], parts: list[Tensor], need) -> list[Optional[Tensor]]:
    """The row blocks of t (stacked gradients, [dA_1; dA_2; ...]) with the row counts of ``parts``
    (None where ``need`` is false, or t None)."""
    out, r0 = [], 0
    for p, n in zip(parts, need):
        r = p.shape[0]
        out.append(t[r0:r0 + r] if n and t is not None else None)
        r0 += r
    return out
