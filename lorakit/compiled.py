"""The fast path as opaque operators for torch.compile.

Eager mode runs the LoRA linear (``ops._LoraLinearFn``) and the fused gated MLP
(``fused._GatedMlpFn``) as custom autograd functions. Under torch.compile the same
forward and backward code runs as ``torch.library`` custom operators instead, so that the
compiler treats each as one opaque node:

* ``lorakit::lora_linear`` (x, W0, b, A, B, s, merged) -> (y, xa)
  and its backward ``lorakit::lora_linear_backward`` -> (dx, dA, dB);
* ``lorakit::gated_mlp`` (x, Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd, sg, su, sd) -> (y, gu, xas, has)
  and its backward ``lorakit::gated_mlp_backward`` -> (dx, dAg, dBg, dAu, dBu, dAd, dBd).

Why opaque: traced op by op, the merged weight W' = W0 + s B A that backward rebuilds is
a function of forward inputs only, so the partitioner hoists it into the forward graph and
keeps it for backward (the model's size in memory); the Triton kernels (the one-pass W'
builder, the SwiGLU passes) would not run; and the fused MLP, which recomputes
h = silu(g) * u in backward instead of keeping it, could not exist. As operators, the
compiler fuses everything around them (norms, rotary, residual adds) and saves exactly
their inputs and the outputs listed above; the backward operator rebuilds W' itself.

Outputs that a given call does not need are returned as empty tensors (an operator's
outputs cannot be None) and mapped back to None for autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import fused, ops

AVAILABLE = hasattr(torch.library, "custom_op")     # torch >= 2.4; older versions trace the autograd functions


def _none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _some(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


if AVAILABLE:
    # ------------------------------------------------------------------------ LoRA linear
    @torch.library.custom_op("lorakit::lora_linear", mutates_args=())
    def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                merged: bool) -> tuple[Tensor, Tensor]:
        """(y (..., d), xa = x A^T (..., r)): ``ops.linear_forward`` with no dropout."""
        out, xa, _ = ops.linear_forward(x, None, weight, bias, _cast(A, x.dtype), _cast(B, x.dtype), scale,
                                        merged, True)
        return out, xa

    @_linear.register_fake
    def _(x, weight, bias, A, B, scale, merged):
        lead = x.shape[:-1]
        return x.new_empty(lead + (weight.shape[0],)), x.new_empty(lead + (A.shape[0],))

    @torch.library.custom_op("lorakit::lora_linear_backward", mutates_args=())
    def _linear_backward(dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, A: Tensor, B: Tensor, scale: float,
                         merged: bool, need_x: bool, need_a: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(dx, dA, dB), each an empty tensor when not needed; dA, dB in A's and B's dtypes."""
        dx, _, dA, dB = ops.linear_backward(dy, x, xa, weight, _cast(A, x.dtype), _cast(B, x.dtype), scale,
                                            merged, True, (need_x, False, need_a, need_b))
        dA = None if dA is None else _cast(dA, A.dtype)
        dB = None if dB is None else _cast(dB, B.dtype)
        return _none(dx, x), _none(dA, A), _none(dB, B)

    @_linear_backward.register_fake
    def _(dy, x, xa, weight, A, B, scale, merged, need_x, need_a, need_b):
        return (torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(A) if need_a else A.new_empty(0),
                torch.empty_like(B) if need_b else B.new_empty(0))

    def _linear_setup(ctx, inputs, output):
        x, weight, _, A, B, scale, merged = inputs
        ctx.scale, ctx.merged = scale, merged
        ctx.save_for_backward(x, output[1], weight, A, B)

    def _linear_grad(ctx, dy, _dxa):
        x, xa, weight, A, B = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        dx, dA, dB = _linear_backward(dy, x, xa, weight, A, B, ctx.scale, ctx.merged, need_x, need_a, need_b)
        return _some(dx), None, None, _some(dA), _some(dB), None, None

    _linear.register_autograd(_linear_grad, setup_context=_linear_setup)

    # ------------------------------------------------------------------------ gated MLP
    @torch.library.custom_op("lorakit::gated_mlp", mutates_args=())
    def _mlp(x: Tensor, wg: Tensor, wu: Tensor, wd: Tensor, ag: Tensor, bg: Tensor, au: Tensor, bu: Tensor,
             ad: Tensor, bd: Tensor, sg: float, su: float, sd: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(y (..., H), gu (N, 2I), xas (N, rg + ru), has (N, rd)): ``fused.mlp_forward``."""
        hid = wg.shape[1]
        adapters = [_cast(t, x.dtype) for t in (ag, bg, au, bu, ad, bd)]
        y, gu, xas, has = fused.mlp_forward(x.reshape(-1, hid), wg, wu, wd, *adapters, sg, su, sd, True, True)
        return y.view(x.shape), gu, xas, has

    @_mlp.register_fake
    def _(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd):
        i, hid = wg.shape
        n = x.numel() // hid
        return (x.new_empty(x.shape), x.new_empty((n, 2 * i)), x.new_empty((n, ag.shape[0] + au.shape[0])),
                x.new_empty((n, ad.shape[0])))

    @torch.library.custom_op("lorakit::gated_mlp_backward", mutates_args=())
    def _mlp_backward(dy: Tensor, x: Tensor, gu: Tensor, xas: Tensor, has: Tensor, wg: Tensor, wu: Tensor,
                      wd: Tensor, ag: Tensor, bg: Tensor, au: Tensor, bu: Tensor, ad: Tensor, bd: Tensor, sg: float,
                      su: float, sd: float, need: list[bool]) -> list[Tensor]:
        """[dx, dAg, dBg, dAu, dBu, dAd, dBd], empty where not needed; adapter grads in their dtypes."""
        hid = wg.shape[1]
        adapters = (ag, bg, au, bu, ad, bd)
        dx, *grads = fused.mlp_backward(dy.reshape(-1, hid), x.reshape(-1, hid), gu, xas, has, wg, wu, wd,
                                        *(_cast(t, x.dtype) for t in adapters), sg, su, sd, tuple(need))
        if grads[0] is not None and grads[2] is not None:
            grads[2] = grads[2].clone()         # dAg, dAu: two halves of one tensor; outputs may not alias
        grads = [_none(None if g is None else _cast(g, t.dtype), t) for g, t in zip(grads, adapters)]
        return [_none(None if dx is None else dx.view(x.shape), x), *grads]

    @_mlp_backward.register_fake
    def _(dy, x, gu, xas, has, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd, need):
        like = (x, ag, bg, au, bu, ad, bd)
        return [torch.empty_like(t) if n else t.new_empty(0) for t, n in zip(like, need)]

    def _mlp_setup(ctx, inputs, output):
        x, wg, wu, wd, *adapters = inputs[:10]
        ctx.scales = inputs[10:13]
        ctx.save_for_backward(x, *output[1:], wg, wu, wd, *adapters)

    def _mlp_grad(ctx, dy, _dgu, _dxas, _dhas):
        x, gu, xas, has, wg, wu, wd, *adapters = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _mlp_backward(dy, x, gu, xas, has, wg, wu, wd, *adapters, *ctx.scales, [need[0], *need[4:10]])
        dx, *rest = (_some(g) for g in grads)
        return (dx, None, None, None, *rest, None, None, None)

    _mlp.register_autograd(_mlp_grad, setup_context=_mlp_setup)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                merged: bool) -> Tensor:
    """y = x W0^T + b + s (x A^T) B^T as the ``lorakit::lora_linear`` operator (training, no dropout)."""
    return torch.ops.lorakit.lora_linear(x, weight, bias, A, B, scale, merged)[0]


def gated_mlp(x: Tensor, wg: Tensor, wu: Tensor, wd: Tensor, ag: Tensor, bg: Tensor, au: Tensor, bu: Tensor,
              ad: Tensor, bd: Tensor, sg: float, su: float, sd: float) -> Tensor:
    """down(silu(gate(x)) * up(x)) with LoRA on all three, as the ``lorakit::gated_mlp`` operator."""
    return torch.ops.lorakit.gated_mlp(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd)[0]
