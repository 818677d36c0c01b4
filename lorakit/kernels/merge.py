"""Triton kernel for the merged weight W' = W0 + s B A, in one read of W0 and one write of W'.

    W0, out (d, k)   unit stride along k
    B       (d, r)
    A       (r, k)
    s       float scale

``torch.addmm(W0, B, A, alpha=s)`` computes the same thing, but cuBLAS accumulates into its
output in place, so PyTorch first copies W0 into the new tensor: two passes over a (d, k)
weight instead of one, for every adapted layer, twice per training step (W' is rebuilt in
backward). Here each program loads one (BLOCK_D, BLOCK_K) tile of W0, the matching rows of
B and columns of A (rank padded to a power of two >= 16 with zeros), adds s B A computed in
float32, and stores the tile rounded once, as cuBLAS does. The reference is that addmm
(``lorakit.ops.merged_weight`` falls back to it off the GPU); GPU tests compare the two.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch

BLOCK_D = 64
BLOCK_K = 256
MAX_RANK = 128


@triton.jit
def _merge_tile(w_ptr, b_ptr, a_ptr, o_ptr, ea_ptr, eb_ptr, bd, bk, D, K, r, s, s_w, s_b, s_a, s_o, b_off, b_tot,
                R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                STORE_A: tl.constexpr, STORE_B: tl.constexpr, RB: tl.constexpr):
    """Tile (bd, bk) of out = W + s B A: (BLOCK_D, BLOCK_K) of W read once, s B A in float32.

    STORE_A: the first row block also copies its columns of A (r, BLOCK_K) to rows of ``ea_ptr``.
    STORE_B: the first column block writes its rows of a band of ``b_tot`` columns at ``eb_ptr``:
    B in columns [b_off, b_off + r), zeros elsewhere (with several parts stacked, the band is
    block-diagonal: blockdiag(B_1, ..., B_m)). Both use out's row stride: the appended rows or
    columns of ``merged_weight``'s ``a_out`` / ``b_out``. RB: a power of two >= b_tot."""
    rd = bd * BLOCK_D + tl.arange(0, BLOCK_D)
    rk = bk * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R)
    md, mk, mr = rd < D, rk < K, rr < r
    rd64 = rd.to(tl.int64)
    b = tl.load(b_ptr + rd64[:, None] * s_b + rr[None, :], mask=md[:, None] & mr[None, :], other=0.0)
    a = tl.load(a_ptr + rr[:, None] * s_a + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
    if IEEE:
        ba = tl.dot(b, a, input_precision="ieee")                     # (BLOCK_D, BLOCK_K) float32
    else:
        ba = tl.dot(b, a)
    m = md[:, None] & mk[None, :]
    w = tl.load(w_ptr + rd64[:, None] * s_w + rk[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + rd64[:, None] * s_o + rk[None, :], (w + s * ba).to(o_ptr.dtype.element_ty), mask=m)
    if STORE_A:
        if bd == 0:
            tl.store(ea_ptr + rr[:, None] * s_o + rk[None, :], a, mask=mr[:, None] & mk[None, :])
    if STORE_B:
        if bk == 0:
            cols = tl.arange(0, RB)
            j = cols - b_off
            mj = (j >= 0) & (j < r)
            band = tl.load(b_ptr + rd64[:, None] * s_b + j[None, :], mask=md[:, None] & mj[None, :], other=0.0)
            tl.store(eb_ptr + rd64[:, None] * s_o + cols[None, :], band, mask=md[:, None] & (cols < b_tot)[None, :])


@triton.jit
def _merge_kernel(w_ptr, b_ptr, a_ptr, o_ptr, ea_ptr, eb_ptr, D, K, r, s, s_w, s_b, s_a, s_o,
                  R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                  STORE_A: tl.constexpr, STORE_B: tl.constexpr):
    _merge_tile(w_ptr, b_ptr, a_ptr, o_ptr, ea_ptr, eb_ptr, tl.program_id(0), tl.program_id(1), D, K, r, s,
                s_w, s_b, s_a, s_o, 0, r, R, BLOCK_D, BLOCK_K, IEEE, STORE_A, STORE_B, R)


@triton.jit
def _merge3_kernel(w0, b0, a0, w1, b1, a1, w2, b2, a2, o_ptr, ea_ptr, eb_ptr, D0, D1, D2, K, r0, r1, r2,
                   s0, s1, s2, sw0, sb0, sa0, sw1, sb1, sa1, sw2, sb2, sa2, s_o,
                   R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                   STORE_A: tl.constexpr, STORE_B: tl.constexpr, RB: tl.constexpr):
    """Up to three merges stacked along rows of one output, in one launch: row blocks
    [0, D0 / BLOCK_D) are part 0's, the next D1 / BLOCK_D part 1's, the rest part 2's (every part
    but the last is a multiple of BLOCK_D rows, so no block straddles two parts; unused parts
    have 0 rows). STORE_A: [A0; A1; A2] copied to the rows at ``ea_ptr`` too; STORE_B:
    blockdiag(B0, B1, B2) to the columns at ``eb_ptr``."""
    pid = tl.program_id(0)
    bk = tl.program_id(1)
    n0 = tl.cdiv(D0, BLOCK_D)
    n1 = tl.cdiv(D1, BLOCK_D)
    rt = r0 + r1 + r2
    if pid < n0:
        _merge_tile(w0, b0, a0, o_ptr, ea_ptr, eb_ptr, pid, bk, D0, K, r0, s0, sw0, sb0, sa0, s_o, 0, rt,
                    R, BLOCK_D, BLOCK_K, IEEE, STORE_A, STORE_B, RB)
    elif pid < n0 + n1:
        o1 = D0.to(tl.int64) * s_o
        _merge_tile(w1, b1, a1, o_ptr + o1, ea_ptr + r0 * s_o, eb_ptr + o1, pid - n0, bk, D1, K,
                    r1, s1, sw1, sb1, sa1, s_o, r0, rt, R, BLOCK_D, BLOCK_K, IEEE, STORE_A, STORE_B, RB)
    else:
        o2 = (D0 + D1).to(tl.int64) * s_o
        _merge_tile(w2, b2, a2, o_ptr + o2, ea_ptr + (r0 + r1) * s_o, eb_ptr + o2,
                    pid - n0 - n1, bk, D2, K, r2, s2, sw2, sb2, sa2, s_o, r0 + r1, rt, R, BLOCK_D, BLOCK_K, IEEE,
                    STORE_A, STORE_B, RB)


def supported(weight: Tensor, B: Tensor, A: Tensor) -> bool:
    """Shapes and layouts the kernel takes (else the caller uses torch.addmm)."""
    return (weight.is_cuda and weight.dim() == 2 and weight.stride(1) == 1 and B.stride(1) == 1
            and A.stride(1) == 1 and 0 < A.shape[0] <= MAX_RANK and weight.dtype == B.dtype == A.dtype)


_LAUNCHES: dict = {}


def merged_weight(weight: Tensor, B: Tensor, A: Tensor, scale: float, out: Tensor,
                  a_out: Optional[Tensor] = None, b_out: Optional[Tensor] = None) -> Tensor:
    """out = weight + scale * B @ A (out: (d, k), unit stride along k; may not alias weight);
    with ``a_out`` (r, k) a copy of A there too, with ``b_out`` (d, r) a copy of B (both views of
    the tensor ``out`` is part of, with its row stride: see ``lorakit.ops.merged_weight``).

    Launched through the compiled kernel's own launcher after the first call per shape
    (``lorakit.kernels.launch``): a training step builds W' hundreds of times."""
    d, k = weight.shape
    r = A.shape[0]
    ea, eb = (out if a_out is None else a_out), (out if b_out is None else b_out)
    key = launch.key(_merge_kernel, (d, k, r, a_out is None, b_out is None), weight, B, A, out, ea, eb)
    run = _LAUNCHES.get(key)
    if run is None:
        R = max(16, triton.next_power_of_2(r))
        run = _LAUNCHES[key] = launch.Direct(
            _merge_kernel, (triton.cdiv(d, BLOCK_D), triton.cdiv(k, BLOCK_K)),
            dict(R=R, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, IEEE=weight.dtype == torch.float32,
                 STORE_A=a_out is not None, STORE_B=b_out is not None),
            num_warps=8 if R > 32 else 4)
    run(weight, B, A, out, ea, eb, d, k, r, float(scale), weight.stride(0), B.stride(0), A.stride(0), out.stride(0))
    return out


def group_supported(weights: list[Tensor], Bs: list[Tensor], As: list[Tensor]) -> bool:
    """Whether ``merged_weights`` takes these parts in one launch (else one launch per part)."""
    k = weights[0].shape[1]
    return (0 < len(weights) <= 3 and all(supported(w, B, A) and w.shape[1] == k and w.dtype == weights[0].dtype
                                          for w, B, A in zip(weights, Bs, As))
            and all(w.shape[0] % BLOCK_D == 0 for w in weights[:-1]))


def merged_weights(weights: list[Tensor], Bs: list[Tensor], As: list[Tensor], scales: list[float],
                   out: Tensor, a_out: Optional[Tensor] = None, b_out: Optional[Tensor] = None) -> Tensor:
    """out = [W_0 + s_0 B_0 A_0; ...; W_m + s_m B_m A_m] (sum of d_i, k) in one launch
    (``group_supported``: at most 3 parts, every part but the last a multiple of BLOCK_D rows);
    with ``a_out`` (sum of r_i, k) [A_0; ...; A_m] copied there too, with ``b_out`` (sum of d_i,
    sum of r_i) blockdiag(B_0, ..., B_m) (both with out's row stride)."""
    m = len(weights)
    k = weights[0].shape[1]
    ds = [w.shape[0] for w in weights] + [0] * (3 - m)
    rs = [A.shape[0] for A in As] + [0] * (3 - m)
    pad = lambda seq, fill: list(seq) + [fill] * (3 - m)           # noqa: E731 - unused parts: never read
    ws, bs, as_ = pad(weights, weights[0]), pad(Bs, Bs[0]), pad(As, As[0])
    ea = out if a_out is None else a_out
    eb = out if b_out is None else b_out
    key = launch.key(_merge3_kernel, (m, *ds, k, *rs, a_out is None, b_out is None), *ws, *bs, *as_, out, ea, eb)
    run = _LAUNCHES.get(key)
    if run is None:
        R = max(16, triton.next_power_of_2(max(rs)))
        run = _LAUNCHES[key] = launch.Direct(
            _merge3_kernel, (sum(triton.cdiv(d, BLOCK_D) for d in ds), triton.cdiv(k, BLOCK_K)),
            dict(R=R, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, IEEE=weights[0].dtype == torch.float32,
                 STORE_A=a_out is not None, STORE_B=b_out is not None,
                 RB=max(16, triton.next_power_of_2(sum(rs)))),
            num_warps=8 if R > 32 else 4)
    sc = [float(x) for x in scales] + [0.0] * (3 - m)
    run(ws[0], bs[0], as_[0], ws[1], bs[1], as_[1], ws[2], bs[2], as_[2], out, ea, eb, *ds, k, *rs, *sc,
        ws[0].stride(0), bs[0].stride(0), as_[0].stride(0), ws[1].stride(0), bs[1].stride(0), as_[1].stride(0),
        ws[2].stride(0), bs[2].stride(0), as_[2].stride(0), out.stride(0))
    return out
