"""Packed adapter weights for per-row batches (lorakit.multi) of frozen adapters.

For every LoRA linear or embedding layer of a model, the adapters that per-row batches use
are kept stacked on the layer's device, one *slot* per adapter, ranks zero-padded to R
(a power of two >= 16, so that tensor-core tiles fit)::

    A      (S, R, k)    slot s holds adapter s's lora_A in rows [0, r), zeros below
    B      (S, d, R)    slot s holds lora_B in columns [0, r), zeros beyond
    scale  (S,)         float32 alpha / r of each slot
    slot 0              always zero: "no adapter"

Slots are model-wide (adapter "sql" has the same slot in every layer; a layer that the
adapter does not adapt keeps that slot zero). A batch's kernels then need nothing but
each row's slot. Packs persist across batches: entering ``batch_adapters`` only compares,
per adapter named, each parameter's in-place version counter with the one it had when
copied, and copies an adapter again only when it changed (or is new, or was replaced
under the same name). Every in-place write bumps the counter
(optimizer steps, ``copy_``, ``load_state_dict``); moves or casts of the model are seen through
the base weights' device and dtype; after replacing a frozen adapter's tensors some other
way (assigning ``.data``), call ``clear_row_packs(model)``. The cost: the packed copies
take as much device memory as the adapters used in batches (``clear_row_packs`` frees
them; the adapter cache releases evicted adapters' slots).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from .layers import LoraAdapter, LoraEmbedding, LoraLayer, LoraLinear, LoraState

MIN_RANK = 16
_PACKS: "weakref.WeakKeyDictionary[LoraState, RowPacks]" = weakref.WeakKeyDictionary()


def padded_rank(ranks) -> int:
    """The pack's rank: a power of two >= MIN_RANK that holds every rank given."""
    r = max(ranks, default=1)
    return max(MIN_RANK, 1 << (r - 1).bit_length())


