"""Fused LoRA blocks: a gated (SwiGLU) MLP whose three projections carry LoRA, as one
autograd node.

The MLP of Llama-family models (Llama, Mistral, Qwen2/3, OLMo, SmolLM, ...) is

    y = down( silu(gate(x)) * up(x) )          x (N, H); gate, up: H -> I; down: I -> H

With LoRA on all three, eager PyTorch runs it as three LoRA linears plus two elementwise
ops, and autograd keeps four (N, I) tensors for backward (silu's input and output, up's
output, down's input). A frozen model (the "bound") keeps three. The fused node keeps two
(g and u, side by side in one (N, 2I) buffer) plus x, and recomputes h in backward:

    forward                                            backward (dY: (N, H))
    W'gu = [Wg + sg Bg Ag ; Wu + su Bu Au]  (2I, H)    [dh | dY Bd] = dY [W'd | Bd]      (N, I + rd)
    [g | u | x Ag^T | x Au^T] = x [W'gu; Ag; Au]^T     [dg | du], h = swiglu_bwd(dh, g, u)  one pass
    h    = silu(g) * u                      (N, I)     [dx | gs] = [dg | du] [W'gu | blockdiag(Bg, Bu)]
    W'd  = Wd + sd Bd Ad                    (H, I)     dAd  = (sd dY Bd)^T h,  dBd = sd dY^T (h Ad^T)
    [y | h Ad^T] = h [W'd; Ad]^T            (N, H+rd)  [dAg; dAu] = s gs^T x     (gs: (N, rg + ru), sg = su)
                                                       dBg = dg^T x sg Ag^T,  dBu = du^T x su Au^T

(The A's, Bd and the B's ride in the GEMMs as extra rows or columns of the merged weights, which
the W' kernel writes in the same launch: x, h, dY and [dg | du] are each read once, not again
by a rank-r GEMM.) That is each GEMM site's merged form. Each of the four sites (gate|up forward, down
forward, down backward, gate|up backward) can instead run beside W0: the rank-r product is
written into the output and the GEMM with W0 accumulates onto it, e.g. dx = s gs [Ag; Au],
then += dg Wg, += du Wu. ``mlp_forms`` picks per site from the shapes (bytes moved).

Every form is exact (W' is the merged weight of the ``merged`` form in lorakit.ops, rebuilt
in backward rather than kept). Against the unfused path this saves per layer: two (N, I)
activations of memory (below the frozen bound's), the silu and mul passes (one Triton
kernel each way on the GPU), one x read per direction (gate and up share it), and the
separate gradient sum for x (one GEMM with K = 2I).

``attach(model)`` switches it on (by giving the module a subclass of its own class, same
name, whose forward routes) for every MLP whose class's ``forward`` is exactly
``self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))`` (checked on the
source, so unknown classes are never guessed at) with ``act_fn`` a SiLU. ``inject`` calls
it; ``detach(model)`` turns it off. Per call the fused node runs only when it applies:
gradients enabled, one active adapter present in all three projections with dropout 0,
no per-row batch, no merge, no hooks, no autocast to a dtype other than x's, and enough
tokens that rebuilding merged weights pays (``fused_is_cheaper``). Otherwise the class's
own forward runs, unchanged. Under torch.compile the node runs as the opaque operator
``lorakit::gated_mlp`` (lorakit.compiled): the same code, so the compiler keeps g|u and x
and never h.
"""

from __future__ import annotations

import ast
from typing import Optional

import torch
from torch import Tensor, nn

from . import kernels, ops, wprime
from .activation import swiglu_backward_reduce, swiglu_forward, swiglu_forward_terms
from .ops import _cast
from .layers import LoraLinear
from .nodes import function_tree, hooked, model_modules, node_adapter, node_member

_FORWARD_OK: dict[type, bool] = {}
_FUSED_CLASSES: dict[type, type] = {}


# ---------------------------------------------------------------------------- the node
def _stacked_weight(wg: Tensor, wu: Tensor, ag: Tensor, bg: Tensor, au: Tensor, bu: Tensor,
                    sg: float, su: float, append_a: bool = False) -> Tensor:
    """[Wg + sg Bg Ag ; Wu + su Bu Au]: (2I, H), then [Ag; Au] as rows when ``append_a``
    (``wprime.stacked_merged_weight``: one launch on the GPU)."""
    return wprime.stacked_merged_weight([wg, wu], [bg, bu], [ag, au], [sg, su], append_a=append_a)


