"""Per-row adapters: one batch, a different adapter (or none) for each row.

    with lorakit.batch_adapters(model, ["sql", "js", None, "sql"]):   # one entry per row
        logits = model(input_ids).logits          # row i runs with adapter names[i]
        out = model.generate(input_ids, max_new_tokens=32)   # rows keep their adapters

Semantics, in plain PyTorch (``lora_rows_reference`` is exactly this, and the tests use it)::

    y[i] = x[i] @ W0.T + b                                     x: (N, ..., k), one name per row
    if names[i] is not None and the layer has adapter a = names[i]:
        y[i] += a.scale * (dropout_a(x[i]) @ a.lora_A.T) @ a.lora_B.T

which is what running row i alone with ``set_adapter(model, names[i])`` computes (or, for
None, inside ``disable_adapters``). Adapters of any ranks and alphas mix in one batch, and
training through such a batch gives every adapter the gradient of its own rows only.

How it runs
-----------
Entering the block, once and on the host: the distinct names become groups 1..G (group 0
is "no adapter"), rows are sorted by group, and these few integers go to the device. The
forward then only launches device work (no host synchronisation: capturable in a CUDA
graph). Per layer the adapters of the groups are *packed*: A padded to rank R (a power of
two >= 16) and stacked as (S, R, k), B as (S, d, R), the scales as (S,):

* frozen adapters: the persistent packs of lorakit.packs (one slot per adapter, refreshed on
  entry only when a weight changed), so serving pays no copy per batch;
* trainable adapters: stacked in the forward, so autograd routes each row's gradient to
  its own adapter's A and B.

Then either the torch path (``lora_rows``: gather each row's A, B; two batched matmuls; any
device, autograd) or, on CUDA at inference, the Triton kernels of lorakit.kernels.rows
(prefill: shrink + expand over tiles of rows grouped by adapter; decode: one fused kernel).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .errors import AdapterNotFound, LoraError, MergedStateError, preview
from .inject import lora_layers
from .layers import LoraAdapter, LoraEmbedding, LoraLayer, LoraLinear, LoraState
from .packs import padded_rank, row_packs

Backend = Literal["auto", "torch", "triton"]


# ---------------------------------------------------------------------------- the math
def lora_rows_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence, rows: Sequence[int]
                        ) -> Tensor:
    """The semantics, one row at a time (readable; the reference of the tests).

    x: (N, ..., k); weight: (d, k); bias: (d,) or None;
    adapters: G tuples (A (r_g, k), B (d, r_g), scale_g), ranks may differ;
    rows: N ints, rows[i] in [0, G] where 0 is "no adapter" and g >= 1 is adapters[g - 1].
    Returns (N, ..., d): y[i] = x[i] W^T + b (+ s_g (x[i] A_g^T) B_g^T when rows[i] = g >= 1).
    """
    out = []
    for i, g in enumerate(rows):
        y = F.linear(x[i], weight, bias)
        if g:
            A, B, s = adapters[g - 1]
            y = y + s * F.linear(F.linear(x[i], A), B)
        out.append(y)
    return torch.stack(out)


def lora_rows(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor, index: Tensor) -> Tensor:
    """out + the per-row LoRA term, batched in torch (gather, then two batched matmuls).

    out: (N, T, d) base output; x: (N, T, k); A: (S, R, k) packed, zero-padded ranks;
    B: (S, d, R); scale: (S,) float32; index: (N,) int64 slot of each row (a zero slot adds 0).
    Returns (N, T, d)::

        out[i] + scale[index[i]] * (x[i] @ A[index[i]].T) @ B[index[i]].T

    equal to ``lora_rows_reference`` when A, B are the adapters padded with zeros. Works on
    any device and under autograd (gradients reach A, B through the gather).
    """
    a = A.index_select(0, index)                                   # (N, R, k)
    xa = torch.bmm(x.to(a.dtype), a.transpose(1, 2))               # (N, T, R)
    xa = (xa.float() * scale.index_select(0, index)[:, None, None]).to(out.dtype)
    b = B.index_select(0, index).to(out.dtype)                     # (N, d, R)
    return torch.baddbmm(out, xa, b.transpose(1, 2))               # out + xa B^T, one batched GEMM


def embedding_rows(out: Tensor, ids: Tensor, A: Tensor, B: Tensor, scale: Tensor, index: Tensor,
                   padding_idx: Optional[int] = None) -> Tensor:
    """out + per-row LoRA term of an embedding: s_g A_g^T[ids[i]] B_g^T.

    out: (N, T, dim); ids: (N, T) integer; A: (S, R, num_embeddings); B: (S, dim, R);
    scale: (S,) float32; index: (N,) int64. Returns (N, T, dim). As F.embedding, the row of
    ``padding_idx`` gets no gradient.
    """
    after_a = A.transpose(1, 2)[index[:, None], ids]               # (N, T, R)
    if padding_idx is not None and torch.is_grad_enabled() and after_a.requires_grad:
        after_a = torch.where((ids == padding_idx)[..., None], after_a.detach(), after_a)
    xa = (after_a.float() * scale.index_select(0, index)[:, None, None]).to(out.dtype)
    return torch.baddbmm(out, xa, B.index_select(0, index).to(out.dtype).transpose(1, 2))


# ---------------------------------------------------------------------------- the plan
class _LayerRows:
    """A trainable plan's view of one layer: its adapter (or None) for each group, the padded
    rank, zero pads and the scales; ``stacked`` packs the live parameters differentiably."""

    def __init__(self, layer: LoraLayer, path: str, groups: list[str]) -> None:
        mods = layer.adapters._modules
        self.layer, self.path = layer, path
        self.adapters: list[Optional[LoraAdapter]] = [mods.get(n) for n in groups]
        present = [a for a in self.adapters if a is not None]
        self.any = bool(present)
        self.R = padded_rank(a.r for a in present)
        self.pads = None

    def make_pads(self) -> None:
        w = self.layer.base.weight
        a = next(a for a in self.adapters if a is not None)
        scales = [0.0] + [a.scale if a is not None else 0.0 for a in self.adapters]
        self.pads = (torch.zeros((self.R, a.lora_A.shape[1]), dtype=w.dtype, device=w.device),
                     torch.zeros((a.lora_B.shape[0], self.R), dtype=w.dtype, device=w.device),
                     torch.tensor(scales, dtype=torch.float32).to(w.device))

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """Differentiable pack of the plan's groups: A (G+1, R, k), B (G+1, d, R), scale (G+1,)."""
        zero_a, zero_b, scale = self.pads
        As, Bs = [zero_a], [zero_b]
        for a in self.adapters:
            if a is None:
                As.append(zero_a)
                Bs.append(zero_b)
                continue
            pad = self.R - a.r
            As.append((F.pad(a.lora_A, (0, 0, 0, pad)) if pad else a.lora_A).to(zero_a.dtype))
            Bs.append((F.pad(a.lora_B, (0, pad)) if pad else a.lora_B).to(zero_b.dtype))
        return torch.stack(As), torch.stack(Bs), scale