class _LayerPack:
    """One layer's packed tensors and the slots that hold data (non-zero)."""

    def __init__(self, A: Tensor, B: Tensor, scale: Tensor) -> None:
        self.A, self.B, self.scale = A, B, scale
        self.used: set[int] = set()

    @staticmethod
    def make(layer: LoraLayer, old: Optional["_LayerPack"], slots: int, R: int) -> "_LayerPack":
        """A pack with room for ``slots`` slots of rank R, keeping ``old``'s contents."""
        w = layer.base.weight
        k, d = (layer.in_features, layer.out_features) if isinstance(layer, LoraLinear) else w.shape
        if old is not None:
            slots = max(slots, old.A.shape[0] * 3 // 2)
            R = max(R, old.A.shape[1])
        new = _LayerPack(torch.zeros((slots, R, k), dtype=w.dtype, device=w.device),
                         torch.zeros((slots, d, R), dtype=w.dtype, device=w.device),
                         torch.zeros(slots, dtype=torch.float32, device=w.device))
        if old is not None:
            s, r = old.A.shape[:2]
            new.A[:s, :r] = old.A
            new.B[:s, :, :r] = old.B
            new.scale[:s] = old.scale
            new.used = old.used
        return new

    @torch.no_grad()
    def put(self, s: int, a: LoraAdapter) -> None:
        r = a.r
        self.A[s, :r].copy_(a.lora_A)
        self.B[s, :, :r].copy_(a.lora_B)
        if s in self.used and r < self.A.shape[1]:         # a previous occupant may have had a larger rank
            self.A[s, r:].zero_()
            self.B[s, :, r:].zero_()
        self.scale[s] = float(a.scale)
        self.used.add(s)

    @torch.no_grad()
    def clear(self, s: int) -> None:
        if s in self.used:
            self.A[s].zero_()
            self.B[s].zero_()
            self.scale[s] = 0.0
            self.used.discard(s)


class _Entry:
    """What a pack knows of one adapter: its config object (identity tells a replaced adapter),
    its (layer, LoraAdapter) pairs, its parameters, and their fingerprint when last copied."""

    def __init__(self, config, pairs: list, slot: int) -> None:
        self.config, self.pairs, self.slot = config, pairs, slot
        self.params = [p for _, a in pairs for p in (a.lora_A, a.lora_B)]
        self.fingerprint: Optional[list] = None


class RowPacks:
    """The packed copies of one model's adapters (see the module docstring)."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.entries: dict[str, _Entry] = {}
        self.layers: "weakref.WeakKeyDictionary[LoraLayer, _LayerPack]" = weakref.WeakKeyDictionary()

    def release(self, name: str) -> None:
        """Forget ``name``'s slot; its data is overwritten (or zeroed) when the slot is reused."""
        s = self.slots.pop(name, None)
        self.entries.pop(name, None)
        if s is not None:
            self.free.append(s)

    def _slot(self, name: str) -> int:
        s = self.slots.get(name)
        if s is None:
            s = self.free.pop() if self.free else len(self.slots) + len(self.free) + 1
            self.slots[name] = s
        return s

    def prepare(self, model: nn.Module, state: LoraState, names: list[str]) -> Optional[list[int]]:
        """The slot of each name, every pack up to date; None when an adapter is trainable
        (the plan then stacks the live parameters instead, so gradients reach them)."""
        for n in [n for n in self.slots if n not in state.configs]:
            self.release(n)
        entries = []
        for n in names:
            e = self.entries.get(n)
            if e is None or e.config is not state.configs[n]:
                e = self.entries[n] = _Entry(state.configs[n], _pairs(model, n), self._slot(n))
            entries.append(e)
        if any(p.requires_grad for e in entries for p in e.params):
            return None
        if any(self._moved(e) for e in entries):
            self._forget_all()
        for e in entries:
            try:
                fp = [p._version for p in e.params]
            except RuntimeError:               # inference tensors keep no version counter: copy again
                fp = None
            if fp is None or fp != e.fingerprint:
                self._write(e)
                e.fingerprint = fp
        return [e.slot for e in entries]

    def _write(self, e: _Entry) -> None:
        """Copy adapter ``e`` into its slot of every layer; zero the slot where it has no layer."""
        s = e.slot
        mine = set()
        for layer, a in e.pairs:
            if not isinstance(layer, (LoraLinear, LoraEmbedding)):
                continue                        # convolutions run per group, without packs
            pack = self.layers.get(layer)
            w = layer.base.weight
            if (pack is None or pack.A.shape[0] <= s or pack.A.shape[1] < a.r or pack.A.dtype != w.dtype
                    or pack.A.device != w.device):
                keep = pack if pack is not None and pack.A.dtype == w.dtype and pack.A.device == w.device else None
                if pack is not None and keep is None:
                    self._forget_all()          # model moved or cast: every slot is copied again
                pack = self.layers[layer] = _LayerPack.make(layer, keep, max(s + 1, 4), padded_rank([a.r]))
            pack.put(s, a)
            mine.add(layer)
        for layer, pack in list(self.layers.items()):
            if layer not in mine:
                if pack.A.shape[0] <= s:        # every pack must be indexable by every slot
                    self.layers[layer] = _LayerPack.make(layer, pack, s + 1, pack.A.shape[1])
                else:
                    pack.clear(s)

    def _moved(self, e: _Entry) -> bool:
        """Whether the model was moved or cast since ``e`` was packed (its first packed layer tells)."""
        for layer, _ in e.pairs:
            pack = self.layers.get(layer)
            if pack is not None:
                w = layer.base.weight
                return pack.A.device != w.device or pack.A.dtype != w.dtype
        return False

    def _forget_all(self) -> None:
        for e in self.entries.values():
            e.fingerprint = None

    def pack(self, layer: LoraLayer) -> Optional[_LayerPack]:
        return self.layers.get(layer)


def _pairs(model: nn.Module, name: str) -> list:
    from .inject import lora_layers
    return [(layer, layer.adapters[name]) for _, layer in lora_layers(model) if name in layer.adapters]


def row_packs(state: LoraState) -> RowPacks:
    """The model's RowPacks (created on first use)."""
    packs = _PACKS.get(state)
    if packs is None:
        packs = _PACKS[state] = RowPacks()
    return packs


def release_slot(state: LoraState, name: str) -> None:
    """Free ``name``'s slot if the model has packs (the adapter cache calls this on eviction)."""
    packs = _PACKS.get(state)
    if packs is not None:
        packs.release(name)


def clear_row_packs(model: nn.Module) -> None:
    """Free the packed copies that per-row batches keep on the device (rebuilt when next needed)."""
    from .inject import find_state
    st = find_state(model)
    if st is not None:
        _PACKS.pop(st, None)