TERMS_PASS = 0.6     # the terms kernel's time over the plain SwiGLU kernel's, in passes over g|u (swiglu_terms_h200.md)


def mlp_forms(n: int, i: int, h: int, c: float = ops.EPILOGUE_READ, terms: bool = False) -> tuple[bool, bool, bool, bool]:
    """Which of the node's four GEMM sites take the merged form, for N tokens, I, H:
    (gate|up forward, down forward, down backward, gate|up backward); False: added beside W0.

    Each site's big GEMM runs either with W' = W0 + s B A (built by a pass that reads W0 and
    writes W': 2 d k elements moved beyond the GEMM's own) and the factors appended to it
    (``wprime.stacked_merged_weight``: the rank-r product then costs nothing), or with W0 itself,
    accumulating onto s (rank-r product) B^T written first into its output: one write and, in
    the GEMM's epilogue, one read of the (N, d) output (``c`` of a pass), plus the rank-r GEMM's
    read of its input, which no longer rides in the big GEMM (``ops.EPILOGUE_READ``: c = 0.5). Per
    site, in elements:

        gate|up forward    merged 4 I H    beside N (2 I (1 + c) + H)
        down forward       merged 2 H I    beside N (H (1 + c) + I)
        down backward      merged 2 H I    beside N (I (1 + c) + H)
        gate|up backward   merged 4 I H    beside N H (2 + 2 c) + 2 N I

    (gate|up backward beside W0: dX sums two GEMMs, K = I each; and the dA's need gs = [dg Bg | du Bu],
    which in the merged form rides in the dX GEMM, [dX | gs] = [dg | du] [W'gu | blockdiag(Bg, Bu)],
    but beside W0 is a GEMM of its own that reads [dg | du] (N, 2I) once more.)

    At the 1B shape and 8192 tokens all four sites take the merged form; at the 8B shape (4096
    tokens) all four go beside W0, with c = 0.5.

    With ``terms`` (``kernel_terms``: the SwiGLU kernels add the LoRA terms of gate|up forward and
    down backward, so nothing is written before those GEMMs or read in their epilogues) those two
    sites cost, beside W0, the rank-r GEMM's read of x or dY plus the terms kernel's extra time,
    ``TERMS_PASS`` of a pass over g|u:

        gate|up forward    beside N (H + 2 I TERMS_PASS)        down backward    beside N H

    That keeps gate|up forward merged at the 1B shape and takes down backward beside W0 at both.
    """
    up = n * (h + 2 * i * TERMS_PASS) if terms else n * (2 * i * (1 + c) + h)
    down = n * h if terms else n * (i * (1 + c) + h)
    return (4 * i * h <= up, 2 * h * i <= n * (h * (1 + c) + i), 2 * h * i <= down,
            4 * i * h <= n * h * (2 + 2 * c) + 2 * n * i)


# False: the GPU runs the beside-W0 sites as GEMMs writing the terms (benchmarks compare). Set it
# between training steps, never between a forward and its backward (which must agree on it).
KERNEL_TERMS = True


def kernel_terms(t: Tensor, ag: Tensor, au: Tensor, ad: Tensor) -> bool:
    """Whether the SwiGLU kernels add the LoRA terms of the sites beside W0 themselves (on the GPU,
    ranks up to ``lorakit.kernels.swiglu.MAX_TERMS_RANK``): gate|up forward and down backward
    then write g0 = x Wg^T, u0 = x Wu^T and dh0 = dY Wd alone, and ``mlp_forms`` prices them so."""
    if not (KERNEL_TERMS and t.is_cuda):
        return False
    k = kernels.load("swiglu")
    return k is not None and max(ag.shape[0], au.shape[0], ad.shape[0]) <= k.MAX_TERMS_RANK


def _plan(t: Tensor, i: int, h: int, ag: Tensor, au: Tensor, ad: Tensor, forms: Optional[tuple[bool, ...]]
          ) -> tuple[tuple[bool, ...], bool, bool]:
    """(forms, gu_terms, dh_terms) for N = t's rows: the sites' forms (``forms`` when given, else
    ``mlp_forms``), and whether the kernels add gate|up's terms and dh's (their sites beside W0).
    Forward and backward both plan here, so they agree on what gu holds."""
    terms = kernel_terms(t, ag, au, ad)
    f = forms if forms is not None else mlp_forms(t.shape[0], i, h, terms=terms)
    return f, terms and not f[0], terms and not f[2]


