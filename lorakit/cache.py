"""The adapter cache: many adapters registered on one model, a few of them on the device.

    lorakit.adapter_cache(model, max_resident=8)               # at most 8 adapters on the GPU
    for name, path in adapters.items():
        lorakit.load_adapter(model, path, name=name, device="cpu")   # pinned host memory
    with lorakit.batch_adapters(model, ["sql", "js", None]):  # brings sql and js in
        model.generate(...)

* ``AdapterCache`` keeps, per model, the least-recently-used order of the adapters whose
  weights are on the device. An adapter that is not resident lives in pinned host memory:
  one flat buffer per dtype, so bringing it in is one asynchronous copy and pointing its
  parameters at views of the device copy. Evicting copies the weights back to the host
  only when they changed on the device (training), then frees the device copy.

The cache is attached to the model's shared LoraState (weakly: it goes away with the model).
The packed copies that per-row batches read are lorakit.packs'; evicting releases them.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .errors import LoraError, preview
from .layers import LoraState
from .packs import release_slot

_CACHES: "weakref.WeakKeyDictionary[LoraState, AdapterCache]" = weakref.WeakKeyDictionary()


def version(t: Tensor):
    """The tensor's in-place version counter; inference tensors have none, so they get a token
    equal to nothing (an evicted inference tensor is always copied back)."""
    return object() if t.is_inference() else t._version


# ---------------------------------------------------------------------------- host cache
class _HostCopy:
    """An adapter's parameters in pinned host memory: one flat buffer per dtype and the views."""

    def __init__(self, params: list[nn.Parameter], pin: bool,
                 adopt: Optional[dict[torch.dtype, tuple[Tensor, list[int]]]] = None) -> None:
        """Buffers for ``params`` (fresh; or, for a dtype in ``adopt``, the given flat tensor and
        each parameter's offset in it, in ``params`` order)."""
        self.params = params
        self.flats: dict[torch.dtype, Tensor] = {}
        self.layout: list[tuple[nn.Parameter, torch.dtype, int]] = []
        adopt = adopt or {}
        offsets = {dt: iter(offs) for dt, (_, offs) in adopt.items()}
        sizes: dict[torch.dtype, int] = {}
        for p in params:
            off = next(offsets[p.dtype]) if p.dtype in offsets else sizes.get(p.dtype, 0)
            self.layout.append((p, p.dtype, off))
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        for dt, n in sizes.items():
            self.flats[dt] = adopt[dt][0] if dt in adopt else torch.empty(n, dtype=dt, pin_memory=pin)

    @classmethod
    @torch.no_grad()
    def from_values(cls, pairs: list[tuple[nn.Parameter, Optional[Tensor]]], runs: list[Tensor],
                    pin: bool) -> "_HostCopy":
        """A host copy holding ``pairs``' values (a parameter's own value where None). A dtype whose
        values are exactly one of the host tensors ``runs`` (contiguous views of it, each element
        once: a file read into pinned memory) keeps that tensor as its buffer, with no copy."""
        params = [p for p, _ in pairs]
        adopt = {}
        for dt in {p.dtype for p in params}:
            srcs = [t for p, t in pairs if p.dtype == dt]
            found = _covering_run(srcs, runs, dt, pin)
            if found is not None:
                adopt[dt] = found
        copy = cls(params, pin, adopt)
        dsts, srcs = [], []
        for (p, view), (_, t) in zip(copy.views(copy.flats), pairs):
            if p.dtype not in adopt:
                dsts.append(view)
                srcs.append(p.detach() if t is None else t)
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        return copy

    def views(self, flats: dict) -> Iterable[tuple[nn.Parameter, Tensor]]:
        for p, dt, off in self.layout:
            yield p, flats[dt][off:off + p.numel()].view(p.shape)

    @torch.no_grad()
    def store(self) -> None:
        """Copy the parameters' current values into the host buffers: per dtype, one
        concatenation on the device and one copy to the host."""
        for dt, flat in self.flats.items():
            parts = [p.detach().reshape(-1) for p, d, _ in self.layout if d == dt]
            flat.copy_(torch.cat(parts) if len(parts) > 1 else parts[0])

    def point_home(self) -> None:
        """Point every parameter (and its gradient) at the host copy, freeing the device copy."""
        for p, view in self.views(self.flats):
            if p.grad is not None:
                p.grad = p.grad.to(view.device)
            p.data = view


