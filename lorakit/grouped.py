"""LoRA linears that read the same input, run as one autograd node (attention's q, k and v).

An attention block calls ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` on the same x. Run
separately (3 nodes), a training step pays per projection: its own W' build, its own GEMM, its
own x A^T, and in backward its own dX that autograd then sums with two more full-size
additions. On a GPU the host's time per operation is what the step waits on at these sizes
(``bench/host_cost.py``: 13-25 us per PyTorch operation on the H200's host, and the attention
projections' GEMMs run in about as long). As one node, for m members with outputs d_1..d_m:

    W'  = [W1 + s1 B1 A1; ...; Wm + sm Bm Am]        (D, k), D = sum d_i: one buffer, rebuilt in backward
    y   = x W'^T + [b1 ... bm]                       (N, D): one GEMM; member i gets columns o_i .. o_i + d_i
    xa  = x [A1; ...; Am]^T                          (N, R), R = sum r_i, for the dB's

    dY  = [dy1 ... dym]                              (N, D)
    dX  = dY W'                                      one GEMM (no sums of separate dX's)
    gs  = dY blockdiag(s1 B1, ..., sm Bm)            (N, R)
    dA  = gs^T x                                     (R, k): one read of x for every A
    dBi = si dyi^T xa_i                              (d_i, r_i)

Forward operations: 5 instead of 9 (plus one autograd node instead of three); backward about
9 instead of 17. Each member's output is a separate tensor (a detached slice of y, so a caller
may modify it in place) and its gradient is exact: the same function as the separate layers,
summed in another order (float32: equal to 1e-6; tests compare).

**How the members meet.** The model calls the three modules itself, one after the other. The
first member (the *leader*, e.g. q_proj) computes all outputs and keeps the others' until
they are called with the same tensor x (same object, same version); then each takes its own.
Whether a parent's members read one input is decided once per parent class, from the source
of its ``forward`` (``calls_on_one_input``, with ``ast``): the members must be called as
``self.q_proj(X)``, ``self.k_proj(X)``, ``self.v_proj(X)`` in that order, in statements of one
block (never split across branches, never in a loop), on one variable X that ``forward``
never assigns. Cross-attention (k and v read another variable), other orders and anything the
check cannot read run as separate nodes, and so does any call whose tensor is not the leader's
after all. The decision never changes from one call to the next, so a forward and its
recomputation under activation checkpointing save the same tensors. Under torch.compile the
node is the opaque operator ``lorakit::shared_linear`` (lorakit.compiled). Conditions per call
(else every member runs its own node): gradients on, one active adapter present in every
member with no dropout while training, no merge or per-row batch, frozen ``nn.Linear`` bases
of x's dtype, biases in all or none, no hooks, no autocast to another dtype, and the merged
form no dearer than the unmerged one for every member (``ops.merged_is_cheaper`` with ties and
the epilogue read counted as a whole pass, c = 1: training-sized inputs).

``attach(model)`` links the members (``inject`` calls it), ``detach`` unlinks them.
"""

from __future__ import annotations

import ast
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, wprime
from .nodes import function_tree, model_modules, node_adapter, node_member
from .layers import LoraLinear

# Member names of a group, the leader first: the parent's forward must call them in this order
# on one input (``calls_on_one_input``). The members are those that are LoRA linears (at least
# two); a plain module among them is called by the model in between as usual.
NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