def dx_columns(dy2: Tensor, i: int, h: int, ag: Tensor, au: Tensor, ad: Tensor, sg: float, su: float,
               need_a: bool) -> int:
    """The row stride of ``mlp_backward``'s dx for dY (N, H) (the compiled operator's fake kernel
    must state it): H + rg + ru where dX and gs come from one GEMM (gate|up backward merged,
    equal scales, the dA's needed), else H."""
    f, _, _ = _plan(dy2, i, h, ag, au, ad, None)
    return h + ag.shape[0] + au.shape[0] if _gs_rides(f, need_a, sg, su) else h


def _gs_rides(f: tuple[bool, ...], need_a: bool, sg: float, su: float) -> bool:
    """Whether gate|up backward computes [dX | gs] in one GEMM (merged form, dA's needed, sg = su)."""
    return f[3] and need_a and sg == su


def mlp_forward(x2: Tensor, wg, wu, wd, agc, bgc, auc, buc, adc, bdc, sg: float, su: float, sd: float,
                need_xas: bool, need_has: bool, forms: Optional[tuple[bool, ...]] = None
                ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(y (N, H), gu, has) for x2 (N, H); adapter weights already in x's dtype.

    gu = [g | u | xas] (N, 2I + rg + ru): xas = x [Ag; Au]^T, for the dB's, when ``need_xas``
    (else (N, 2I)); has = h Ad^T (N, rd) when ``need_has``. In the merged forms both ride in the
    GEMMs that need their input anyway: the A's are appended as rows to the merged weights (x
    and h are read once each), and their scales ride on the dB GEMMs' alpha. With ``need_has``
    y is a column slice of an (N, H + rd) buffer (row stride H + rd) in either form ([y | h Ad^T]
    merged); has is a copy, so that keeping it does not keep that buffer. ``forms``: as
    ``mlp_forms`` returns (default: its choice for these shapes).
    """
    i, hid = wg.shape
    n = x2.shape[0]
    f, terms, _ = _plan(x2, i, hid, agc, auc, adc, forms)                   # terms: the kernel adds gate|up's
    if f[0]:
        gu = torch.mm(x2, _stacked_weight(wg, wu, agc, bgc, auc, buc, sg, su, append_a=need_xas).t())
    else:
        rg = agc.shape[0]
        keep_xas = need_xas or terms
        gu = x2.new_empty((n, 2 * i + (rg + auc.shape[0] if keep_xas else 0)))
        xas = torch.mm(x2, torch.cat([agc, auc]).t(), out=gu[:, 2 * i:] if keep_xas else None)
        if terms:                                                           # g0 | u0: the kernel adds the terms
            torch.mm(x2, wg.t(), out=gu[:, :i])
            torch.mm(x2, wu.t(), out=gu[:, i:2 * i])
        else:
            ops.beside_into(gu[:, :i], xas[:, :rg], bgc, sg, x2, wg.t())
            ops.beside_into(gu[:, i:2 * i], xas[:, rg:], buc, su, x2, wu.t())
    h = swiglu_forward_terms(gu, bgc, buc, sg, su) if terms else swiglu_forward(gu[:, :2 * i])   # (N, I)
    if f[1]:
        if not need_has:
            return torch.mm(h, wprime.merged_weight(wd, bdc, adc, sd).t()), gu, None   # (N, H)
        yh = torch.mm(h, wprime.stacked_merged_weight([wd], [bdc], [adc], [sd], append_a=True).t())  # [y | h Ad^T]
        return yh[:, :hid], gu, yh[:, hid:].clone()
    has = torch.mm(h, adc.t())                                              # h Ad^T (N, rd)
    y = x2.new_empty((n, hid + adc.shape[0]))[:, :hid] if need_has else x2.new_empty((n, hid))
    return ops.beside_into(y, has, bdc, sd, h, wd.t()), gu, has if need_has else None


def mlp_backward(dy2: Tensor, x2: Optional[Tensor], gu: Tensor, has: Optional[Tensor],
                 wg, wu, wd, agc, bgc, auc, buc, adc, bdc, sg: float, su: float, sd: float,
                 need: tuple[bool, ...], forms: Optional[tuple[bool, ...]] = None) -> tuple[Optional[Tensor], ...]:
    """(dx, dAgu, dBg, dBu, dAd, dBd) of ``mlp_forward`` for dY (N, H), in x's dtype, where
    dAgu = [dAg; dAu] (rg + ru, H) stacked; ``need`` flags dx, dAg, dBg, dAu, dBu, dAd, dBd.
    gu and has as ``mlp_forward`` returned them; ``forms`` as there.

    The scales ride on GEMM ``alpha``: ``addmm(c, a, b, beta=0, alpha=s)`` computes s a b and
    ignores c (any tensor that broadcasts to the result: here the adapter weight of the result's
    shape, or a row of W0)."""
    need_x, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = need
    i, hid = wg.shape
    n, rg = dy2.shape[0], agc.shape[0]
    f, gu_terms, dh_terms = _plan(dy2, i, hid, agc, auc, adc, forms)       # which terms the kernel adds
    guk, gu = gu, gu[:, :2 * i]                                             # guk: [g | u | x [Ag; Au]^T], if kept
    if f[2] and need_ad:                                                    # [dY W'd | dY Bd]: one read of dY
        full = torch.mm(dy2, wprime.stacked_merged_weight([wd], [bdc], [adc], [sd], append_b=True))   # (N, I + rd)
        dh, gd = full[:, :i], full[:, i:]
    elif f[2]:
        dh, gd = torch.mm(dy2, wprime.merged_weight(wd, bdc, adc, sd)), None  # dY W'd  (N, I)
    elif dh_terms:                                                          # dh0 = dY Wd: the kernel adds sd gd Ad
        gd, dh = torch.mm(dy2, bdc), torch.mm(dy2, wd)
    else:                                                                   # sd (dY Bd) Ad + dY Wd
        gd = torch.mm(dy2, bdc)
        dh = ops.beside_into(dy2.new_empty((n, i)), gd, adc.t(), sd, dy2, wd)
    dBd = torch.addmm(bdc, dy2.t(), has, beta=0, alpha=sd) if need_bd else None   # sd dY^T (h Ad^T): (H, rd)
    # [dg | du] (N, 2I), sd (dY Bd)^T h (rd, I), sg dg^T (x Ag^T) (I, rg), su du^T (x Au^T) (I, ru):
    # one kernel on the GPU, which reads g, u and dh once and never writes h (with the terms, it
    # also rebuilds g, u and dh from g0, u0, dh0 as the forward kernel built g and u)
    dgu, dAd, dBg, dBu = swiglu_backward_reduce(dh, guk, gd, sd, rg, sg, su, need_bg or need_bu,
                                                *((bgc, buc) if gu_terms else (None, None)),
                                                adc if dh_terms else None, want_ad=need_ad)
    dBg, dBu = dBg if need_bg else None, dBu if need_bu else None
    del dh, gd
    dx = dA = gs = None
    same = sg == su
    if need_x and _gs_rides(f, need_ag or need_au, sg, su):                # [dX | gs] = dgu [W'gu | blockdiag(Bg, Bu)]
        full = torch.mm(dgu, wprime.stacked_merged_weight([wg, wu], [bgc, buc], [agc, auc], [sg, su], append_b=True))
        dx, gs = full[:, :hid], full[:, hid:]                               # (N, H) slice, (N, rg + ru)
    elif need_x and f[3]:
        dx = torch.mm(dgu, _stacked_weight(wg, wu, agc, bgc, auc, buc, sg, su))    # (N, H)
    if gs is None and (need_ag or need_au or (need_x and not f[3])):
        bd = torch.block_diag(bgc, buc) if same else torch.block_diag(bgc * sg, buc * su)
        gs = torch.mm(dgu, bd)                                              # [dg Bg | du Bu] (N, rg + ru) (times s)
    if need_ag or need_au:
        dA = torch.addmm(wg[0], gs.t(), x2, beta=0, alpha=sg if same else 1.0)   # [dAg; dAu] (rg + ru, H)
    if need_x and not f[3]:                                                 # s gs [Ag; Au] + dg Wg + du Wu
        dx = ops.beside_into(dy2.new_empty((n, hid)), gs, torch.cat([agc, auc]).t(), sg if same else 1.0,
                             dgu[:, :i], wg).addmm_(dgu[:, i:], wu)
    return dx, dA, dBg, dBu, dAd, dBd


class _GatedMlpFn(torch.autograd.Function):
    """y = (silu(x W'g^T) * (x W'u^T)) W'd^T with frozen W0s; see the module docstring.

    Inputs: x (..., H); wg, wu (I, H); wd (H, I); ag (rg, H), bg (I, rg); au (ru, H),
    bu (I, ru); ad (rd, I), bd (H, rd); scales sg, su, sd. Adapter weights may be float32
    on a lower-precision base: they are cast to x's dtype for the GEMMs and their
    gradients returned in their own dtype.
    """

    @staticmethod
    def forward(ctx, x, wg, wu, wd, ag, bg, au, bu, ad, bd, sg, su, sd):
        hid = wg.shape[1]
        adapters = tuple(_cast(t, x.dtype) for t in (ag, bg, au, bu, ad, bd))
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, hid)                                             # (N, H)
        y, gu, has = mlp_forward(x2, wg, wu, wd, *adapters, sg, su, sd, need[5] or need[7], need[9])
        ctx.scales = (sg, su, sd)
        ctx.dtypes = tuple(t.dtype for t in (ag, bg, au, bu, ad, bd))
        ctx.save_for_backward(x2 if need[4] or need[6] else None, gu, has, wg, wu, wd, *adapters)
        ctx.x_shape = x.shape
        # y (a column slice of [y | h Ad^T]) viewed to x's shape, then detached: the output is not
        # an autograd view of something made here, so callers may modify it in place
        return y.view(x.shape[:-1] + (hid,)).detach()

    @staticmethod
    def backward(ctx, dy):
        x2, gu, has, wg, wu, wd, *adapters = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dA, dBg, dBu, dAd, dBd = mlp_backward(dy.reshape(-1, wg.shape[1]), x2, gu, has, wg, wu, wd, *adapters,
                                                  *ctx.scales, (need[0], *need[4:10]))
        dAg, dAu = wprime.split_rows(dA, [adapters[0], adapters[2]], [need[4], need[6]])
        grads = [dAg, dBg, dAu, dBu, dAd, dBd]
        grads = [None if g is None else _cast(g, t) for g, t in zip(grads, ctx.dtypes)]
        return (None if dx is None else dx.view(ctx.x_shape), None, None, None, *grads, None, None, None)


def lora_gated_mlp(x: Tensor, gate: LoraLinear, up: LoraLinear, down: LoraLinear, name: str) -> Tensor:
    """The fused node for adapter ``name`` of three LoRA linears (no checks: see ``fusable``)."""
    w, a = [], []
    for layer in (gate, up, down):
        w.append(layer._modules["base"]._parameters["weight"])
        ad = layer._modules["adapters"]._modules[name]
        a += [ad._parameters["lora_A"], ad._parameters["lora_B"], ad.scale]
    fn = _GatedMlpFn.apply
    if torch.compiler.is_compiling():
        from . import compiled             # the same code as one opaque operator (see lorakit.compiled)
        fn = compiled.gated_mlp
    return fn(x, w[0], w[1], w[2], a[0], a[1], a[3], a[4], a[6], a[7], a[2], a[5], a[8])


# ---------------------------------------------------------------------------- when it applies
def fused_is_cheaper(n: int, i: int, h: int) -> bool:
    """Whether the fused node moves fewer bytes than three LoRA linears in their best form.

    Per layer and training step, in elements: the fused node builds three merged weights in
    forward and again in backward (each one read of W0 and one write of W': 12 I H). The
    unfused layers at sizes where that matters take the unmerged form, which adds into the
    outputs (4 N I + 2 N H forward) and into dX (4 N H + 2 N I backward), and run the silu and
    mul passes the fused kernels save (about 5 N I). So fuse when N (11 I + 6 H) > 12 I H:
    about 230 tokens at the 1B shape, 3,900 at the 8B shape. (The memory saving, two (N, I)
    activations, comes on top.)

    The count takes every site merged, the node's form before ``mlp_forms``. By bytes, the
    per-site forms make the node no dearer than the unfused layers at any N. The rule stays
    because fusing at any size measured no faster on the CPU, where short inputs run (SmolLM
    widths at 512 tokens: 1.104x the bound fused, 1.086x unfused, ``train_step_smol_cpu_s10b.md``).
    """
    return n * (11 * i + 6 * h) > 12 * i * h


def is_silu(act: nn.Module) -> bool:
    """torch's nn.SiLU or transformers' SiLUActivation (``nn.functional.silu``)."""
    cls = type(act)
    return isinstance(act, nn.SiLU) or (cls.__name__ == "SiLUActivation"
                                         and cls.__module__ == "transformers.activations")


def fusable(mlp: nn.Module, x: Tensor) -> Optional[str]:
    """The adapter name the fused node would run for this call, or None (the class forward runs).

    Runs once per MLP per forward: modules and parameters are read from their dicts
    (``_modules``, ``_parameters``) rather than through nn.Module.__getattr__ (38 lookups a
    call, most of its host time)."""
    if not torch.is_grad_enabled():
        return None
    mods = mlp._modules
    g, u, d, act = mods.get("gate_proj"), mods.get("up_proj"), mods.get("down_proj"), mods.get("act_fn")
    if type(g) is not LoraLinear or type(u) is not LoraLinear or type(d) is not LoraLinear or not is_silu(act):
        return None
    st = g.state
    name = node_adapter(st, x)
    if name is None or hooked(mlp) or hooked(act):
        return None
    weights, trainable = [], x.requires_grad
    for m in (g, u, d):
        member = node_member(m, st, name, x)
        if member is None or member[1] is not None:
            return None
        w, _, a = member
        weights.append(w)
        trainable = trainable or a.lora_A.requires_grad or a.lora_B.requires_grad
    i, hid = weights[0].shape
    if x.shape[-1] != hid or weights[2].shape != (hid, i) or weights[1].shape != (i, hid) or not trainable:
        return None
    return name if fused_is_cheaper(x.numel() // hid, i, hid) else None


def _gated_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The forward of a routed MLP: the fused node when it applies, else the class's own."""
    name = fusable(self, x)
    if name is None:
        return type(self)._lorakit_base.forward(self, x)
    mods = self._modules
    return lora_gated_mlp(x, mods["gate_proj"], mods["up_proj"], mods["down_proj"], name)


# ---------------------------------------------------------------------------- attach / detach
def is_gated_mlp_forward(fn) -> bool:
    """Whether ``fn``'s source is exactly ``return self.down_proj(self.act_fn(self.gate_proj(x))
    * self.up_proj(x))`` (a docstring, or one named intermediate before the return, allowed)."""
    tree = function_tree(fn)
    args = tree.args if tree is not None else None
    if args is None or len(args.args) != 2 or args.vararg or args.kwarg or args.kwonlyargs:
        return False
    x = args.args[1].arg
    want = ast.dump(ast.parse(f"self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))",
                              mode="eval").body)
    body = [s for s in tree.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        return ast.dump(body[0].value) == want
    if (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
            and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
            and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
        return ast.dump(body[0].value) == want
    return False


def _gated_class(cls: type) -> bool:
    ok = _FORWARD_OK.get(cls)
    if ok is None:
        ok = _FORWARD_OK[cls] = is_gated_mlp_forward(cls.forward)
    return ok


def _rebuild(base: type) -> nn.Module:
    return object.__new__(_fused_class(base))


def _reduce_ex(self: nn.Module, protocol):
    """Pickle and deepcopy a routed MLP through its original class (the routed class is made at run time)."""
    return _rebuild, (type(self)._lorakit_base,), self.__dict__


def _fused_class(cls: type) -> type:
    """A subclass of ``cls`` (same name) whose forward is ``_gated_forward``; one per class.

    Routing swaps an instance's class rather than patching its ``forward``: every routed MLP
    of a model shares one class, so torch.compile traces them as one graph."""
    f = _FUSED_CLASSES.get(cls)
    if f is None:
        f = _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": _gated_forward, "__reduce_ex__": _reduce_ex, "_lorakit_base": cls,
            "__module__": __name__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return f


def _is_ours(m: nn.Module) -> bool:
    return "_lorakit_base" in type(m).__dict__


def attach(model: nn.Module) -> int:
    """Route every gated MLP of ``model`` whose three projections are LoRA layers through the
    fused node (when it applies, per call). Idempotent; returns how many MLPs are routed."""
    n = 0
    for m in model_modules(model):
        if _is_ours(m):
            n += 1
        elif ("forward" not in m.__dict__ and all(type(getattr(m, p, None)) is LoraLinear
                                                  for p in ("gate_proj", "up_proj", "down_proj"))
              and _gated_class(type(m))):
            m.__class__ = _fused_class(type(m))
            n += 1
    return n


def detach(model: nn.Module) -> int:
    """Undo ``attach``: every MLP runs its class's forward again. Returns how many were routed."""
    n = 0
    for m in model_modules(model):
        if _is_ours(m):
            m.__class__ = type(m)._lorakit_base
            n += 1
    return n


def attached(model: nn.Module) -> int:
    """How many MLPs of ``model`` are routed through the fused node."""
    return sum(_is_ours(m) for m in model_modules(model))
