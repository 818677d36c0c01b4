"""The fast path as opaque operators for torch.compile.

Eager mode runs the LoRA linear (``ops._LoraLinearFn``) and the fused gated MLP
(``fused._GatedMlpFn``) as custom autograd functions. Under torch.compile the same
forward and backward code runs as ``torch.library`` custom operators instead, so that the
compiler treats each as one opaque node:

* ``lorakit::lora_linear`` (x, W0, b, A, B, s, merged) -> (y, xa)
  and its backward ``lorakit::lora_linear_backward`` -> (dx, dA, dB);
* ``lorakit::gated_mlp`` (x, Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd, sg, su, sd) -> (y, gu, has)
  and its backward ``lorakit::gated_mlp_backward`` -> (dx, [dAg; dAu], dBg, dBu, dAd, dBd);
* ``lorakit::shared_linear`` (x, [W_i], [b_i], [A_i], [B_i], [s_i]) -> [y_1, ..., y_m, xa]
  (q, k and v as one node, lorakit.grouped) and its backward
  ``lorakit::shared_linear_backward`` (dY = [dy_1 | ... | dy_m], ...) -> [dx, [dA_1; ...; dA_m],
  dB_1, ..., dB_m] (the stacked dA is split outside the operator: its outputs may not alias; dY
  is concatenated outside it, where the compiler fuses the concatenation into its own kernels).

Why opaque: traced op by op, the merged weight W' = W0 + s B A that backward rebuilds is
a function of forward inputs only, so the partitioner hoists it into the forward graph and
keeps it for backward (the model's size in memory); the Triton kernels (the one-pass W'
builder, the SwiGLU passes) would not run; and the fused MLP, which recomputes
h = silu(g) * u in backward instead of keeping it, could not exist. As operators, the
compiler fuses everything around them (norms, rotary, residual adds) and saves exactly
their inputs and the outputs listed above; the backward operator rebuilds W' itself.

Outputs that a given call does not need are returned as empty tensors (an operator's
outputs cannot be None) and mapped back to None for autograd.

Each operator has one overload, named after a hash of the code behind it (``OVERLOAD``), and
is called by that name. torch.compile's on-disk caches key a compiled graph on its code, which
names the overload, but not on an operator's Python implementation: with a fixed name, a
cache filled by another lorakit version served graphs that assumed that version's outputs.
``op(name)`` returns the overload.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch
from torch import Tensor, nn

from . import fused, grouped, ops, wprime
from .ops import _cast

AVAILABLE = hasattr(torch.library, "register_fake")      # torch >= 2.4; before, the autograd functions are traced

# Registered with the low-level torch.library API: a schema, one CompositeExplicitAutograd
# kernel, a fake (shape) kernel, and an Autograd kernel that goes straight to the
# implementation when there is nothing to record. Host time per call on the build machine,
# small tensors: 31 us, of which 15 us the work itself; torch.library.custom_op with
# register_autograd took 49 us. A compiled training step of a 1B model makes 160 of these
# calls, and at that step time the host is what runs short.
def _code_tag() -> str:
    """'v' + 12 hex digits of the SHA-256 of the modules whose code the operators run (of the
    package's version where the sources cannot be read, as in a zipped bundle)."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    try:
        for rel in ("compiled", "ops", "wprime", "fused", "activation", "grouped", "kernels/merge", "kernels/swiglu"):
            with open(os.path.join(here, rel + ".py"), "rb") as f:
                h.update(f.read())
    except OSError:
        from importlib.metadata import PackageNotFoundError, version
        try:
            h.update(version("lorakit").encode())
        except PackageNotFoundError:
            h.update(b"unknown")
    return "v" + h.hexdigest()[:12]


OVERLOAD = _code_tag()

_SCHEMAS = {
    "lora_linear": "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale, "
                   "bool merged) -> (Tensor, Tensor)",
    "lora_linear_backward": "lora_linear_backward(Tensor dy, Tensor x, Tensor xa, Tensor weight, Tensor A, Tensor B, "
                            "float scale, bool merged, bool need_x, bool need_a, bool need_b) -> (Tensor, Tensor, Tensor)",
    "gated_mlp": "gated_mlp(Tensor x, Tensor wg, Tensor wu, Tensor wd, Tensor ag, Tensor bg, Tensor au, Tensor bu, "
                 "Tensor ad, Tensor bd, float sg, float su, float sd) -> (Tensor, Tensor, Tensor)",
    "gated_mlp_backward": "gated_mlp_backward(Tensor dy, Tensor x, Tensor gu, Tensor has, Tensor wg, "
                          "Tensor wu, Tensor wd, Tensor ag, Tensor bg, Tensor au, Tensor bu, Tensor ad, Tensor bd, "
                          "float sg, float su, float sd, bool[] need) -> Tensor[]",
    "shared_linear": "shared_linear(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[] As, Tensor[] Bs, "
                     "float[] scales) -> Tensor[]",
    "shared_linear_backward": "shared_linear_backward(Tensor dy, Tensor x, Tensor xa, Tensor[] weights, "
                              "Tensor[] As, Tensor[] Bs, float[] scales, bool[] need) -> Tensor[]",
}


def _none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _some(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


# ---------------------------------------------------------------------------- LoRA linear
def _linear(x, weight, bias, A, B, scale, merged):
    """(y (..., d), xa = x A^T (..., r)): ``ops.linear_forward`` with no dropout."""
    out, xa, _ = ops.linear_forward(x, None, weight, bias, _cast(A, x.dtype), _cast(B, x.dtype), scale, merged, True)
    return out, xa


def _linear_fake(x, weight, bias, A, B, scale, merged):
    lead = x.shape[:-1]
    d, r = weight.shape[0], A.shape[0]
    if merged and ops.xa_rides(True, bias):                  # a column slice of [y | xa]
        return x.new_empty(lead + (d + r,))[..., :d], x.new_empty(lead + (r,))
    return x.new_empty(lead + (d,)), x.new_empty(lead + (r,))


def _linear_backward(dy, x, xa, weight, A, B, scale, merged, need_x, need_a, need_b):
    """(dx, dA, dB), each an empty tensor when not needed; dA, dB in A's and B's dtypes."""
    dx, _, dA, dB = ops.linear_backward(dy, x, xa, weight, _cast(A, x.dtype), _cast(B, x.dtype), scale,
                                        merged, True, (need_x, False, need_a, need_b))
    dA = None if dA is None else _cast(dA, A.dtype)
    dB = None if dB is None else _cast(dB, B.dtype)
    return _none(dx, x), _none(dA, A), _none(dB, B)


def _linear_backward_fake(dy, x, xa, weight, A, B, scale, merged, need_x, need_a, need_b):
    return (torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(A) if need_a else A.new_empty(0),
            torch.empty_like(B) if need_b else B.new_empty(0))


class _LinearOp(torch.autograd.Function):
    """Autograd for ``lorakit::lora_linear``: the forward is the operator itself (called below
    autograd, so a tracer records it as one node), the backward ``lorakit::lora_linear_backward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, merged):
        with torch._C._AutoDispatchBelowAutograd():
            out, xa = op("lora_linear")(x, weight, bias, A, B, scale, merged)
        ctx.scale, ctx.merged = scale, merged
        ctx.save_for_backward(x, xa, weight, A, B)
        ctx.mark_non_differentiable(xa)
        return out, xa

    @staticmethod
    def backward(ctx, dy, _dxa):
        x, xa, weight, A, B = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        dx, dA, dB = op("lora_linear_backward")(dy, x, xa, weight, A, B, ctx.scale, ctx.merged,
                                                                    need_x, need_a, need_b)
        return _some(dx), None, None, _some(dA), _some(dB), None, None


def _plain(*tensors) -> bool:
    """Real tensors (not fake, functional or other subclasses that tracing uses)."""
    return all(t is None or type(t) in _PLAIN for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _linear_autograd(x, weight, bias, A, B, scale, merged):
    """The operator's Autograd kernel. Without gradients to record, on real tensors (the
    compiled graphs at run time) it calls the implementation directly, sparing a second trip
    through the dispatcher; tracers' tensors (fake, functional) go down the dispatcher."""
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return _LinearOp.apply(x, weight, bias, A, B, scale, merged)
    if _plain(x, weight, bias, A, B):
        return _linear(x, weight, bias, A, B, scale, merged)
    with torch._C._AutoDispatchBelowAutograd():
        return op("lora_linear")(x, weight, bias, A, B, scale, merged)


# ---------------------------------------------------------------------------- gated MLP
def _mlp(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd):
    """(y (..., H), gu (N, 2I + rg + ru), has (N, rd)): ``fused.mlp_forward``. y is a column
    slice of a (N, H + rd) buffer (the fake kernel says so: the compiler must know the strides)."""
    hid = wg.shape[1]
    adapters = [_cast(t, x.dtype) for t in (ag, bg, au, bu, ad, bd)]
    y, gu, has = fused.mlp_forward(x.reshape(-1, hid), wg, wu, wd, *adapters, sg, su, sd, True, True)
    return y.view(x.shape), gu, has


def _mlp_fake(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd):
    i, hid = wg.shape
    n = x.numel() // hid
    rd = ad.shape[0]
    y = x.new_empty((n, hid + rd))[:, :hid].view(x.shape)
    return y, x.new_empty((n, 2 * i + ag.shape[0] + au.shape[0])), x.new_empty((n, rd))


def _mlp_backward(dy, x, gu, has, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd, need):
    """[dx, dAgu, dBg, dBu, dAd, dBd], empty where not needed, adapter grads in their dtypes;
    dAgu = [dAg; dAu] stacked (``_MlpOp.backward`` splits it: operator outputs may not alias)."""
    hid = wg.shape[1]
    adapters = (ag, bg, au, bu, ad, bd)
    dx, dA, *rest = fused.mlp_backward(dy.reshape(-1, hid), x.reshape(-1, hid), gu, has, wg, wu, wd,
                                       *(_cast(t, x.dtype) for t in adapters), sg, su, sd, tuple(need))
    grads = [_none(None if g is None else _cast(g, t.dtype), t) for g, t in zip([dA, *rest], (ag, bg, bu, ad, bd))]
    return [_none(None if dx is None else dx.view(x.shape), x), *grads]


def _mlp_backward_fake(dy, x, gu, has, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd, need):
    n_x, n_ag, n_bg, n_au, n_bu, n_ad, n_bd = need
    i, hid = wg.shape
    dA = ag.new_empty((ag.shape[0] + au.shape[0], ag.shape[1])) if n_ag or n_au else ag.new_empty(0)
    rest = [torch.empty_like(t) if n else t.new_empty(0) for t, n in ((bg, n_bg), (bu, n_bu), (ad, n_ad), (bd, n_bd))]
    if not n_x:
        return [x.new_empty(0), dA, *rest]
    dy2 = dy.reshape(-1, hid)
    cols = fused.dx_columns(dy2, i, hid, ag, au, ad, sg, su, n_ag or n_au)      # a column slice of [dX | gs]?
    return [x.new_empty((dy2.shape[0], cols))[:, :hid].view(x.shape), dA, *rest]


class _MlpOp(torch.autograd.Function):
    """Autograd for ``lorakit::gated_mlp`` (as ``_LinearOp``), backward ``lorakit::gated_mlp_backward``."""

    @staticmethod
    def forward(ctx, x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd):
        with torch._C._AutoDispatchBelowAutograd():
            y, gu, has = op("gated_mlp")(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd)
        ctx.scales = (sg, su, sd)
        ctx.save_for_backward(x, gu, has, wg, wu, wd, ag, bg, au, bu, ad, bd)
        ctx.mark_non_differentiable(gu, has)
        return y, gu, has

    @staticmethod
    def backward(ctx, dy, _dgu, _dhas):
        x, gu, has, wg, wu, wd, *adapters = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = op("gated_mlp_backward")(dy, x, gu, has, wg, wu, wd, *adapters, *ctx.scales,
                                                             [need[0], *need[4:10]])
        dx, dA, dBg, dBu, dAd, dBd = (_some(g) for g in grads)
        ag, au = adapters[0], adapters[2]
        dAg, dAu = wprime.split_rows(dA, [ag, au], [need[4], need[6]])
        dAu = None if dAu is None else _cast(dAu, au.dtype)
        return (dx, None, None, None, dAg, dBg, dAu, dBu, dAd, dBd, None, None, None)


def _mlp_autograd(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd):
    """The operator's Autograd kernel (see ``_linear_autograd``)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, ag, bg, au, bu, ad, bd)):
        return _MlpOp.apply(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd)
    if _plain(x, wg, wu, wd, ag, bg, au, bu, ad, bd):
        return _mlp(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd)
    with torch._C._AutoDispatchBelowAutograd():
        return op("gated_mlp")(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd)


# ---------------------------------------------------------------------------- q, k, v as one node
def _shared(x, weights, biases, As, Bs, scales):
    """[y_1, ..., y_m, xa]: ``grouped.shared_forward`` with one GEMM per member (no aliasing outputs)."""
    outs, xa = grouped.shared_forward(x, weights, biases, [_cast(A, x.dtype) for A in As],
                                      [_cast(B, x.dtype) for B in Bs], scales, True, views=False)
    return outs + [xa]


def _shared_fake(x, weights, biases, As, Bs, scales):
    lead = x.shape[:-1]
    R = sum(A.shape[0] for A in As)
    outs = [x.new_empty(lead + (w.shape[0],)) for w in weights]
    if ops.xa_rides(True, biases[0]):                        # the last: a column slice of [y_m | xa]
        dm = weights[-1].shape[0]
        outs[-1] = x.new_empty(lead + (dm + R,))[..., :dm]
    return outs + [x.new_empty(lead + (R,))]


def _shared_backward(dy, x, xa, weights, As, Bs, scales, need):
    """[dx, dA, dB_1..m], empty where not needed: dA = [dA_1; ...; dA_m] stacked in A's dtype
    (``_SharedOp.backward`` splits it: operator outputs may not alias, and a clone per member
    costs a launch each); dB's in their dtypes."""
    m = len(weights)
    dx, dA, dBs = grouped.shared_backward(dy, x, xa, weights, [_cast(A, x.dtype) for A in As],
                                          [_cast(B, x.dtype) for B in Bs], scales, need[0],
                                          need[1:1 + m], need[1 + m:])
    dA = None if dA is None else _cast(dA, As[0].dtype)
    dBs = [None if g is None else _cast(g, t.dtype) for g, t in zip(dBs, Bs)]
    return [_none(dx, x), _none(dA, As[0])] + [_none(g, t) for g, t in zip(dBs, Bs)]


def _shared_backward_fake(dy, x, xa, weights, As, Bs, scales, need):
    m = len(weights)
    k = x.shape[-1]
    R = sum(A.shape[0] for A in As)
    if not need[0]:
        dx = x.new_empty(0)
    elif any(need[1:1 + m]) and all(s == scales[0] for s in scales):     # a column slice of [dY W' | dY B]
        dx = x.new_empty((x.numel() // k, k + R))[:, :k].view(x.shape)
    else:
        dx = torch.empty_like(x)
    dA = As[0].new_empty((R, k)) if any(need[1:1 + m]) else As[0].new_empty(0)
    return [dx, dA] + [torch.empty_like(B) if n else B.new_empty(0) for B, n in zip(Bs, need[1 + m:])]


class _SharedOp(torch.autograd.Function):
    """Autograd for ``lorakit::shared_linear`` (as ``_LinearOp``), backward ``lorakit::shared_linear_backward``.
    Inputs: x, m, then the m weights, biases, A's and B's, then the scales (a list)."""

    @staticmethod
    def forward(ctx, x, m, *args):
        ws, bs, As, Bs = (list(args[j * m:(j + 1) * m]) for j in range(4))
        scales = args[4 * m]
        with torch._C._AutoDispatchBelowAutograd():
            *outs, xa = op("shared_linear")(x, ws, bs, As, Bs, scales)
        ctx.m, ctx.scales = m, scales
        ctx.save_for_backward(x, xa, *ws, *As, *Bs)
        ctx.mark_non_differentiable(xa)
        return (*outs, xa)

    @staticmethod
    def backward(ctx, *grads):
        m = ctx.m
        x, xa, *rest = ctx.saved_tensors
        need = ctx.needs_input_grad
        flags = [need[0], *need[2 + 2 * m:2 + 4 * m]]
        # dY = [dy_1 | ... | dy_m] outside the operator, where the compiler fuses the concatenation
        # with the kernels that compute the members' gradients (q's and k's rotary backward): one
        # kernel writes dY (train_step_1b_h200_s15f.profile.txt: 58 us against 54 us for those
        # kernels and the operator's own copy, on a machine whose GEMMs ran 3% slower: even)
        dy = torch.cat(grads[:m], dim=-1)
        out = op("shared_linear_backward")(dy, x, xa, rest[:m], rest[m:2 * m], rest[2 * m:], ctx.scales, flags)
        dx, dA, *dBs = (_some(g) for g in out)
        dAs = [None if g is None else _cast(g, A.dtype)
               for g, A in zip(wprime.split_rows(dA, rest[m:2 * m], flags[1:1 + m]), rest[m:2 * m])]
        return (dx, None) + (None,) * (2 * m) + tuple(dAs) + tuple(dBs) + (None,)


def _shared_autograd(x, weights, biases, As, Bs, scales):
    """The operator's Autograd kernel (see ``_linear_autograd``)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in (*As, *Bs))):
        return list(_SharedOp.apply(x, len(weights), *weights, *biases, *As, *Bs, list(scales)))
    if _plain(x, *weights, *biases, *As, *Bs):
        return _shared(x, weights, biases, As, Bs, scales)
    with torch._C._AutoDispatchBelowAutograd():
        return op("shared_linear")(x, weights, biases, As, Bs, scales)


def _register() -> Optional[object]:
    lib = torch.library.Library("lorakit", "DEF")          # kept alive by the module (unregisters when freed)
    kernels = {"lora_linear": (_linear, _linear_fake), "lora_linear_backward": (_linear_backward, _linear_backward_fake),
               "gated_mlp": (_mlp, _mlp_fake), "gated_mlp_backward": (_mlp_backward, _mlp_backward_fake),
               "shared_linear": (_shared, _shared_fake),
               "shared_linear_backward": (_shared_backward, _shared_backward_fake)}
    for name, (impl, fake) in kernels.items():
        qual = f"{name}.{OVERLOAD}"
        lib.define(qual + _SCHEMAS[name][len(name):])
        lib.impl(qual, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"lorakit::{qual}", fake, lib=lib)
    lib.impl(f"lora_linear.{OVERLOAD}", _linear_autograd, "Autograd")
    lib.impl(f"gated_mlp.{OVERLOAD}", _mlp_autograd, "Autograd")
    lib.impl(f"shared_linear.{OVERLOAD}", _shared_autograd, "Autograd")
    return lib


_LIB = _register() if AVAILABLE else None


_OPS = {name: getattr(getattr(torch.ops.lorakit, name), OVERLOAD) for name in _SCHEMAS} if AVAILABLE else {}


def op(name: str) -> "torch._ops.OpOverload":
    """The operator ``lorakit::name`` (its one overload, ``OVERLOAD``)."""
    return _OPS[name]


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                merged: bool) -> Tensor:
    """y = x W0^T + b + s (x A^T) B^T as the ``lorakit::lora_linear`` operator (training, no dropout)."""
    return op("lora_linear")(x, weight, bias, A, B, scale, merged)[0]


def gated_mlp(x: Tensor, wg: Tensor, wu: Tensor, wd: Tensor, ag: Tensor, bg: Tensor, au: Tensor, bu: Tensor,
              ad: Tensor, bd: Tensor, sg: float, su: float, sd: float) -> Tensor:
    """down(silu(gate(x)) * up(x)) with LoRA on all three, as the ``lorakit::gated_mlp`` operator."""
    return op("gated_mlp")(x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd)[0]


def shared_linear(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], As: list[Tensor],
                  Bs: list[Tensor], scales: list[float]) -> tuple[Tensor, ...]:
    """Every member's y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T as the ``lorakit::shared_linear`` operator."""
    return tuple(op("shared_linear")(x, list(weights), list(biases), list(As), list(Bs),
                                                 [float(s) for s in scales])[:-1])


# ---------------------------------------------------------------------------- regional compilation
def repeated_blocks(model: nn.Module) -> Optional[nn.ModuleList]:
    """The nn.ModuleList of ``model`` whose members all share one class and that holds the most
    parameters (a transformer's decoder layers: they contain any other such list, the experts
    of a mixture-of-experts layer for one), or None."""
    best, best_size = None, -1
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if size > best_size:
                best, best_size = m, size
    return best


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Compile ``model`` in place, block by block (regional compilation): each module of
    ``repeated_blocks`` gets ``nn.Module.compile``, and since the blocks share one class they
    share one compiled graph, so compiling costs one block, not the model. Parameter names and
    the state dict do not change. Without repeated blocks the whole model is compiled in place.
    Returns how many modules were compiled; ``uncompile`` undoes it."""
    blocks = repeated_blocks(model)
    targets = list(blocks) if blocks is not None else [model]
    for m in targets:
        m.compile(**compile_kwargs)
    return len(targets)


def uncompile(model: nn.Module) -> int:
    """Undo ``nn.Module.compile`` on every module of ``model`` (they run eagerly again);
    returns how many were compiled."""
    n = 0
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
            n += 1
    return n
