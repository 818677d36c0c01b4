"""LoRA layers: each wraps one frozen base module and holds its adapters.

    x ──► base (W0, frozen) ─────────────────────────┐
      └─► dropout ─► A (r x k) ─► B (d x r) ─► * s ──┴─► + ──► h        s = alpha / r

* ``LoraAdapter`` is one (A, B) pair with its rank, alpha and scale.
* ``LoraLinear`` (nn.Linear and GPT-2's Conv1D), ``LoraEmbedding`` and ``LoraConv``
  (nn.Conv1d / nn.Conv2d) own ``base`` and an ``adapters`` ModuleDict: several adapters
  can hang off one layer at once, of different ranks.
* Which adapter runs is not stored per layer: every layer of a model shares one
  ``LoraState`` (active name, disabled flag, per-row batch plan). Switching adapters is one
  attribute write on that object, whatever the number of layers.
* ``SavedModule`` wraps a module listed in ``modules_to_save``: a trainable full copy
  per adapter.

Weights only change through explicit verbs (merge / unmerge in adapters.py); nothing
changes in ``forward``, ``.train()`` or ``.eval()``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import LoraConfig
from .errors import MergedStateError, UnsupportedModule


@dataclass(eq=False)
class LoraState:
    """Model-wide adapter state shared by every LoRA layer of one model (not a module).

    ``configs`` is the registry of adapter names (insertion order) and their configs.
    """

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: Optional[str] = None
    disabled: bool = False
    rows: Any = None           # a per-row batch plan (see adapters.batch_adapters), or None
    merged: Optional[str] = None


class LoraAdapter(nn.Module):
    """One low-rank update delta = scale * B @ A.

    Linear: A (r, k), B (d, r). Embedding: A (r, num_embeddings), B (dim, r).
    Conv: A (r, in, *kernel), B (out, r, 1, ...).
    """

    def __init__(self, a_shape: tuple, b_shape: tuple, r: int, alpha: float, scale: float, dropout: float,
                 dtype: torch.dtype, device: torch.device, zero_b: bool = True) -> None:
        super().__init__()
        self.r, self.alpha, self.scale, self.dropout = r, alpha, scale, dropout
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        make_b = torch.zeros if zero_b else torch.empty     # empty: the caller copies every value in
        self.lora_B = nn.Parameter(make_b(b_shape, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}"


def _init_pair(adapter: LoraAdapter, init: str, embedding: bool) -> None:
    """PEFT's initialisation: B = 0 (A = 0, B ~ N(0, 1) for embeddings), so delta starts at 0."""
    with torch.no_grad():
        if embedding:
            nn.init.zeros_(adapter.lora_A)
            nn.init.normal_(adapter.lora_B)
        elif init == "gaussian":
            nn.init.normal_(adapter.lora_A, std=1.0 / adapter.r)
            nn.init.zeros_(adapter.lora_B)
        else:
            nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
            nn.init.zeros_(adapter.lora_B)


