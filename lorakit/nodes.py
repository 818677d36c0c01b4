"""What lorakit's fused nodes share (the gated MLP of lorakit.fused, the q/k/v node of
lorakit.grouped): when one may run for a call (``node_adapter``, ``node_member``), reading a
module class's ``forward`` source to decide where one can form (``function_tree``), and the
walk over a model's modules that links them (``model_modules``)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .layers import LoraLayer, LoraLinear


def hooked(m: nn.Module) -> bool:
    """Whether module m has any forward or backward hook of its own."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    mod = nn.modules.module
    return bool(mod._global_forward_hooks or mod._global_forward_pre_hooks or mod._global_backward_hooks
                or mod._global_backward_pre_hooks)


def node_adapter(st, x: Tensor) -> Optional[str]:
    """The adapter a fused node (this MLP node, lorakit.grouped's q/k/v node) would run for x
    given the model-wide state ``st``, or None: adapters on, one active, no per-row batch, no
    global module hooks, no autocast to a dtype other than x's (autocast in x's own dtype casts
    only A and B, as the nodes do), and under torch.compile the operators registered."""
    name = st.active
    if st.disabled or st.rows is not None or name is None or _global_hooks():
        return None
    cast_to = ops.autocast_dtype(x)
    if cast_to is not None and cast_to != x.dtype:
        return None
    if torch.compiler.is_compiling():
        from . import compiled
        if not compiled.AVAILABLE:
            return None
    return name


def node_member(m: LoraLinear, st, name: str, x: Tensor) -> Optional[tuple]:
    """(W0, bias or None, adapter) of LoRA linear ``m`` if it can join a fused node running
    adapter ``name`` on x, else None: the model's state ``st``, the adapter present and unmerged,
    an ``nn.Linear`` base whose weight (and bias) are frozen and in x's dtype, no hooks on the
    layer or its base, no dropout while training."""
    base = m._modules["base"]
    a = m._modules["adapters"]._modules.get(name)
    if (a is None or m.state is not st or m.fan_in_fan_out or m.merged_name is not None
            or type(base) is not nn.Linear or hooked(m) or hooked(base) or (a.dropout > 0 and m.training)):
        return None
    bp = base._parameters
    w, b = bp["weight"], bp.get("bias")
    if w.requires_grad or w.dtype != x.dtype or (b is not None and b.requires_grad):
        return None
    return w, b, a


def function_tree(fn) -> Optional[ast.FunctionDef]:
    """The ``ast`` of function ``fn`` (a method such as a module class's ``forward``), or None
    when its source cannot be read or is not a plain ``def``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    return tree if isinstance(tree, ast.FunctionDef) else None


def model_modules(model: nn.Module):
    """Every module of ``model`` except the insides of LoRA layers (their adapters: thousands
    of modules once many adapters are loaded, none of them a node's part)."""
    stack = [model]
    while stack:
        m = stack.pop()
        yield m
        if not isinstance(m, LoraLayer):
            stack.extend(c for c in m._modules.values() if c is not None)
