"""The LoRA math as plain functions.

For a frozen weight W0 (d x k), an adapter A (r x k), B (d x r) and scale s::

    y = x W0^T + b + s * (x A^T) B^T                       x: (..., k) -> y: (..., d)

Two implementations compute that same function:

* ``*_reference``: the readable version, plain autograd. Tests compare against it.
* ``lora_linear``: the fast path (the default). A custom autograd function that

  - never makes a full-size elementwise pass for the low-rank term. Per call it picks
    (``merged_is_cheaper``, from the shapes alone) between two exact forms:

        unmerged:  out = b + s xa B^T;  out += x W0^T      (the rank-r GEMM writes out, the big
                                                               GEMM accumulates onto it: one write
                                                               of out, and a read in its epilogue)
        merged:    out = x W'^T + b,  W' = W0 + s B A         (W' built in one pass over W0,
                                                               then dropped)

    Merged wins when the token count N is large against the layer's width (training
    steps, prefill): rebuilding a (d, k) weight is cheaper than a pass over an (N, d)
    output. Unmerged wins for short inputs (decoding);
  - saves only what backward needs: the input x (the same storage for q/k/v, so
    shared, never copied), the small ``xa = x A^T`` (N x r) and the weights; no float32
    copies of activations;
  - computes, with no gradient for W0 (it is frozen)::

        g  = s dY B                (N x r)
        dX = dY W0 + g A  = dY W'  (N x k)   one GEMM (unmerged: g A first, dY W0 accumulates onto it)
        dA = g^T x                 (r x k)
        dB = s (xa^T dY)^T         (d x r)

    three skinny passes over the (N, d) / (N, k) activations beyond the frozen bound's
    single GEMM: dY twice (g, dB) and x once (dA);
  - issues the fewest kernels it can (3 forward, 5 backward; the scale rides on GEMM
    ``alpha``): on a GPU the host's time per launch, times 112 adapted layers, is what a
    training step of a 1B model waits on once the bytes are right;
  - builds no autograd node at all under ``torch.no_grad`` (inference: the forward alone),
    and on the GPU runs at most 64 rows (decoding) as one Triton launch for the whole layer
    (``lorakit.kernels.skinny``: decoding is bound by the host's time per launch);
  - runs under ``torch.compile(fullgraph=True)`` as the opaque operator
    ``lorakit::lora_linear`` (lorakit.compiled): the same code, and the compiler never
    sees (nor keeps) W'. With dropout it traces the autograd function.

  It falls back to the reference when the base weight itself requires a gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .wprime import merged_weight, stacked_merged_weight


# ---------------------------------------------------------------------------- reference
def lora_linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                          scale: float, x_drop: Optional[Tensor] = None) -> Tensor:
    """y = x W0^T + b + s (x_drop A^T) B^T, with plain autograd.

    x: (..., k); weight: (d, k); bias: (d,) or None; A: (r, k); B: (d, r);
    x_drop: dropout(x) or None (then x itself feeds the adapter). Returns (..., d).
    """
    xd = x if x_drop is None else x_drop
    base = F.linear(x, weight, bias)
    delta = F.linear(F.linear(xd.to(A.dtype), A), B)
    return base + (scale * delta).to(base.dtype)


def lora_embedding_reference(ids: Tensor, weight: Tensor, A: Tensor, B: Tensor, scale: float,
                             **embed_kwargs) -> Tensor:
    """y = W0[ids] + s A^T[ids] B^T.

    ids: (...) integer; weight: (num_embeddings, dim); A: (r, num_embeddings); B: (dim, r).
    Returns (..., dim). ``embed_kwargs`` are F.embedding's (padding_idx, max_norm, ...).
    """
    base = F.embedding(ids, weight, **embed_kwargs)
    after_a = F.embedding(ids, A.t(), padding_idx=embed_kwargs.get("padding_idx"))  # (..., r)
    return base + (scale * (after_a @ B.t())).to(base.dtype)


def conv_delta_weight(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """The conv kernel equal to conv_B(conv_A(.)): B is a 1x1 conv (out, r, 1, ...), A (r, in, *kernel).

    delta[o, i, ...] = s * sum_r B[o, r] A[r, i, ...]   -> (out, in, *kernel)
    """
    return scale * torch.einsum("or,ri...->oi...", B.flatten(1), A)


def linear_delta_weight(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """delta W = s B A: (d, r) @ (r, k) -> (d, k)."""
    return scale * (B @ A)


# ---------------------------------------------------------------------------- fast path
# A GEMM that accumulates onto its output (beta = 1) reads that output in its epilogue; at the
# shapes where the forms compete the GEMM is compute-bound and the read partly overlaps its main
# loop. The fraction of a separate read pass it costs, for the byte counts of the forms: the H200
# measured 0.06-0.58 at the MLP's shapes (bench/mlp_forms.py, ``mlp_forms_h200_epilogue.md``).
EPILOGUE_READ = 0.5


def merged_is_cheaper(n: int, d: int, k: int, training: bool, ties: bool = False,
                      c: float = EPILOGUE_READ) -> bool:
    """Whether to run the low-rank term through W' = W0 + s B A rather than beside W0.

    Per call, beyond what both forms share (the GEMM with the (d, k) weight, x A^T):

    * beside W0 (unmerged): the rank-r GEMM writes s xa B^T (+ b) into the (N, d) output and the
      big GEMM accumulates onto it (one write of the output, and ``c`` of a read); a training
      backward does the same into the (N, k) dX;
    * through W' (merged): W' is built from W0 (one read and one write of (d, k)) in the
      forward, and again in a training backward (W' is not kept: it would cost as much
      memory as the model).

    So merged when 4 d k < N (d + k) (1 + c) in training, 2 d k < N (d (1 + c) + k) without
    backward (there the unmerged form also reads x once more for xa, which the merged form
    skips). Training at 8k tokens per step and long prefills pick merged; decoding picks
    unmerged. ``ties``: also True where both forms cost the same. (On a CPU the multiply-adds,
    r times the same counts, give about the same rule.)
    """
    if training:
        cost = n * (d + k) * (1 + c)
        return 4 * d * k < cost or (ties and 4 * d * k == cost)
    return 2 * d * k < n * (d * (1 + c) + k)


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast casts to on x's device, or None when autocast is off there.

    Runs once per adapted layer per call: one global check first (autocast is usually off),
    and the device name only when it is on (``x.device`` builds an object)."""
    if _ANY_AUTOCAST is not None and not torch.compiler.is_compiling() and not _ANY_AUTOCAST():
        return None
    dev = "cuda" if x.is_cuda else x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# Every kernel launch costs host time (several microseconds on a GPU, more than the small