def _covering_run(srcs: list[Optional[Tensor]], runs: list[Tensor], dtype: torch.dtype, pin: bool
                  ) -> Optional[tuple[Tensor, list[int]]]:
    """(run, offset of each source in it) when the sources are contiguous views of one host run
    of ``dtype`` (pinned as ``pin`` asks) that cover it exactly, else None."""
    if any(t is None or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t in srcs):
        return None
    for run in runs:
        if run.dtype != dtype or run.numel() != sum(t.numel() for t in srcs) or run.is_pinned() != pin:
            continue
        storage = run.untyped_storage().data_ptr()
        if any(t.untyped_storage().data_ptr() != storage for t in srcs):
            continue
        base, size = run.data_ptr(), run.element_size()
        offsets = [(t.data_ptr() - base) // size for t in srcs]
        spans = sorted((o, o + t.numel()) for o, t in zip(offsets, srcs))
        if spans[0][0] == 0 and spans[-1][1] == run.numel() and all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
            return run, offsets
    return None


class AdapterCache:
    """Which adapters of one model sit on the device; at most ``max_resident`` (None: no limit).

    Made by ``adapter_cache(model, ...)`` or by ``load_adapter(..., device="cpu")``. Adapters
    added on the device (inject, a plain load_adapter) count as resident, most recent first.
    """

    def __init__(self, model: nn.Module, state: LoraState, device: torch.device,
                 max_resident: Optional[int] = None) -> None:
        self._model = weakref.ref(model)
        self.state = state
        self.device = torch.device(device)
        self.max_resident = _check_max(max_resident)
        self.lru: OrderedDict[str, None] = OrderedDict()      # resident names, least recent first
        self.copies: dict[str, _HostCopy] = {}                # host copies (every non-resident name has one)
        self.versions: dict[str, list[int]] = {}              # resident names: parameter versions on arrival

    # -- bookkeeping --------------------------------------------------------------------
    def _sync(self) -> None:
        """Forget deleted adapters; count adapters added on the device since as resident."""
        names = self.state.configs
        for table in (self.copies, self.lru, self.versions):
            for n in [n for n in table if n not in names]:
                del table[n]
        for n in names:
            if n not in self.copies and n not in self.lru:
                self.lru[n] = None

    def resident(self) -> list[str]:
        """Names of the adapters on the device, least recently used first."""
        self._sync()
        return list(self.lru)

    def is_resident(self, name: str) -> bool:
        self._sync()
        return name in self.lru

    def set_max_resident(self, max_resident: Optional[int]) -> None:
        self.max_resident = _check_max(max_resident)
        self._sync()
        self._make_room([], 0)

    # -- moves --------------------------------------------------------------------------
    def fetch(self, names: Iterable[str]) -> None:
        """Make every adapter in ``names`` resident, evicting the least recently used others."""
        self._sync()
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in self.state.configs]
        if unknown:
            raise LoraError(f"adapter cache: no adapter named {preview(unknown)}; adapters: {list(self.state.configs)}")
        if self.max_resident is not None and len(names) > self.max_resident:
            raise LoraError(f"one batch names {len(names)} distinct adapters but the adapter cache keeps at most "
                            f"max_resident={self.max_resident} on {self.device}; raise it with "
                            "lorakit.adapter_cache(model, max_resident=...) or split the batch")
        missing = [n for n in names if n not in self.lru]
        self._make_room(names, len(missing))
        for n in missing:
            self._bring_in(n)
        for n in names:
            self.lru.move_to_end(n)

    def evict(self, name: str) -> None:
        """Move adapter ``name`` to (pinned) host memory; the host copy is refreshed only when the
        weights changed on the device since they arrived (training)."""
        self._sync()
        if name not in self.lru:
            if name not in self.copies:
                raise LoraError(f"adapter cache: no adapter named {name!r}; adapters: {list(self.state.configs)}")
            return
        copy = self.copies.get(name)
        if copy is None:
            copy = self.copies[name] = _HostCopy(self._params(name), pin=self._pin())
            copy.store()
        elif self.versions.get(name) != [version(p) for p in copy.params]:
            copy.store()
        copy.point_home()
        del self.lru[name]
        self.versions.pop(name, None)
        release_slot(self.state, name)

    def _make_room(self, keep: list[str], incoming: int) -> None:
        if self.max_resident is None:
            return
        while len(self.lru) + incoming > self.max_resident:
            victim = next((n for n in self.lru if n not in keep), None)
            if victim is None:
                break
            self.evict(victim)

    def _bring_in(self, name: str) -> None:
        """One asynchronous copy per dtype from pinned memory; the parameters become views of it."""
        copy = self.copies[name]
        flats = {dt: f.to(self.device, non_blocking=True, copy=True) for dt, f in copy.flats.items()}
        for p, view in copy.views(flats):
            if p.grad is not None:
                p.grad = p.grad.to(self.device)
            p.data = view
        self.lru[name] = None
        self.versions[name] = [version(p) for p in copy.params]

    def _params(self, name: str) -> list[nn.Parameter]:
        from .adapters import adapter_parameters
        model = self._model()
        if model is None:
            raise LoraError("adapter cache: the model was garbage-collected")
        return list(adapter_parameters(model, name))

    def _pin(self) -> bool:
        return host_pinned()

    # -- loading hook -------------------------------------------------------------------
    def register_on_host(self, name: str) -> None:
        """Move a just-added adapter to (pinned) host memory."""
        self._sync()
        self.evict(name)

    def add_on_host(self, name: str, pairs: list[tuple[nn.Parameter, Optional[Tensor]]], runs: list[Tensor]) -> None:
        """Register a just-added adapter as not resident, its values (``pairs``: parameter, loaded
        value or None to keep the parameter's) in host memory; the parameters point there. The
        device copies of the parameters are never written (``load_adapter(..., device="cpu")``)."""
        copy = _HostCopy.from_values(pairs, runs, pin=self._pin())
        copy.point_home()
        self.copies[name] = copy
        self._sync()
        self.lru.pop(name, None)
        self.versions.pop(name, None)
        release_slot(self.state, name)