class _DeviceIndex:
    """The plan's integers on one device, sent in one copy: each row's group and slot, the rows
    with an adapter sorted by group (for the kernels), each group's rows (for convolutions)."""

    def __init__(self, plan: "RowPlan", device: torch.device) -> None:
        n, m = len(plan.names), len(plan.order)
        by_group = sorted(range(n), key=lambda i: (plan.row_group[i], i))
        slots = plan.row_slot if plan.row_slot is not None else plan.row_group
        flat = torch.tensor(plan.row_group + slots + plan.order + by_group, dtype=torch.int64).to(device)
        self.group, self.slot, order, rows = flat[:n], flat[n:2 * n], flat[2 * n:2 * n + m], flat[2 * n + m:]
        self.order = order.to(torch.int32)
        counts = [plan.row_group.count(g) for g in range(len(plan.groups) + 1)]
        starts = [sum(counts[:g]) for g in range(len(counts))]
        self.members = [rows[s:s + c] for s, c in zip(starts, counts)]
        self.p = (torch.tensor(plan.row_dropout, dtype=torch.float32).to(device)
                  if any(plan.row_dropout) else None)


class RowPlan:
    """The per-row plan of one ``batch_adapters`` block (``LoraState.rows`` while it is active).

    ``names``: one entry per row; ``groups``: the distinct adapter names in first-seen order
    (group g >= 1 is ``groups[g - 1]``, group 0 is "no adapter"); ``row_group``: each row's
    group; ``order``: rows with an adapter, sorted by group; ``trainable``: whether the
    adapters train (stacked in the forward) or are read from the persistent packs, where
    ``row_slot`` is each row's slot. All computed on the host, once.
    """

    def __init__(self, model: nn.Module, state: LoraState, names: list, backend: Backend = "auto") -> None:
        self.names = list(names)
        self.groups = list(dict.fromkeys(n for n in self.names if n is not None))
        gid = {n: i + 1 for i, n in enumerate(self.groups)}
        self.row_group = [gid[n] if n is not None else 0 for n in self.names]
        self.order = sorted((i for i, g in enumerate(self.row_group) if g), key=lambda i: (self.row_group[i], i))
        self.row_dropout = [state.configs[n].dropout if n is not None else 0.0 for n in self.names]
        self.backend = backend
        self.packs = row_packs(state)
        slots = self.packs.prepare(model, state, self.groups)
        self.trainable = slots is None
        self.row_slot = None if self.trainable else [slots[g - 1] if g else 0 for g in self.row_group]
        self.layers: dict[LoraLayer, _LayerRows] = {}
        if self.trainable:
            for path, layer in lora_layers(model):
                info = _LayerRows(layer, path, self.groups)
                if info.any:
                    info.make_pads()
                    self.layers[layer] = info
            devices = {layer.base.weight.device for layer in self.layers}
        else:
            devices = {p.A.device for p in self.packs.layers.values()}
            devices |= {e.pairs[0][0].base.weight.device for n in self.groups
                        for e in [self.packs.entries[n]] if e.pairs}
        self._index = {dev: _DeviceIndex(self, dev) for dev in devices}

    # -- helpers ------------------------------------------------------------------------
    def index(self, device: torch.device) -> _DeviceIndex:
        idx = self._index.get(device)
        if idx is None:                      # a layer on a device not seen on entry
            idx = self._index[device] = _DeviceIndex(self, device)
        return idx

    def weights(self, layer: LoraLayer) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """(A, B, scale) packed for this layer, or None when no row's adapter touches it."""
        if self.trainable:
            info = self.layers.get(layer)
            return None if info is None else info.stacked()
        pack = self.packs.pack(layer)
        return None if pack is None else (pack.A, pack.B, pack.scale)

    def check_rows(self, layer: LoraLayer, x: Tensor, min_dim: int = 2) -> int:
        n = len(self.names)
        if x.dim() < min_dim or x.shape[0] != n:
            raise LoraError(
                f"batch_adapters was given {n} names, one per row, but a {type(layer).__name__} ({layer.base}) "
                f"received input of shape {tuple(x.shape)}. Pass one name per row of the batch; generate "
                "with num_beams or num_return_sequences = m repeats every row m times, so repeat each name m times.")
        return n

    def _triton(self, x3: Tensor, out3: Tensor, A: Tensor) -> bool:
        if self.backend == "torch":
            return False
        if not x3.is_cuda:
            if self.backend == "triton":
                raise LoraError("batch_adapters(backend='triton') needs CUDA tensors; use backend='auto'")
            return False
        if torch.is_grad_enabled() and (x3.requires_grad or A.requires_grad or out3.requires_grad):
            return False
        if not (x3.dtype == out3.dtype == A.dtype) or x3.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        return _kernels() is not None or _no_triton(self.backend)

    # -- the forwards the LoRA layers call -------------------------------------------------
    def linear(self, layer: LoraLinear, x: Tensor) -> Tensor:
        out = layer.base(x)
        w = self.weights(layer)
        if w is None:
            return out
        n = self.check_rows(layer, x)
        idx = self.index(x.device)
        A, B, scale = w
        index = idx.group if self.trainable else idx.slot
        x3 = x.reshape(n, -1, x.shape[-1])                                 # (N, T, k)
        out3 = out.view(n, -1, out.shape[-1])                              # (N, T, d)
        if idx.p is not None and layer.training:
            keep = 1.0 - idx.p[:, None, None]                              # per-row dropout of its adapter
            x3 = x3 * (torch.rand_like(x3) < keep) / keep
        elif self._triton(x3, out3, A):
            _kernels().add_rows_(out3, x3.contiguous(), A, B, scale, index, idx.order)
            return out
        return lora_rows(out3, x3, A, B, scale, index).view(out.shape)

    def embedding(self, layer: LoraEmbedding, ids: Tensor) -> Tensor:
        out = layer.base(ids)
        w = self.weights(layer)
        if w is None:
            return out
        n = self.check_rows(layer, ids, min_dim=1)
        idx = self.index(ids.device)
        A, B, scale = w
        index = idx.group if self.trainable else idx.slot
        out3 = out.view(n, -1, out.shape[-1])
        res = embedding_rows(out3, ids.reshape(n, -1), A, B, scale, index, layer.base.padding_idx)
        return res.view(out.shape)

    def generic(self, layer: LoraLayer, x: Tensor) -> Tensor:
        """Any other layer kind (convolutions): one pass per group over that group's rows."""
        out = layer.base(x)
        mods = layer.adapters._modules
        adapters = [(g, mods.get(n)) for g, n in enumerate(self.groups, 1) if n in mods]
        if not adapters:
            return out
        self.check_rows(layer, x)
        idx = self.index(x.device)
        for g, a in adapters:
            rows = idx.members[g]
            delta = layer.lora_delta(a, x.index_select(0, rows))
            out = out.index_add(0, rows, a.scale * delta.to(out.dtype))
        return out