# GEMMs themselves at decoding sizes, and a training step of a 1B model runs 112 of these
# layers): the code below issues the fewest operations it can. The scale s rides on the
# GEMMs (``alpha``) instead of separate multiplications; ``addmm(c, a, b, beta=0, alpha=s)``
# computes s a b and ignores c (documented: not even NaN in c propagates), so a tensor of
# the right shape that is at hand serves as c.
def linear_forward(x: Tensor, xd: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], Ac: Tensor, Bc: Tensor,
                   scale: float, merged: bool, need_xa: bool) -> tuple[Tensor, Optional[Tensor], bool]:
    """The training forward: (out (..., d), xa = xd A^T (..., r) or None, the form used).

    Ac, Bc are already in x's dtype. Merged: out = x W'^T + b, and xa is only computed when
    ``need_xa`` (for dB); without a bias it rides in the same GEMM, [out | xa] = x [W'; A]^T (the
    W' kernel writes A's rows in its launch), out a column slice of the result (row stride d + r,
    ``xa_rides``) and xa a copy, so that keeping xa does not keep out's buffer: x is read once and
    the call makes one GEMM. Unmerged (always with dropout): out = x W0^T + b, then
    out += s xa B^T as the epilogue of a rank-r GEMM.
    """
    if xd is None and merged:
        if xa_rides(need_xa, bias):
            d = weight.shape[0]
            yx = F.linear(x, stacked_merged_weight([weight], [Bc], [Ac], [scale], append_a=True))   # (..., d + r)
            return yx[..., :d], yx[..., d:].clone(), True
        out = F.linear(x, merged_weight(weight, Bc, Ac, scale), bias)      # x W'^T + b   (..., d)
        return out, (F.linear(x, Ac) if need_xa else None), True           # (..., r), for dB only
    xa = F.linear(x if xd is None else xd, Ac)                              # (..., r)
    return beside(x, weight, bias, xa, Bc, scale), xa, False