class LoraLayer(nn.Module):
    """What every LoRA layer shares: the base module, the adapters, the shared state."""

    peft_a_key = "lora_A.weight"
    peft_b_key = "lora_B.weight"

    def __init__(self, base: nn.Module, state: LoraState) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        object.__setattr__(self, "state", state)   # shared plain object, not a submodule
        self.merged_name: Optional[str] = None

    def adapter_shapes(self, r: int) -> tuple[tuple, tuple]:
        return adapter_shapes(self.base, r)

    # -- overridden per kind -----------------------------------------------------------
    def delta_weight(self, name: str, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The update s B A of adapter ``name`` in the base weight's own layout, computed in
        float32 and returned in ``dtype`` (default: the base weight's dtype)."""
        raise NotImplementedError(f"{type(self).__name__} must define delta_weight")

    @property
    def weight(self) -> Tensor:
        """The base weight (so code that reads ``module.weight`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return getattr(self.base, "bias", None)

    # -- adapters -----------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, scale: float, dropout: float, init: Optional[str],
                    dtype: Optional[torch.dtype] = None) -> LoraAdapter:
        """Add adapter ``name``; ``init=None`` leaves A uninitialised (the caller copies values in)."""
        w = self.base.weight
        a_shape, b_shape = self.adapter_shapes(r)
        adapter = LoraAdapter(a_shape, b_shape, r, alpha, scale, dropout, dtype or w.dtype, w.device,
                              zero_b=init is not None)
        if init is not None:
            _init_pair(adapter, init, embedding=isinstance(self, LoraEmbedding))
        self.adapters[name] = adapter
        return adapter

    def active_adapter(self) -> Optional[LoraAdapter]:
        """The adapter this layer applies now, or None (base only)."""
        st = self.state
        if st.disabled or self.merged_name is not None or st.active is None:
            return None
        return self.adapters[st.active] if st.active in self.adapters else None

    # -- merge --------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W0 += s B A of ``name``, summed in float32 and rounded once to W0's dtype.

        Refuses a second merge (never a silent double add); a layer without ``name`` is left alone.
        """
        if self.merged_name is not None:
            raise MergedStateError(f"adapter {self.merged_name!r} is already merged into this layer; unmerge first")
        if name not in self.adapters:
            return
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight(name, torch.float32)).to(w.dtype))
        self.merged_name = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= s B A of the merged adapter (W0 comes back within float rounding)."""
        if self.merged_name is None:
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight(self.merged_name, torch.float32)).to(w.dtype))
        self.merged_name = None

    def extra_repr(self) -> str:
        return f"merged={self.merged_name!r}" if self.merged_name else ""


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear (weight d x k) or GPT-2 Conv1D (weight stored k x d: fan_in_fan_out).

    y = x W0^T + b + s (dropout(x) A^T) B^T; A (r, k), B (d, r).
    """

    _group = None      # a lorakit.grouped.Group when this layer reads the same input as its siblings (q, k, v)

    def __init__(self, base: nn.Module, state: LoraState) -> None:
        super().__init__(base, state)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)    # GPT-2 Conv1D: y = x @ W + b
        w = base.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape

    def base_weight_dk(self) -> Tensor:
        """W0 as (d, k) whatever the storage layout (a view, no copy). Read from the parameter
        dict: this runs in every forward."""
        w = self._modules["base"]._parameters["weight"]
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, name: str, dtype: Optional[torch.dtype] = None) -> Tensor:
        a = self.adapters[name]
        delta = ops.linear_delta_weight(a.lora_A.float(), a.lora_B.float(), a.scale)  # (d, k)
        return (delta.t() if self.fan_in_fan_out else delta).to(dtype or self.base.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        # Runs 100+ times per step of an LLM: plain dict lookups instead of nn.Module.__getattr__.
        st = self.state
        base = self._modules["base"]
        if st.disabled or self.merged_name is not None:
            return base(x)
        if st.rows is not None:
            return st.rows.linear(self, x)
        a = self._modules["adapters"]._modules.get(st.active)
        if a is None:
            return base(x)
        p = a._parameters
        x_drop = F.dropout(x, a.dropout, True) if a.dropout > 0 and self.training else None
        g = self._group
        if g is not None and x_drop is None and torch.is_grad_enabled():
            y = g.call(self, x)               # q, k, v as one node (lorakit.grouped), when it applies
            if y is not None:
                return y
        w, bias = self.base_weight_dk(), base._parameters.get("bias")
        if not torch.is_grad_enabled() and x_drop is None:
            # Inference (decoding runs this 100+ times per token, bound by the host): the
            # forward alone, through the fewest Python frames.
            return ops.lora_linear_nograd(x, w, bias, p["lora_A"], p["lora_B"], a.scale)
        # ops.lora_linear is the fast path in eager mode and an opaque operator under torch.compile.
        return ops.lora_linear(x, w, bias, p["lora_A"], p["lora_B"], a.scale, x_drop)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: y = W0[ids] + s A^T[ids] B^T; A (r, num_embeddings), B (dim, r)."""

    peft_a_key = "lora_embedding_A"
    peft_b_key = "lora_embedding_B"

    def delta_weight(self, name: str, dtype: Optional[torch.dtype] = None) -> Tensor:
        a = self.adapters[name]
        # (num_embeddings, dim) = (s B A)^T
        delta = ops.linear_delta_weight(a.lora_A.float(), a.lora_B.float(), a.scale).t()
        return delta.to(dtype or self.base.weight.dtype)

    def embed_kwargs(self) -> dict:
        b = self.base
        return dict(padding_idx=b.padding_idx, max_norm=b.max_norm, norm_type=b.norm_type,
                    scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)

    def forward(self, ids: Tensor) -> Tensor:
        if self.state.rows is not None and self.merged_name is None and not self.state.disabled:
            return self.state.rows.embedding(self, ids)
        a = self.active_adapter()
        if a is None:
            return self.base(ids)
        fn = ops.lora_embedding_reference if torch.compiler.is_compiling() else ops.lora_embedding
        return fn(ids, self.base.weight, a.lora_A, a.lora_B, a.scale, **self.embed_kwargs())


class LoraConv(LoraLayer):
    """LoRA on nn.Conv1d / nn.Conv2d: y = conv(x, W0) + s conv_B(conv_A(dropout(x))).

    conv_A has the base's kernel, stride, padding and dilation: A (r, in, *kernel);
    conv_B is a 1x1 conv: B (out, r, 1, ...). The merged update is sum_r B[o, r] A[r, ...].
    """

    def __init__(self, base: nn.Module, state: LoraState) -> None:
        super().__init__(base, state)
        reason = unsupported_reason(base)
        if reason:
            raise UnsupportedModule(f"cannot adapt this {type(base).__name__}: {reason}")
        self._conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d

    def delta_weight(self, name: str, dtype: Optional[torch.dtype] = None) -> Tensor:
        a = self.adapters[name]
        return ops.conv_delta_weight(a.lora_A.float(), a.lora_B.float(), a.scale).to(dtype or self.base.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.state.rows is not None and self.merged_name is None and not self.state.disabled:
            return self.state.rows.generic(self, x)
        a = self.active_adapter()
        out = self.base(x)
        if a is None:
            return out
        return out + a.scale * self.lora_delta(a, x).to(out.dtype)

    def lora_delta(self, a: LoraAdapter, x: Tensor) -> Tensor:
        """conv_B(conv_A(dropout(x))), without the scale."""
        b = self.base
        if a.dropout > 0 and self.training:
            x = F.dropout(x, a.dropout, True)
        h = self._conv(x.to(a.lora_A.dtype), a.lora_A, None, b.stride, b.padding, b.dilation)
        return self._conv(h, a.lora_B)


class SavedModule(nn.Module):
    """A module listed in ``modules_to_save``: the frozen original plus one trainable copy per adapter."""

    def __init__(self, base: nn.Module, state: LoraState) -> None:
        super().__init__()
        self.base = base
        self.copies = nn.ModuleDict()
        object.__setattr__(self, "state", state)

    def add_copy(self, name: str) -> nn.Module:
        c = copy.deepcopy(self.base)
        self.copies[name] = c
        return c

    def current(self) -> nn.Module:
        st = self.state
        if st.rows is not None:
            raise MergedStateError("modules_to_save cannot be mixed per row in one batch")
        if st.disabled or st.active not in self.copies:
            return self.base
        return self.copies[st.active]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    @property
    def weight(self) -> Tensor:
        return self.current().weight


def supported_base(module: nn.Module) -> Optional[type]:
    """The LoRA layer class for a module, or None when its type cannot be adapted."""
    if isinstance(module, nn.Linear):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LoraConv
    if _is_gpt2_conv1d(module):
        return LoraLinear
    return None


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why a module of a supported type still cannot be adapted, or None when it can."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"grouped convolutions (groups={module.groups}) are not supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
    return None


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (weight (k, d), y = x @ W + b), detected without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def adapter_shapes(base: nn.Module, r: int) -> tuple[tuple, tuple]:
    """(A shape, B shape) of a rank-r adapter on ``base`` (see LoraAdapter)."""
    w = base.weight
    if isinstance(base, nn.Embedding):
        n, dim = w.shape
        return (r, n), (dim, r)
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        ones = (1,) * len(base.kernel_size)
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, *ones)
    d, k = (w.shape[1], w.shape[0]) if _is_gpt2_conv1d(base) else w.shape
    return (r, k), (d, r)