class Group:
    """Sibling LoRA linears of one parent module that read the same input, and what is pending.

    Not a module (kept in each member's ``__dict__`` as ``_group``): pickles and deep-copies with
    the model, without the pending outputs. It refers to its members weakly: the members refer
    to it, and a cycle would keep a deleted model's GPU memory until Python's cycle collector
    ran."""

    __slots__ = ("refs", "pending", "px", "pv", "__weakref__")

    def __init__(self, members: tuple[LoraLinear, ...]) -> None:
        self.refs = tuple(weakref.ref(m) for m in members)
        self.pending: Optional[dict] = None  # member index -> its output, computed by the leader
        self.px: Optional[Tensor] = None     # the input those outputs are for
        self.pv = 0                          # its version then

    @property
    def members(self) -> tuple[LoraLinear, ...]:
        return tuple(r() for r in self.refs)

    def __getstate__(self):
        return dict(members=self.members)

    def __setstate__(self, state) -> None:
        self.__init__(state["members"])

    def _drop(self) -> None:
        self.pending = self.px = None

    def call(self, m: LoraLinear, x: Tensor) -> Optional[Tensor]:
        """Member ``m``'s output for x if the group computes it, else None (m runs its own node).
        (While torch.compile traces, tensor versions are not checked: the graph is functional.)"""
        compiling = torch.compiler.is_compiling()
        members = self.members
        if m is members[0]:
            self._drop()
            outs = self._run(members, x)
            if outs is None:
                return None
            self.pending = {i: outs[i] for i in range(1, len(members))}
            self.px, self.pv = x, 0 if compiling else x._version
            return outs[0]
        p = self.pending
        i = next((j for j, o in enumerate(members) if o is m), None)
        if p is None or i is None:            # (None: a shallow copy of a member, e.g. an nn.DataParallel
            return None                       # replica, which shares the original's __dict__)
        out = p.pop(i, None)
        if out is not None and self.px is x and (compiling or x._version == self.pv):
            if not p:
                self._drop()
            return out
        self._drop()                          # another input than the leader's: each computes its own
        return None

    def _run(self, members: tuple, x: Tensor) -> Optional[tuple[Tensor, ...]]:
        """All members' outputs as one node, or None when the conditions (module docstring) fail."""
        if any(m is None for m in members):       # a member was dropped from the model and freed
            return None
        st = members[0].state
        name = node_adapter(st, x)
        if name is None:
            return None
        ws, bs, As, Bs, scales = [], [], [], [], []
        trainable = x.requires_grad
        for m in members:
            member = node_member(m, st, name, x)
            if member is None:
                return None
            w, b, a = member
            ws.append(w)
            bs.append(b)
            As.append(a.lora_A)
            Bs.append(a.lora_B)
            scales.append(a.scale)
            trainable = trainable or As[-1].requires_grad or Bs[-1].requires_grad
        if not trainable or any((b is None) != (bs[0] is None) for b in bs):       # biases in all or none
            return None
        k = ws[0].shape[1]
        if x.shape[-1] != k or any(w.shape[1] != k for w in ws):
            return None
        n = x.numel() // k
        # merged for every member by the rule that counts the unmerged form's epilogue read as a
        # whole pass (c = 1), ties included (q at the 8B shape and 4096 tokens): the node also saves
        # what the per-member rule does not count, autograd's two sums of dX and two more reads of
        # x and of dY
        if not all(ops.merged_is_cheaper(n, w.shape[0], k, True, ties=True, c=1.0) for w in ws):
            return None
        return shared_linear(x, ws, bs, As, Bs, scales)


# ---------------------------------------------------------------------------- the node
def shared_forward(x: Tensor, ws, bs, Ac, Bc, scales, need_xa: bool, views: bool = True
                   ) -> tuple[list[Tensor], Optional[Tensor]]:
    """(the members' outputs, xa = x [A_1; ...; A_m]^T (..., R) or None); A's and B's already in x's dtype.

    ``views``: the members but the last share one GEMM and buffer, each output a detached slice
    of it (eager); else each member has its own GEMM (an operator's outputs may not alias). The
    last member (v) has its own GEMM and buffer either way: attention keeps v for its backward,
    and a slice would keep the whole buffer alive with it. Without biases xa rides in that GEMM,
    [y_m | xa] = x [W'_m; A_1; ...; A_m]^T (the W' kernel writes the A rows in its launch): v is
    a column slice of it (``ops.xa_rides``) and xa a copy, so that keeping xa does not keep v's
    buffer. One GEMM and one concatenation of the A's fewer per call."""
    m = len(ws)
    ride = ops.xa_rides(need_xa, bs[0])                                     # members have biases in all or none
    W = wprime.stacked_merged_weight(ws, Bc, Ac, scales, append_a=ride)     # (D, k), or (D + R, k)
    dm = ws[-1].shape[0]
    hd = sum(w.shape[0] for w in ws) - dm
    outs = []
    if m > 1 and views:
        y = F.linear(x, W[:hd], torch.cat(bs[:-1]) if bs[0] is not None else None)   # (..., D - d_m)
        o = 0
        for w in ws[:-1]:
            d = w.shape[0]
            outs.append(y[..., o:o + d].detach())    # not a view of y for autograd: callers may modify it in place
            o += d
    elif m > 1:
        o = 0
        for w, b in zip(ws[:-1], bs[:-1]):
            d = w.shape[0]
            outs.append(F.linear(x, W[o:o + d], b))
            o += d
    if ride:
        yx = F.linear(x, W[hd:])                                            # [y_m | xa] (..., d_m + R)
        outs.append(yx[..., :dm].detach())
        return outs, yx[..., dm:].clone()
    outs.append(F.linear(x, W[hd:hd + dm], bs[-1]))                         # (..., d_m)
    xa = F.linear(x, torch.cat(Ac)) if need_xa else None                   # (..., R), for the dB's
    return outs, xa


