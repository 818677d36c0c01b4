"""Triton kernels for per-row LoRA at inference: every row of a batch with its own adapter.

For each row i whose slot g = index[i] is not 0 (slot 0 is "no adapter")::

    out[i] += scale[g] * (x[i] @ A[g].T) @ B[g].T

Shapes (shared by every function here; the plain-PyTorch reference of the same function is
``lorakit.multi.lora_rows`` and the tests compare the two on random inputs):

    x      (N, T, k)   input rows (T tokens per row), contiguous in k
    out    (N, T, d)   the base layer's output, updated in place, contiguous in d
    A      (S, R, k)   A of every slot, rank padded with zeros to R (a power of two >= 16)
    B      (S, d, R)   B of every slot, padded likewise, contiguous in R
    scale  (S,)        float32, alpha / r of every slot (0 for slot 0)
    index  (N,)        integer slot of each row
    order  (M,)        int32, the M rows with a slot != 0, sorted by slot

Only rows listed in ``order`` are touched, and consecutive programs work on rows of the
same adapter (its A and B stay in L2). The launch grid depends on shapes and on M alone,
which the caller knows on the host: there is no host synchronisation, so a forward that
calls these can be captured in a CUDA graph.

* prefill (T > 1), the segmented form: a *shrink* kernel computes xa = s * x A^T into a
  small float32 buffer (N, T, R), one program per tile of BLOCK_T tokens of one row; an
  *expand* kernel adds xa B^T into ``out``, one program per (token tile, BLOCK_D columns).
* decode (T == 1), one token per row: one fused kernel; each program computes the row's
  xa (R values) and adds its share of the d output columns.

Forward only: training runs the torch path (autograd) in lorakit.multi.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, scale_ptr, index_ptr, order_ptr, xa_ptr, T, K, tiles_t,
                   sx_n, sx_t, sa_s, sa_r, sxa_n, sxa_t,
                   R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """xa[row, t, :] = scale[g] * x[row, t, :] @ A[g].T for one tile of BLOCK_T tokens of one row."""
    pid = tl.program_id(0)
    row = tl.load(order_ptr + pid // tiles_t).to(tl.int64)
    slot = tl.load(index_ptr + row).to(tl.int64)
    t = (pid % tiles_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.arange(0, R)
    kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + row * sx_n + t[:, None] * sx_t                  # (BLOCK_T, 1) pointers
    a_rows = a_ptr + slot * sa_s + r[:, None] * sa_r                  # (R, 1)
    acc = tl.zeros((BLOCK_T, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = (k0 + kk) < K
        xt = tl.load(x_rows + (k0 + kk)[None, :], mask=(t[:, None] < T) & km[None, :], other=0.0)
        at = tl.load(a_rows + (k0 + kk)[None, :], mask=km[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(xt, tl.trans(at), input_precision="ieee")   # (BLOCK_T, R)
        else:
            acc += tl.dot(xt, tl.trans(at))
    acc = acc * tl.load(scale_ptr + slot)
    tl.store(xa_ptr + row * sxa_n + t[:, None] * sxa_t + r[None, :], acc, mask=t[:, None] < T)


@triton.jit
def _expand_kernel(xa_ptr, b_ptr, index_ptr, order_ptr, out_ptr, T, D, tiles_t,
                   sxa_n, sxa_t, sb_s, sb_d, so_n, so_t,
                   R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """out[row, t, cols] += xa[row, t, :] @ B[g, cols, :].T for one (token tile, column tile)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    row = tl.load(order_ptr + pid // tiles_t).to(tl.int64)
    slot = tl.load(index_ptr + row).to(tl.int64)
    t = (pid % tiles_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.arange(0, R)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    xa = tl.load(xa_ptr + row * sxa_n + t[:, None] * sxa_t + r[None, :], mask=t[:, None] < T, other=0.0)
    b = tl.load(b_ptr + slot * sb_s + cols[:, None] * sb_d + r[None, :], mask=cols[:, None] < D, other=0.0)
    xa = xa.to(b.dtype)                                                # as the one-adapter path: xa in x's dtype
    if IEEE:
        delta = tl.dot(xa, tl.trans(b), input_precision="ieee")      # (BLOCK_T, BLOCK_D) float32
    else:
        delta = tl.dot(xa, tl.trans(b))
    optr = out_ptr + row * so_n + t[:, None] * so_t + cols[None, :]
    m = (t[:, None] < T) & (cols[None, :] < D)
    o = tl.load(optr, mask=m, other=0.0)
    tl.store(optr, (o.to(tl.float32) + delta).to(o.dtype), mask=m)


@triton.jit
def _decode_kernel(x_ptr, a_ptr, b_ptr, scale_ptr, index_ptr, order_ptr, out_ptr, K, D, d_per,
                   sx_n, sa_s, sa_r, sb_s, sb_d, so_n,
                   R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token per row: xa = scale * A[g] x[row] (R values), then out[row, cols] += B[g, cols] xa
    for this program's d_per columns (a few programs per row share the d columns)."""
    i = tl.program_id(0)
    pid_d = tl.program_id(1)
    row = tl.load(order_ptr + i).to(tl.int64)
    slot = tl.load(index_ptr + row).to(tl.int64)
    r = tl.arange(0, R)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = (k0 + kk) < K
        xv = tl.load(x_ptr + row * sx_n + k0 + kk, mask=km, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + slot * sa_s + r[:, None] * sa_r + (k0 + kk)[None, :], mask=km[None, :], other=0.0)
        acc += av.to(tl.float32) * xv[None, :]
    xa = tl.sum(acc, axis=1) * tl.load(scale_ptr + slot)               # (R,)
    d0 = pid_d * d_per
    for c0 in range(d0, d0 + d_per, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        cm = cols < D
        b = tl.load(b_ptr + slot * sb_s + cols[:, None] * sb_d + r[None, :], mask=cm[:, None], other=0.0)
        y = tl.sum(b.to(tl.float32) * xa[None, :], axis=1)            # (BLOCK_D,)
        optr = out_ptr + row * so_n + cols
        o = tl.load(optr, mask=cm, other=0.0)
        tl.store(optr, (o.to(tl.float32) + y).to(o.dtype), mask=cm)


def _check(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor, index: Tensor, order: Tensor) -> None:
    N, T, k = x.shape
    S, R, k2 = A.shape
    d = out.shape[-1]
    problems = []
    if out.shape != (N, T, d) or B.shape != (S, d, R) or k2 != k or scale.shape != (S,) or index.shape != (N,):
        problems.append(f"shapes x {tuple(x.shape)}, out {tuple(out.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                        f"scale {tuple(scale.shape)}, index {tuple(index.shape)} do not fit together")
    if R < 16 or R & (R - 1):
        problems.append(f"the padded rank R must be a power of two >= 16, got {R}")
    if x.stride(-1) != 1 or out.stride(-1) != 1 or not A.is_contiguous() or not B.is_contiguous():
        problems.append("x and out must be contiguous in their last dimension, A and B contiguous")
    if not (x.dtype == out.dtype == A.dtype == B.dtype) or scale.dtype != torch.float32:
        problems.append(f"dtypes x {x.dtype}, out {out.dtype}, A {A.dtype}, B {B.dtype} must agree; scale float32")
    if order.dtype != torch.int32:
        problems.append(f"order must be int32, got {order.dtype}")
    if problems:
        raise ValueError("lorakit.kernels.rows: " + "; ".join(problems))


def add_rows_(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor, index: Tensor, order: Tensor) -> Tensor:
    """out += per-row LoRA term, in place (shapes in the module docstring); returns ``out``.

    Picks the decode kernel when T == 1, the shrink + expand pair otherwise.
    """
    _check(out, x, A, B, scale, index, order)
    M = order.shape[0]
    if M == 0:
        return out
    N, T, k = x.shape
    S, R, _ = A.shape
    d = out.shape[-1]
    if T == 1:
        _decode(out, x, A, B, scale, index, order, M, k, d, R)
    else:
        _prefill(out, x, A, B, scale, index, order, M, T, k, d, R)
    return out


def _decode(out, x, A, B, scale, index, order, M, k, d, R) -> None:
    block_d = 128
    splits = max(1, min(8, triton.cdiv(d, block_d)))                 # programs per row sharing d
    d_per = triton.cdiv(triton.cdiv(d, splits), block_d) * block_d
    splits = triton.cdiv(d, d_per)
    block_k = max(32, min(256, 4096 // R))
    _decode_kernel[(M, splits)](x, A, B, scale, index, order, out, k, d, d_per,
                                x.stride(0), A.stride(0), A.stride(1), B.stride(0), B.stride(1), out.stride(0),
                                R=R, BLOCK_K=block_k, BLOCK_D=block_d)


def _prefill(out, x, A, B, scale, index, order, M, T, k, d, R) -> None:
    ieee = x.dtype == torch.float32
    block_t = 64 if T >= 64 else 16
    tiles_t = triton.cdiv(T, block_t)
    xa = torch.empty((x.shape[0], T, R), dtype=torch.float32, device=x.device)
    block_k = 64 if ieee else 128
    _shrink_kernel[(M * tiles_t,)](x, A, scale, index, order, xa, T, k, tiles_t,
                                   x.stride(0), x.stride(1), A.stride(0), A.stride(1), xa.stride(0), xa.stride(1),
                                   R=R, BLOCK_T=block_t, BLOCK_K=block_k, IEEE=ieee)
    block_d = 64 if ieee else 128
    _expand_kernel[(M * tiles_t, triton.cdiv(d, block_d))](
        xa, B, index, order, out, T, d, tiles_t,
        xa.stride(0), xa.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        R=R, BLOCK_T=block_t, BLOCK_D=block_d, IEEE=ieee)
