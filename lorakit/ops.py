"""The LoRA math as plain functions.

For a frozen weight W0 (d x k), an adapter A (r x k), B (d x r) and scale s::

    y = x W0^T + b + s * (x A^T) B^T                       x: (..., k) -> y: (..., d)

Two implementations compute that same function:

* ``*_reference``: the readable version, plain autograd. Tests compare against it.
* ``lora_linear``: the fast path (the default). A custom autograd function that

  - accumulates the low-rank term into the base output inside one GEMM
    (``out.addmm_(xa, B^T, alpha=s)``: no extra full-size elementwise pass);
  - saves only what backward needs: the input x (the same tensor object for q/k/v, so
    shared, never copied), the small ``xa = x A^T`` (N x r) and the weights; no float32
    copies of activations;
  - computes, with no gradient for W0 (it is frozen)::

        g  = dY B                  (N x r)
        dX = dY W0 + s g A         (N x k)   one GEMM plus one accumulating GEMM
        dA = s g^T x               (r x k)
        dB = s dY^T xa             (d x r)

  It falls back to the reference when the base weight itself requires a gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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
class _LoraLinearFn(torch.autograd.Function):
    """y = x W0^T + b + s (xd A^T) B^T with W0 and b frozen. See the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, xd: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                scale: float) -> Tensor:
        k, d = weight.shape[1], weight.shape[0]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)                                  # (N, k)
        xd2 = x2 if xd is x else xd.reshape(-1, k)             # (N, k)
        Ac, Bc = A.to(x.dtype), B.to(x.dtype)                  # no-ops when dtypes agree
        xa = xd2 @ Ac.t()                                      # (N, r)
        if bias is None:
            out = x2 @ weight.t()                              # (N, d)
        else:
            out = torch.addmm(bias, x2, weight.t())
        out.addmm_(xa, Bc.t(), alpha=scale)                    # += s xa B^T, fused into the GEMM
        ctx.scale = scale
        ctx.same_input = xd is x
        ctx.save_for_backward(xd2 if A.requires_grad else None, xa if B.requires_grad else None,
                              weight, Ac, Bc)
        ctx.dtypes = (A.dtype, B.dtype, xd.dtype)
        ctx.lead = lead
        return out.view(*lead, d)

    @staticmethod
    def backward(ctx, dy: Tensor):
        xd2, xa, weight, Ac, Bc = ctx.saved_tensors
        s = ctx.scale
        d, k = weight.shape
        dy2 = dy.reshape(-1, d)                                # (N, d)
        g = dy2 @ Bc                                           # (N, r)
        dx = dxd = dA = dB = None
        need_x, need_xd, need_a, need_b = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                           ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        if need_x or need_xd:
            if ctx.same_input:
                dx = (dy2 @ weight).addmm_(g, Ac, alpha=s).view(*ctx.lead, k)   # dY W0 + s g A
            else:
                dx = (dy2 @ weight).view(*ctx.lead, k) if need_x else None
                dxd = (g @ Ac).mul_(s).view(*ctx.lead, k) if need_xd else None
        if need_a:
            dA = (g.t() @ xd2).mul_(s).to(ctx.dtypes[0])       # (r, k)
        if need_b:
            dB = (dy2.t() @ xa).mul_(s).to(ctx.dtypes[1])      # (d, r)
        return dx, dxd, None, None, dA, dB, None


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                x_drop: Optional[Tensor] = None) -> Tensor:
    """The fast path for y = x W0^T + b + s (x_drop A^T) B^T (same signature as the reference).

    Under autocast the operands are cast to the autocast dtype first, as autocast would.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return lora_linear_reference(x, weight, bias, A, B, scale, x_drop)
    xd = x if x_drop is None else x_drop
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        same = xd is x
        x = x.to(dt)
        xd = x if same else xd.to(dt)
        weight = weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return _LoraLinearFn.apply(x, xd, weight, bias, A, B, scale)
    if weight.dtype != x.dtype:
        raise TypeError(f"lora_linear: input dtype {x.dtype} differs from the base weight's {weight.dtype}")
    return _LoraLinearFn.apply(x, xd, weight, bias, A, B, scale)


def lora_embedding(ids: Tensor, weight: Tensor, A: Tensor, B: Tensor, scale: float, **embed_kwargs) -> Tensor:
    """y = W0[ids] + s A^T[ids] B^T, the low-rank term accumulated in place into the base output."""
    out = F.embedding(ids, weight, **embed_kwargs)                           # (..., dim)
    after_a = F.embedding(ids, A.t(), padding_idx=embed_kwargs.get("padding_idx"))  # (..., r)
    dim, r = B.shape
    out2 = out.view(-1, dim)
    out2.addmm_(after_a.reshape(-1, r).to(out.dtype), B.t().to(out.dtype), alpha=scale)
    return out