def shared_backward(dY: Tensor, x: Optional[Tensor], xa: Optional[Tensor], ws, Ac, Bc, scales, need_x: bool,
                    need_a: list[bool], need_b: list[bool]) -> tuple[Optional[Tensor], Optional[Tensor], list]:
    """(dx, dA, [dB_i]) in x's dtype (None where not needed) for dY = [dy_1 | ... | dy_m] (..., D),
    the members' output gradients side by side; dA = [dA_1; ...; dA_m] (R, k) stacked (rows of the
    members that need it are theirs). x is needed for the dA's, xa for the dB's. (Under
    torch.compile the concatenation happens in the compiled graph, ``compiled._SharedOp``, fused
    with the kernels that compute the gradients.)

    With equal scales (the usual case) dX and gs = [dy_i B_i] come from one GEMM,
    dY [W' | blockdiag(B_i)], which reads dY once; dX is then a column slice of its result."""
    m = len(ws)
    k = ws[0].shape[1]
    D = sum(w.shape[0] for w in ws)
    dY2 = dY.reshape(-1, D)                                                 # (N, D)
    same = all(s == scales[0] for s in scales)
    dx = gs = dA = None
    if need_x and any(need_a) and same:
        full = torch.mm(dY2, wprime.stacked_merged_weight(ws, Bc, Ac, scales, append_b=True))   # (N, k + R)
        dx, gs = full[:, :k].view(dY.shape[:-1] + (k,)), full[:, k:]        # dY W', [dy_i B_i]
    elif need_x:
        dx = dY.matmul(wprime.stacked_merged_weight(ws, Bc, Ac, scales))       # dY W'  (..., k)
    if any(need_a):
        if gs is None:
            bd = torch.block_diag(*Bc) if same else torch.block_diag(*(B * s for B, s in zip(Bc, scales)))
            gs = torch.mm(dY2, bd)                                          # (N, R): [dy_i B_i] (times s_i)
        # dA = s gs^T x, (R, k): one read of x for every A. (addmm with beta=0 ignores its
        # first argument; a row of W0 has the shape it must broadcast from.)
        dA = torch.addmm(ws[0][0], gs.t(), x.reshape(-1, k), beta=0, alpha=scales[0] if same else 1.0)
    dBs = [None] * m
    if any(need_b):
        xa2 = xa.reshape(-1, xa.shape[-1])
        o = r0 = 0
        for i, (B, s) in enumerate(zip(Bc, scales)):
            d, r = B.shape
            if need_b[i]:                                                   # s dy_i^T xa_i, (d_i, r_i), contiguous
                dBs[i] = torch.addmm(B, dY2[:, o:o + d].t(), xa2[:, r0:r0 + r], beta=0, alpha=s)
            o += d
            r0 += r
    return dx, dA, dBs


