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

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch

BLOCK_D = 64
BLOCK_K = 256
MAX_RANK = 128


@triton.jit
def _merge_kernel(w_ptr, b_ptr, a_ptr, o_ptr, D, K, r, s, s_w, s_b, s_a, s_o,
                  R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    rd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
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


def supported(weight: Tensor, B: Tensor, A: Tensor) -> bool:
    """Shapes and layouts the kernel takes (else the caller uses torch.addmm)."""
    return (weight.is_cuda and weight.dim() == 2 and weight.stride(1) == 1 and B.stride(1) == 1
            and A.stride(1) == 1 and 0 < A.shape[0] <= MAX_RANK and weight.dtype == B.dtype == A.dtype)


_LAUNCHES: dict = {}


def merged_weight(weight: Tensor, B: Tensor, A: Tensor, scale: float, out: Tensor) -> Tensor:
    """out = weight + scale * B @ A (out: (d, k), unit stride along k; may not alias weight).

    Launched through the compiled kernel's own launcher after the first call per shape
    (``lorakit.kernels.launch``): a training step builds W' hundreds of times."""
    d, k = weight.shape
    r = A.shape[0]
    key = launch.key(_merge_kernel, (d, k, r), weight, B, A, out)
    run = _LAUNCHES.get(key)
    if run is None:
        R = max(16, triton.next_power_of_2(r))
        run = _LAUNCHES[key] = launch.Direct(
            _merge_kernel, (triton.cdiv(d, BLOCK_D), triton.cdiv(k, BLOCK_K)),
            dict(R=R, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, IEEE=weight.dtype == torch.float32),
            num_warps=8 if R > 32 else 4)
    run(weight, B, A, out, d, k, r, float(scale), weight.stride(0), B.stride(0), A.stride(0), out.stride(0))
    return out