def _kernels():
    """lorakit.kernels.rows, or None when Triton cannot be imported."""
    return kernels.load("rows")


def _no_triton(backend: str) -> bool:
    if backend == "triton":
        raise LoraError("batch_adapters(backend='triton'): Triton is not installed; `pip install triton` or use "
                        "backend='auto'")
    return False


# ---------------------------------------------------------------------------- the verb
def _check_names(model: nn.Module, names) -> tuple[LoraState, list]:
    from .adapters import _state
    st = _state(model)
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise LoraError(f"batch_adapters needs a list with one adapter name (or None) per batch row, got "
                        f"{type(names).__name__} {names!r}")
    names = list(names)
    if not names:
        raise LoraError("batch_adapters got an empty list of names; give one name (or None) per batch row")
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise LoraError(f"batch_adapters names must be adapter names (str) or None, got {preview(bad)}")
    unknown = list(dict.fromkeys(n for n in names if n is not None and n not in st.configs))
    if unknown:
        raise AdapterNotFound(f"batch_adapters: no adapter named {preview(unknown)} on {type(model).__name__}; "
                              f"available adapters: {list(st.configs)}")
    if st.merged is not None:
        raise MergedStateError(f"adapter {st.merged!r} is merged into the base weights, so rows cannot use other "
                               "adapters; call lorakit.unmerge(model) first")
    saved = [n for n, cfg in st.configs.items() if cfg.modules_to_save]
    if saved:
        raise LoraError(f"batch_adapters does not support modules_to_save (adapters {preview(saved)} train full "
                        "copies of modules, which cannot differ per row); run them one at a time with set_adapter")
    return st, names


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names: Sequence[Optional[str]], backend: Backend = "auto"
                   ) -> Iterator[RowPlan]:
    """Inside the block, batch row i of every forward runs with adapter ``names[i]`` (None: the base).

    ``names`` has one entry per batch row; a forward whose batch has another size raises a
    LoraError naming the layer. Adapters of different ranks and alphas mix freely; training
    through the block gives each adapter the gradients of its own rows (several adapters
    train in one step). Adapters kept in host memory by the adapter cache are brought to
    the device on entry (lorakit.cache). ``backend``: "auto" (Triton kernels on CUDA at
    inference, torch otherwise), "torch", or "triton". Yields the RowPlan. The previous
    state comes back on exit, also when the block raises.
    """
    if backend not in ("auto", "torch", "triton"):
        raise LoraError(f"batch_adapters backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    st, names = _check_names(model, names)
    from .cache import cache_of
    cache = cache_of(st)
    groups = list(dict.fromkeys(n for n in names if n is not None))
    if cache is not None:
        cache.fetch(groups)
    plan = RowPlan(model, st, names, backend)
    previous = st.rows
    st.rows = plan
    try:
        yield plan
    finally:
        st.rows = previous