class _SharedLinearFn(torch.autograd.Function):
    """Outputs x W_i'^T + b_i for every member i (see the module docstring).

    Inputs: x (..., k), m, then m weights (d_i, k), m biases (or None), m A's (r_i, k), m B's
    (d_i, r_i), and the m scales as a tuple. A and B may be float32 on a lower-precision base:
    cast to x's dtype for the GEMMs, gradients returned in their own dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, m: int, *args):
        ws, bs, As, Bs = args[:m], args[m:2 * m], args[2 * m:3 * m], args[3 * m:4 * m]
        scales = args[4 * m]
        Ac = [ops._cast(A, x.dtype) for A in As]
        Bc = [ops._cast(B, x.dtype) for B in Bs]
        need = ctx.needs_input_grad
        outs, xa = shared_forward(x, ws, bs, Ac, Bc, scales, any(need[2 + 3 * m:2 + 4 * m]))
        ctx.m, ctx.scales = m, scales
        ctx.dtypes = [A.dtype for A in As] + [B.dtype for B in Bs]
        ctx.save_for_backward(x if any(need[2 + 2 * m:2 + 3 * m]) else None, xa, *ws, *Ac, *Bc)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        m = ctx.m
        x, xa, *rest = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_a = need[2 + 2 * m:2 + 3 * m]
        dx, dA, dBs = shared_backward(torch.cat(dys, dim=-1), x, xa, rest[:m], rest[m:2 * m], rest[2 * m:],
                                      ctx.scales, need[0], need_a, need[2 + 3 * m:2 + 4 * m])
        dAs = wprime.split_rows(dA, rest[m:2 * m], need_a)
        grads = [None if g is None else ops._cast(g, t) for g, t in zip(dAs + dBs, ctx.dtypes)]
        return (dx, None) + (None,) * (2 * m) + tuple(grads) + (None,)


def shared_linear(x: Tensor, ws: list[Tensor], bs: list[Optional[Tensor]], As: list[Tensor], Bs: list[Tensor],
                  scales: list[float]) -> tuple[Tensor, ...]:
    """Every member's y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T as one node (no checks: see ``Group``).
    Under torch.compile the operator ``lorakit::shared_linear`` (lorakit.compiled)."""
    if torch.compiler.is_compiling():
        from . import compiled
        return compiled.shared_linear(x, ws, bs, As, Bs, scales)
    return _SharedLinearFn.apply(x, len(ws), *ws, *bs, *As, *Bs, tuple(scales))


# ---------------------------------------------------------------------------- attach / detach
_ONE_INPUT: dict = {}


def calls_on_one_input(cls: type, names: tuple[str, ...]) -> bool:
    """Whether ``cls.forward`` calls ``self.<name>(X)`` for every name in ``names``, each once, in
    this order, with one positional argument X, the same variable for all, which the function
    never assigns; and all calls sit in statements of one block (the function's body, or one
    branch: transformers' older Llama attention called them in an ``else``), not in a loop.
    Cached per class."""
    key = (cls, names)
    ok = _ONE_INPUT.get(key)
    if ok is None:
        ok = _ONE_INPUT[key] = _check_source(cls.forward, names)
    return ok


_LOOPS = (ast.For, ast.AsyncFor, ast.While, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda,
          ast.FunctionDef, ast.AsyncFunctionDef)


def _check_source(fn, names: tuple[str, ...]) -> bool:
    tree = function_tree(fn)
    if tree is None:
        return False
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = {}                                  # name -> (the block, statement index, line, column, argument)
    for node in ast.walk(tree):
        f = node.func if isinstance(node, ast.Call) else None
        if not (isinstance(f, ast.Attribute) and f.attr in names and isinstance(f.value, ast.Name)
                and f.value.id == "self"):
            continue
        if f.attr in found or len(node.args) != 1 or node.keywords or not isinstance(node.args[0], ast.Name):
            return False                        # called twice, or not on one plain variable
        if any(isinstance(a, _LOOPS) for a in _ancestors(node, parent, tree)):
            return False                        # in a loop, a comprehension or a nested function
        stmt = node
        while not isinstance(stmt, ast.stmt):
            stmt = parent[stmt]
        up = parent[stmt]
        block = next(b for b in (getattr(up, k, None) for k in ("body", "orelse", "finalbody", "handlers"))
                     if isinstance(b, list) and any(x is stmt for x in b))
        found[f.attr] = (id(block), next(i for i, x in enumerate(block) if x is stmt), node.lineno,
                         node.col_offset, node.args[0].id)
    if set(found) != set(names) or len({(v[0], v[4]) for v in found.values()}) != 1:
        return False                            # every member, one block, one variable
    order = [found[n][1:4] for n in names]
    if order != sorted(order):
        return False
    var = found[names[0]][4]
    return not any(isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, (ast.Store, ast.Del))
                   for n in ast.walk(tree))


def _ancestors(node, parent: dict, top):
    while node is not top:
        node = parent[node]
        if node is not top:
            yield node


def _groups(model: nn.Module):
    for parent in model_modules(model):
        mods = parent._modules
        for names in NAMES:
            present = tuple(n for n in names if type(mods.get(n)) is LoraLinear)
            # LoRA on q and v only (PEFT's default for Llama) groups those two; k runs between them
            if len(present) >= 2 and calls_on_one_input(type(parent), present):
                yield tuple(mods[n] for n in present)


def attach(model: nn.Module) -> int:
    """Link the members of every q/k/v-style group of LoRA linears, and unlink layers that no
    longer belong to one (after ``delete_adapter`` put a member's base back). Idempotent;
    returns how many groups are linked."""
    linked = set()
    n = 0
    for members in _groups(model):
        g = members[0].__dict__.get("_group")
        if g is None or g.members != members or any(m.__dict__.get("_group") is not g for m in members):
            g = Group(members)
            for m in members:
                m.__dict__["_group"] = g
        linked.update(id(m) for m in members)
        n += 1
    for m in model_modules(model):
        if type(m) is LoraLinear and id(m) not in linked:
            m.__dict__.pop("_group", None)
    return n


def detach(model: nn.Module) -> int:
    """Unlink every group: each member runs its own node again. How many groups were linked."""
    n = attached(model)
    for m in model_modules(model):
        if type(m) is LoraLinear:
            m.__dict__.pop("_group", None)
    return n


def attached(model: nn.Module) -> int:
    """How many groups of ``model`` are linked."""
    return sum(members[0].__dict__.get("_group") is not None for members in _groups(model))