# False: xa = x A^T is a GEMM of its own in the merged forward of the LoRA linear and of the q/k/v
# node (benchmarks compare). Set it between training steps, never between a forward and its backward.
XA_IN_GEMM = True


def xa_rides(need_xa: bool, bias: Optional[Tensor]) -> bool:
    """Whether the merged ``linear_forward`` computes xa in its GEMM (no bias): its output is then
    a column slice with row stride d + r (the compiled operator's fake kernel says so)."""
    return XA_IN_GEMM and need_xa and bias is None


def beside(x: Tensor, weight: Tensor, bias: Optional[Tensor], xa: Tensor, B: Tensor, scale: float) -> Tensor:
    """x W0^T + b + s xa B^T, (..., d), by ``beside_into`` a new output."""
    d, r = B.shape
    x2, xa2 = x.reshape(-1, x.shape[-1]), xa.reshape(-1, r)
    out = x2.new_empty((x2.shape[0], d))
    return beside_into(out, xa2, B, scale, x2, weight.t(), bias).view(x.shape[:-1] + (d,))


def beside_into(out: Tensor, xa: Tensor, B: Tensor, scale: float, x: Tensor, W: Tensor,
                bias: Optional[Tensor] = None) -> Tensor:
    """out = b + s xa B^T + x W, written into ``out`` (2-D; a column slice is fine): the rank-r
    GEMM writes b + s xa B^T, then the big GEMM accumulates onto it (beta = 1: out is read in
    its epilogue, one pass fewer than adding the low-rank term afterwards). ``W`` as the GEMM
    reads it (W0^T forward, W0 backward). Returns out."""
    if bias is None:
        torch.addmm(out, xa, B.t(), beta=0, alpha=scale, out=out)         # beta = 0: out's contents ignored
    else:
        torch.addmm(bias, xa, B.t(), alpha=scale, out=out)
    return out.addmm_(x, W)


def linear_backward(dy: Tensor, xd: Optional[Tensor], xa: Optional[Tensor], weight: Tensor, Ac: Tensor, Bc: Tensor,
                    scale: float, merged: bool, same: bool, need: tuple[bool, bool, bool, bool],
                    ) -> tuple[Optional[Tensor], ...]:
    """(dx, dxd, dA, dB) of ``linear_forward`` for dY (..., d); ``need`` flags the same four.

    xd: the input the adapter read (x itself when ``same``: no dropout); gradients come in
    x's dtype (the caller casts dA and dB to the adapter's). Merged: dX = dY W' with W'
    rebuilt; unmerged: dX = dY W0, then += s g A as one accumulating GEMM.
    """
    need_x, need_xd, need_a, need_b = need
    s = scale
    d, k = weight.shape
    r = Ac.shape[0]
    dy2 = dy.reshape(-1, d)                                                 # (N, d)
    xa2 = xa.reshape(-1, r) if xa is not None else None                     # (N, r)
    gs = None                                                               # s dY B, (N, r)
    if need_a or need_xd or (need_x and same and not merged):
        gs = torch.addmm(xa2, dy2, Bc, beta=0, alpha=s) if xa2 is not None else torch.mm(dy2, Bc).mul_(s)
    dx = dxd = dA = dB = None
    if need_x:
        if merged:
            dx = dy.matmul(merged_weight(weight, Bc, Ac, s))                # dY W' = dY W0 + s (dY B) A
        elif same:                                                          # s g A, then += dY W0 onto it
            dx = torch.mm(gs, Ac).addmm_(dy2, weight).view(dy.shape[:-1] + (k,))
        else:
            dx = dy.matmul(weight)                                          # dY W0 (s g A flows through dropout)
    if need_xd:
        dxd = torch.mm(gs, Ac).view(dy.shape[:-1] + (k,))                  # s g A (flows back through dropout)
    if need_a:
        dA = torch.mm(gs.t(), xd.reshape(-1, k))                            # s g^T xd, (r, k)
    if need_b:
        # s dY^T xa, (d, r), made contiguous by the GEMM itself (a transposed result would
        # be copied by autograd when it accumulates into .grad)
        dB = torch.addmm(Bc, dy2.t(), xa2, beta=0, alpha=s)
    return dx, dxd, dA, dB