def _check_max(max_resident) -> Optional[int]:
    if max_resident is not None and (isinstance(max_resident, bool) or not isinstance(max_resident, int)
                                     or max_resident < 1):
        raise LoraError(f"max_resident must be an integer >= 1 or None, got {max_resident!r}")
    return max_resident


def cache_of(state: LoraState) -> Optional[AdapterCache]:
    """The cache attached to a model's state, or None."""
    return _CACHES.get(state)


def _model_device(model: nn.Module) -> torch.device:
    from .inject import lora_layers
    for _, layer in lora_layers(model):
        return layer.base.weight.device
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def adapter_cache(model: nn.Module, max_resident: Optional[int] = None,
                  device: Union[str, torch.device, None] = None) -> AdapterCache:
    """The model's adapter cache, created on first call. ``max_resident``: at most that many
    adapters on ``device`` (default: where the base weights are); the least recently used
    move to pinned host memory. Calling again with ``max_resident`` changes the limit."""
    from .adapters import _state
    st = _state(model)
    cache = _CACHES.get(st)
    if cache is None:
        cache = _CACHES[st] = AdapterCache(model, st, device or _model_device(model), max_resident)
        cache.set_max_resident(max_resident)
    elif max_resident is not None:
        cache.set_max_resident(max_resident)
    return cache


def check_load_device(model: nn.Module, device) -> None:
    """load_adapter's check, before any change: ``device`` is None, "cpu", or the model's device."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LoraError(f"load_adapter(device={device!r}): not a device ({e})") from None
    if dev.type == "cpu":
        return
    target = _model_device(model)
    if dev.type != target.type or (dev.index is not None and dev.index != target.index):
        raise LoraError(f"load_adapter(device={str(dev)!r}): the model's weights are on {target}; pass "
                        "device='cpu' to keep the adapter in host memory, or leave device=None")


def is_host(device) -> bool:
    """Whether load_adapter's ``device`` asks for host memory (the adapter cache)."""
    return device is not None and torch.device(device).type == "cpu"


def host_pinned() -> bool:
    """Whether host copies are pinned (when there is a GPU to copy them to)."""
    return torch.cuda.is_available()


def release_deleted(model: nn.Module) -> None:
    """Free the host copies of adapters deleted since the cache last looked (their pinned memory
    goes back to torch's pinned-memory pool, so a load that follows a delete reuses it)."""
    from .inject import find_state
    st = find_state(model)
    cache = _CACHES.get(st) if st is not None else None
    if cache is not None:
        cache._sync()


def place_loaded_adapter(model: nn.Module, name: str, device, pairs: list[tuple[nn.Parameter, Optional[Tensor]]],
                         runs: list[Tensor]) -> bool:
    """load_adapter's hook, after the adapter was added: with ``device="cpu"``, put the loaded
    values (``pairs``: parameter, value or None) in (pinned) host memory, register the adapter,
    non-resident, with the model's adapter cache and return True; else return False (the
    caller copies the values into the parameters)."""
    if not is_host(device):
        return False
    adapter_cache(model).add_on_host(name, pairs, runs)
    return True
