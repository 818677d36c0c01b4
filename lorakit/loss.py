"""Cross-entropy over a large vocabulary, fused with the output projection, in chunks.

A causal LM's loss is usually computed as::

    logits = h W^T            h: (N, H), W: (V, H)  ->  (N, V)       2 GB at N = 8192, V = 128k, bf16
    loss   = mean_n [ logsumexp(logits_n) - logits_n[y_n] ]            (plus a float32 copy: 4 GB more)

and backward keeps the float32 log-softmax (N, V) alive until the step ends. Here the rows
are processed ``chunk_size`` at a time and the gradient with respect to ``h`` is computed
in the forward pass, while the chunk's logits are at hand::

    z    = h_c W^T (+ b)                      (c, V)  in h's dtype, one chunk only
    logp = log_softmax(z)                     (c, V)  float32 (computed from z in float32)
    l_n  = -logp_n[y_n]
    p    = exp(logp) - onehot(y)              (c, V)  written over z, in h's dtype
    dH_c = (p W) * m_n / n_valid              (c, H)  kept for backward; m_n = 0 for ignored rows
    dW  += p^T (h_c * m / n_valid)            (V, H)  only when W itself requires a gradient

Backward only scales the stored ``dH`` (and ``dW``, ``db``) by the incoming gradient: no
logits are recomputed and none are kept. Per chunk the (c, V) data is touched about four
times in float32 units (the logits written, read twice by log_softmax, its float32 result
written and read once by exp, whose result in h's dtype the gradient GEMM reads), against
about ten for the unfused path (upcast copy, log-softmax, its backward, the cast back).
The loss's peak memory is one chunk instead of several (N, V) tensors.

Rows whose label is ``ignore_index`` contribute nothing; the mean is over the others (as
``F.cross_entropy``), except that a batch with every label ignored gives 0, not NaN.
Exact (to float rounding) against ``F.cross_entropy((h W^T + b).float(), y)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import ConfigError, ShapeMismatch

DEFAULT_CHUNK_ELEMENTS = 1 << 27      # float32 logits per chunk: 512 MiB


def _chunk_rows(n: int, vocab: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(n, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1)))


def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """z = h W^T + b in h's dtype: (c, H) x (V, H) -> (c, V)."""
    return h @ weight.t() if bias is None else torch.addmm(bias.to(h.dtype), h, weight.t())


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                chunk: int, reduction: str) -> Tensor:
        n = h.shape[0]
        w = weight.to(h.dtype)                                         # a no-op when the dtypes agree
        valid = labels != ignore_index                                 # (N,)
        denom = valid.sum().clamp_min(1).to(torch.float32) if reduction == "mean" else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        for i in range(0, n, chunk):
            hc, yc, vc = h[i:i + chunk], labels[i:i + chunk], valid[i:i + chunk]
            z = _chunk_logits(hc, w, bias)                               # (c, V), h's dtype
            logp = torch.log_softmax(z, dim=-1, dtype=torch.float32)     # (c, V) float32
            yc_safe = torch.where(vc, yc, 0).unsqueeze(1)                # (c, 1)
            losses[i:i + chunk] = torch.where(vc, logp.gather(1, yc_safe).squeeze(1).neg(), 0.0)
            if not (need_h or need_w or need_b):
                continue
            p = logp.exp_() if z.dtype == torch.float32 else torch.exp(logp, out=z)   # softmax, (c, V)
            p.scatter_add_(1, yc_safe, torch.full(yc_safe.shape, -1.0, dtype=p.dtype, device=p.device))
            m = vc.to(torch.float32) if denom is None else vc.to(torch.float32) / denom   # (c,) row weights
            if need_h:
                torch.mm(p, w, out=dh[i:i + chunk]).mul_(m.to(h.dtype).unsqueeze(1))     # (c, H)
            if need_w:
                dw.addmm_(p.t().float(), hc.float() * m.unsqueeze(1))
            if need_b:
                db.add_(m.to(p.dtype) @ p)
        ctx.save_for_backward(dh, dw, db)
        ctx.reduction, ctx.w_dtype = reduction, weight.dtype
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / denom if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad: Tensor):
        dh, dw, db = ctx.saved_tensors
        if ctx.reduction == "none":
            raise RuntimeError("linear_cross_entropy(reduction='none') supports no backward; "
                               "use reduction='mean' or 'sum'")
        g = grad.to(torch.float32)
        gh = dh * g.to(dh.dtype) if dh is not None else None
        gw = (dw * g).to(ctx.w_dtype) if dw is not None else None
        gb = (db * g).to(ctx.w_dtype) if db is not None else None
        return gh, gw, gb, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: Optional[int] = None) -> Tensor:
    """cross_entropy(hidden @ weight^T + bias, labels) without materialising the logits.

    hidden: (..., H); weight: (V, H) (the output head, e.g. ``model.lm_head.weight``);
    labels: (...) integers in [0, V) or ``ignore_index``; bias: (V,) or None.
    ``reduction``: "mean" (over non-ignored rows, as F.cross_entropy), "sum", or "none"
    (per-row losses, no backward). ``chunk_size``: rows per chunk (default: as many as
    keep one chunk of float32 logits under 512 MiB).

    Example::

        h = model.model(input_ids=ids).last_hidden_state          # (B, T, H)
        loss = linear_cross_entropy(h[:, :-1], model.lm_head.weight, ids[:, 1:])
    """
    if reduction not in ("mean", "sum", "none"):
        raise ConfigError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ShapeMismatch(f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} "
                            f"and labels {tuple(labels.shape)} do not fit: expected hidden (..., H), "
                            "weight (V, H), labels (...)")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y2 = labels.reshape(-1)
    chunk = _chunk_rows(h2.shape[0], weight.shape[0], chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):     # dtypes are handled explicitly inside
        out = _LinearCrossEntropyFn.apply(h2, weight, bias, y2, ignore_index, chunk, reduction)
    return out.view(labels.shape) if reduction == "none" else out
