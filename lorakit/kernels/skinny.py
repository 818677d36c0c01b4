"""Triton kernel for a whole LoRA linear on a few rows (decoding), in one launch.

    x     (N, k)   N small (one token per sequence while decoding), unit stride along k
    W0    (d, k)   the frozen weight, contiguous
    bias  (d,)     or none
    A     (r, k)   contiguous;  B (d, r) contiguous;  s the scale
    y     (N, d)   = x W0^T + b + s (x A^T) B^T

Decoding is bound by the host: the plain form (``lorakit.ops``) issues three kernels per
adapted layer (x W0^T, x A^T, and the rank-r GEMM that adds into the output), each with
its dispatch and launch cost, where the merged model issues one. Here one program per
BLOCK_D output columns streams its rows of W0 once (the bytes that bound the base GEMM)
and, in the same loop over k, the matching columns of A (r x k, from L2: every program
reads it, as it reads x); after the loop it adds s (x A^T) B^T for its columns from
B's rows, adds the bias, and rounds once. x A^T is rounded to the input dtype before the
rank-r product, as the plain form stores it. Rows are padded to BLOCK_N (>= 16, for the
tensor-core dot) with masked loads.

The reference is ``lorakit.ops.lora_linear_reference``; GPU tests compare the two.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch

MAX_ROWS = 64        # above this the GEMMs of the plain form are cheaper than re-reading A per program
MAX_RANK = 128


@triton.jit
def _kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, N, s,
            D: tl.constexpr, K: tl.constexpr, r: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr,
            SPLIT: tl.constexpr, K_PER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Program (i, j): columns i*BLOCK_D.. of y, over k in [j*K_PER, (j+1)*K_PER).

    Its share  x_j W0_j^T + s (x_j A_j^T) B^T  (the LoRA term is linear in x A^T, so each
    k-slice adds its own) goes straight to y when SPLIT == 1. Otherwise into the float32
    workspace ws[j]; the last of the SPLIT programs of column block i to arrive (counted in
    cnt[i], which it resets to 0) sums ws[0..SPLIT-1] in that fixed order (deterministic),
    adds the bias and writes y.
    """
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = tl.arange(0, BLOCK_N)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = tl.arange(0, R)
    rk = tl.arange(0, BLOCK_K)
    mn, md, mr = rn < N, rd < D, rr < r
    x_rows = x_ptr + rn[:, None] * K
    w_rows = w_ptr + rd.to(tl.int64)[:, None] * K
    a_rows = a_ptr + rr[:, None] * K
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)                 # x W0^T for this program's columns
    xa = tl.zeros((BLOCK_N, R), dtype=tl.float32)                        # x A^T (every program: A is small)
    k_lo = pid_k * K_PER
    for kb in range(0, K_PER, BLOCK_K):
        kk = k_lo + kb + rk
        mk = kk < K
        xt = tl.load(x_rows + kk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)      # (BLOCK_N, BLOCK_K)
        wt = tl.load(w_rows + kk[None, :], mask=md[:, None] & mk[None, :], other=0.0)      # (BLOCK_D, BLOCK_K)
        at = tl.load(a_rows + kk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)      # (R, BLOCK_K)
        if IEEE:
            acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
            xa += tl.dot(xt, tl.trans(at), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(wt))
            xa += tl.dot(xt, tl.trans(at))
    bt = tl.load(b_ptr + rd[:, None] * r + rr[None, :], mask=md[:, None] & mr[None, :], other=0.0)   # (BLOCK_D, R)
    xa_t = xa.to(bt.dtype)                                               # as the plain form stores x A^T
    if IEEE:
        acc += s * tl.dot(xa_t, tl.trans(bt), input_precision="ieee")
    else:
        acc += s * tl.dot(xa_t, tl.trans(bt))
    m = mn[:, None] & md[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rd, mask=md, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rn[:, None] * D + rd[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)
    else:
        tile = rn[:, None] * D + rd[None, :]
        tl.store(ws_ptr + pid_k * N * D + tile, acc, mask=m)
        tl.debug_barrier()                                               # every thread's share stored ...
        arrived = tl.atomic_add(cnt_ptr + pid_d, 1, sem="acq_rel")       # ... before it is announced
        if arrived == SPLIT - 1:                                         # the last one: sum in a fixed order
            tl.debug_barrier()
            total = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            for j in tl.static_range(SPLIT):
                total += tl.load(ws_ptr + j * N * D + tile, mask=m, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + rd, mask=md, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rn[:, None] * D + rd[None, :], total.to(y_ptr.dtype.element_ty), mask=m)
            tl.atomic_xchg(cnt_ptr + pid_d, 0)                           # ready for the next call


def supported(x: Tensor, weight: Tensor, bias, A: Tensor, B: Tensor) -> bool:
    """Whether the kernel takes these operands (else ``lora_linear`` returns None).

    x: (..., k) with at most MAX_ROWS rows; every operand on the GPU, in one dtype,
    contiguous and 16-byte aligned (the compiled kernel assumes aligned rows).
    """
    d, k = weight.shape
    return (x.numel() <= MAX_ROWS * k and x.is_cuda and 0 < A.shape[0] <= MAX_RANK
            and x.dtype == weight.dtype == A.dtype == B.dtype and (bias is None or bias.dtype == x.dtype)
            and _aligned(x, weight, bias, A, B))


def _aligned(*ts) -> bool:
    return all(t is None or t.is_contiguous() for t in ts) and all(launch.aligned(*ts))


def plan(n: int, d: int, k: int, r: int, itemsize: int = 2) -> tuple[int, ...]:
    """(BLOCK_N, BLOCK_D, BLOCK_K, SPLIT, K_PER, num_warps, num_stages) for N rows of a (d, k) layer.

    Each program's dot products form one chain of dependent tensor-core steps along its
    k-slice, so a program that owned all of a long k would wait on latency, not on memory:
    layers with few column blocks split k eight ways. From the sweep of
    bench/decode_linear.py on an H200 (1B widths, 8 rows, bfloat16; GPU time per call against
    the cuBLAS GEMM alone: q/o 5.9 vs 5.0 us, k/v 4.5 vs 5.2, gate/up 13.2 vs 6.9, down 13.7
    vs 10.0). BLOCK_K shrinks until the pipelined tiles of x, W0 and A fit in shared memory.
    """
    block_n = 16 if n <= 16 else (32 if n <= 32 else 64)
    block_d = 64 if d >= 2048 else 32
    R = max(16, triton.next_power_of_2(r))
    split = 8 if triton.cdiv(d, block_d) <= 64 and k >= 8 * 128 else 1
    block_k = 256 if k <= 2048 and (k // split) >= 256 else 128
    stages = 3
    while (block_n + block_d + R) * block_k * itemsize * stages > 160 * 1024 and block_k > 32:
        block_k //= 2
    k_per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    return block_n, block_d, block_k, triton.cdiv(k, k_per), k_per, 4, stages


class _Launch:
    """The kernel for one (rows, layer shape, rank, dtype, bias) key and plan, launched
    through its compiled launcher after the first call (``lorakit.kernels.launch``): Triton's
    JIT entry cost more host time than the three torch kernels this replaces."""

    __slots__ = ("n", "split", "blocks", "direct")

    def __init__(self, n: int, d: int, k: int, r: int, plan_: tuple[int, ...], dtype, has_bias: bool) -> None:
        block_n, block_d, block_k, split, k_per, warps, stages = plan_
        self.n, self.split, self.blocks = n, split, triton.cdiv(d, block_d)
        self.direct = launch.Direct(
            _kernel, (self.blocks, split),
            dict(D=d, K=k, r=r, R=max(16, triton.next_power_of_2(r)), HAS_BIAS=has_bias, SPLIT=split, K_PER=k_per,
                 BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k, IEEE=dtype == torch.float32),
            num_warps=warps, num_stages=stages)

    def __call__(self, x, weight, bias, A, B, scale: float, y: Tensor, ws: Tensor, cnt: Tensor) -> None:
        # every pointer is 16-byte aligned (``supported``; y, ws and cnt are fresh allocations)
        self.direct(x, weight, y if bias is None else bias, A, B, y, ws, cnt, self.n, float(scale))


_LAUNCHES: dict = {}
_BUFFERS: dict = {}
_RETIRED: list = []


def _buffers(device: torch.device, split: int, n: int, d: int, blocks: int) -> Optional[tuple[Tensor, Tensor]]:
    """(workspace float32 (split, n, d), arrival counters int32 (blocks,)) for a split-k launch.

    One pair per device and stream: launches on one stream run in order, so the workspace is
    reused and the counters are zero between launches (the last program of each column block
    resets its own). None while a CUDA graph is being captured and the buffers are too small
    (they must not be allocated inside the graph).
    """
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    buf = _BUFFERS.get(key)
    if buf is None or buf[0].numel() < split * n * d or buf[1].numel() < blocks:
        if torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _RETIRED.append(buf)                     # a captured CUDA graph may still point at it
        size = max(split * n * d, 0 if buf is None else 2 * buf[0].numel())
        buf = _BUFFERS[key] = (torch.empty(size, dtype=torch.float32, device=device),
                               torch.zeros(max(blocks, 4096), dtype=torch.int32, device=device))
    return buf


def lora_linear(x: Tensor, weight: Tensor, bias, A: Tensor, B: Tensor, scale: float) -> Optional[Tensor]:
    """y = x W0^T + b + s (x A^T) B^T for x (..., k), in one launch; returns (..., d), or None
    when the kernel does not take these operands (``supported``: the caller runs the plain form)."""
    if not supported(x, weight, bias, A, B):
        return None
    d, k = weight.shape
    r = A.shape[0]
    n = x.numel() // k
    y = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    key = (n, d, k, r, x.dtype, bias is not None, x.device.index)
    run = _LAUNCHES.get(key)
    if run is None:
        run = _LAUNCHES[key] = _Launch(n, d, k, r, plan(n, d, k, r, x.element_size()), x.dtype, bias is not None)
    ws = cnt = y
    if run.split > 1:
        buf = _buffers(x.device, run.split, n, d, run.blocks)
        if buf is None:                              # first call inside a CUDA graph capture: no split
            p = plan(n, d, k, r, x.element_size())
            run = _Launch(n, d, k, r, p[:3] + (1, triton.cdiv(k, p[2]) * p[2]) + p[5:], x.dtype, bias is not None)
        else:
            ws, cnt = buf
    run(x, weight, bias, A, B, scale, y, ws, cnt)
    return y


def launch_plan(x, weight, bias, A, B, scale, y, plan_: tuple[int, ...]) -> Tensor:
    """One launch with an explicit plan (the benchmark's sweep and the tests; nothing cached)."""
    d, k = weight.shape
    n = x.numel() // k
    one = _Launch(n, d, k, A.shape[0], plan_, x.dtype, bias is not None)
    ws = cnt = y
    if one.split > 1:
        buf = _buffers(x.device, one.split, n, d, one.blocks)
        if buf is None:
            raise RuntimeError("lorakit.kernels.skinny: a split-k plan's buffers must exist on this stream before "
                               "a CUDA graph capture (launch it once outside the graph)")
        ws, cnt = buf
    one(x, weight, bias, A, B, scale, y, ws, cnt)
    return y