class _LoraLinearFn(torch.autograd.Function):
    """y = x W0^T + b + s (xd A^T) B^T with W0 and b frozen. See the module docstring.

    Inputs: x (..., k); xd: the dropped-out input (..., k), or None when the adapter reads x
    itself; weight (d, k); bias (d,) or None; A (r, k); B (d, r); scale; merged (bool).
    A and B may be float32 on a lower-precision base: they are cast to x's dtype for the
    GEMMs (a (r, k) and a (d, r) copy, never an activation) and their gradients are
    returned in their own dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, xd: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], A: Tensor,
                B: Tensor, scale: float, merged: bool) -> Tensor:
        Ac, Bc = _cast(A, x.dtype), _cast(B, x.dtype)               # no-ops when the dtypes agree
        out, xa, merged = linear_forward(x, xd, weight, bias, Ac, Bc, scale, merged, ctx.needs_input_grad[5])
        # Backward rebuilds W' rather than keeping it (it would cost the model's size in memory).
        # (Under torch.compile the custom operators of lorakit.compiled run instead of this node.)
        ctx.scale, ctx.same, ctx.merged = scale, xd is None, merged
        ctx.a_dtype, ctx.b_dtype = A.dtype, B.dtype
        ctx.save_for_backward((x if xd is None else xd) if ctx.needs_input_grad[4] else None, xa, weight, Ac, Bc)
        # Never a view for autograd (F.linear's output on a 3-D input is one, and so is a column
        # slice): a caller may modify it in place, as it may nn.Linear's (nothing saved reads it)
        return out.detach()

    @staticmethod
    def backward(ctx, dy: Tensor):
        xd, xa, weight, Ac, Bc = ctx.saved_tensors
        need_x, need_xd, _, _, need_a, need_b, _, _ = ctx.needs_input_grad
        dx, dxd, dA, dB = linear_backward(dy, xd, xa, weight, Ac, Bc, ctx.scale, ctx.merged, ctx.same,
                                          (need_x, need_xd, need_a, need_b))
        dA = None if dA is None else _cast(dA, ctx.a_dtype)
        dB = None if dB is None else _cast(dB, ctx.b_dtype)
        return dx, dxd, None, None, dA, dB, None, None


def _lora_linear_nograd(x: Tensor, xd: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], A: Tensor,
                        B: Tensor, scale: float, merged: bool) -> Tensor:
    """The forward alone (inference): no autograd node, the fewest kernels (2 merged; a few rows
    on the GPU 1, else 3 unmerged)."""
    dt = x.dtype
    if A.dtype != dt:
        A = A.to(dt)
    if B.dtype != dt:
        B = B.to(dt)
    if merged and xd is None:
        return F.linear(x, merged_weight(weight, B, A, scale), bias)
    if xd is None and x.is_cuda and not torch.compiler.is_compiling():
        k = kernels.load("skinny")                                          # a few rows (decoding): one launch
        y = None if k is None else k.lora_linear(x, weight, bias, A, B, scale)
        if y is not None:
            return y
    return beside(x, weight, bias, F.linear(x if xd is None else xd, A), B, scale)


def lora_linear_nograd(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                       scale: float) -> Tensor:
    """``lora_linear`` for callers that know gradients are off and there is no dropout: the
    same checks (autocast, dtypes) and forms, with less host time per call."""
    cast_to = autocast_dtype(x)
    if cast_to is not None:
        return _lora_linear_autocast(x, weight, bias, A, B, scale, None, "auto", cast_to)
    if weight.dtype != x.dtype:
        raise TypeError(f"lora_linear: input dtype {x.dtype} differs from the base weight's {weight.dtype}")
    d, k = weight.shape
    return _lora_linear_nograd(x, None, weight, bias, A, B, scale, merged_is_cheaper(x.numel() // k if k else 0, d, k,
                                                                                      False))


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                x_drop: Optional[Tensor] = None, *, mode: str = "auto") -> Tensor:
    """The fast path for y = x W0^T + b + s (x_drop A^T) B^T (same signature as the reference).

    ``mode``: "auto" (``merged_is_cheaper`` decides per call from the shapes), "merged" or
    "unmerged" (for benchmarks and tests; both compute the same function). With dropout
    (``x_drop`` given) the unmerged form is always used. Under autocast the operands are
    cast to the autocast dtype first, as autocast would. Without gradients (inference,
    ``torch.no_grad``) no autograd node is built.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return lora_linear_reference(x, weight, bias, A, B, scale, x_drop)
    cast_to = autocast_dtype(x)
    if cast_to is not None:
        return _lora_linear_autocast(x, weight, bias, A, B, scale, x_drop, mode, cast_to)
    if weight.dtype != x.dtype:
        raise TypeError(f"lora_linear: input dtype {x.dtype} differs from the base weight's {weight.dtype}")
    grad = torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                        or (x_drop is not None and x_drop.requires_grad))
    if mode == "auto":
        d, k = weight.shape
        merged = merged_is_cheaper(x.numel() // k if k else 0, d, k, grad)
    else:
        merged = mode == "merged"
    if grad:
        if x_drop is None and torch.compiler.is_compiling():
            from . import compiled             # the same code as one opaque operator (see lorakit.compiled)
            if compiled.AVAILABLE:
                return compiled.lora_linear(x, weight, bias, A, B, scale, merged)
        return _LoraLinearFn.apply(x, x_drop, weight, bias, A, B, scale, merged)
    return _lora_linear_nograd(x, x_drop, weight, bias, A, B, scale, merged)


def _lora_linear_autocast(x, weight, bias, A, B, scale, x_drop, mode, dt: torch.dtype):
    """lora_linear under autocast: operands cast to the autocast dtype ``dt``, then autocast off."""
    dev = x.device.type
    x, weight = x.to(dt), weight.to(dt)
    x_drop = x_drop.to(dt) if x_drop is not None else None
    bias = bias.to(dt) if bias is not None else None
    with torch.autocast(dev, enabled=False):
        return lora_linear(x, weight, bias, A, B, scale, x_drop, mode=mode)


def lora_embedding(ids: Tensor, weight: Tensor, A: Tensor, B: Tensor, scale: float, **embed_kwargs) -> Tensor:
    """y = W0[ids] + s A^T[ids] B^T, the low-rank term accumulated in place into the base output."""
    out = F.embedding(ids, weight, **embed_kwargs)                           # (..., dim)
    after_a = F.embedding(ids, A.t(), padding_idx=embed_kwargs.get("padding_idx"))  # (..., r)
    dim, r = B.shape
    out2 = out.view(-1, dim)
    out2.addmm_(after_a.reshape(-1, r).to(out.dtype), B.t().to(out.dtype), alpha=scale)
    return out
