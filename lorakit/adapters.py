"""Model-level verbs: list, switch, disable, delete, merge, unmerge, unload.

Switching is one attribute write on the model's shared ``LoraState``: no weight is copied,
no file is read, no layer is visited. Merging folds the active adapter into W0
(W0 += s B A) for zero added latency; unmerging subtracts it again.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from . import grouped
from .errors import AdapterNotFound, LoraError, MergedStateError
from .inject import find_state, get_submodule_parent, lora_layers, saved_modules, unwrap_all
from .layers import LoraState


def _state(model: nn.Module) -> LoraState:
    st = find_state(model)
    if st is None or not st.configs:
        raise AdapterNotFound(f"{type(model).__name__} has no LoRA adapters; call lorakit.inject or "
                              "lorakit.load_adapter first")
    return st


def _check_name(st: LoraState, name: str) -> None:
    if name not in st.configs:
        raise AdapterNotFound(f"no adapter named {name!r}; available adapters: {list(st.configs)}")


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added ([] when none)."""
    st = find_state(model)
    return list(st.configs) if st is not None else []


def active_adapter(model: nn.Module) -> Optional[str]:
    """Name of the active adapter (None when the model has none)."""
    st = find_state(model)
    return st.active if st is not None else None


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter: a pointer change, O(1) in the number of layers."""
    st = _state(model)
    _check_name(st, name)
    if st.merged is not None and st.merged != name:
        raise MergedStateError(f"adapter {st.merged!r} is merged into the base weights; "
                               "call lorakit.unmerge(model) before switching")
    st.active = name


def get_config(model: nn.Module, name: Optional[str] = None):
    """The LoraConfig of adapter ``name`` (default: the active one), with resolved target_modules."""
    st = _state(model)
    name = st.active if name is None else name
    _check_name(st, name)
    return st.configs[name]


def set_trainable(model: nn.Module, name: str, trainable: bool = True) -> None:
    """Make adapter ``name``'s parameters trainable (or frozen); other adapters are untouched."""
    st = _state(model)
    _check_name(st, name)
    for p in adapter_parameters(model, name):
        p.requires_grad_(trainable)


def adapter_parameters(model: nn.Module, name: Optional[str] = None) -> Iterator[nn.Parameter]:
    """The parameters of adapter ``name`` (default: the active one): each A, B and saved copy."""
    st = _state(model)
    name = st.active if name is None else name
    _check_name(st, name)
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            yield from layer.adapters[name].parameters()
    for _, saved in saved_modules(model):
        if name in saved.copies:
            yield from saved.copies[name].parameters()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer; a layer left with no adapter becomes its plain
    base module again (so deleting every adapter gives back the original module tree).
    Deleting the active adapter makes the first remaining one active (or none)."""
    st = _state(model)
    _check_name(st, name)
    if st.merged == name:
        raise MergedStateError(f"adapter {name!r} is merged; call lorakit.unmerge(model) before deleting it")
    if st.rows is not None:
        raise LoraError(f"cannot delete adapter {name!r} inside batch_adapters")
    for path, layer in list(lora_layers(model)):
        if name in layer.adapters:
            del layer.adapters[name]
        if len(layer.adapters) == 0 and layer.merged_name is None:
            _put_back(model, path, layer.base)
    for path, saved in list(saved_modules(model)):
        if name in saved.copies:
            del saved.copies[name]
        if len(saved.copies) == 0:
            _put_back(model, path, saved.base)
    del st.configs[name]
    if st.active == name:
        st.active = next(iter(st.configs), None)
    if not st.configs:
        model.__dict__.pop("_lorakit_state", None)
    grouped.attach(model)               # q/k/v groups of the layers that are left


def _put_back(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, leaf = get_submodule_parent(model, path)
    setattr(parent, leaf, module)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model computes exactly the base model (bit-identical outputs);
    the previous state comes back on exit, also when the block raises."""
    st = _state(model)
    if st.merged is not None:
        raise MergedStateError(f"adapter {st.merged!r} is merged into the base weights, so the base model "
                               "cannot be recovered exactly; call lorakit.unmerge(model) first")
    previous = st.disabled
    st.disabled = True
    try:
        yield model
    finally:
        st.disabled = previous


def merge(model: nn.Module, name: Optional[str] = None) -> None:
    """Fold adapter ``name`` (default: the active one) into the base weights: W0 += s B A.

    Afterwards the layers run the base path only (no added latency). Merging again while an
    adapter is merged is refused (never a silent double add); merge does not touch files,
    and saving while merged still saves the adapter's own A and B.
    """
    st = _state(model)
    name = st.active if name is None else name
    _check_name(st, name)
    if st.merged is not None:
        raise MergedStateError(f"adapter {st.merged!r} is already merged; call lorakit.unmerge(model) first")
    if st.rows is not None:
        raise MergedStateError("cannot merge inside batch_adapters")
    _refuse_tied(model, name)
    layers = [layer for _, layer in lora_layers(model)]
    done = []
    try:
        for layer in layers:
            layer.merge(name)
            done.append(layer)
    except BaseException:
        for layer in done:
            layer.unmerge()
        raise
    st.merged = name
    st.active = name


def _refuse_tied(model: nn.Module, name: str) -> None:
    """Merging into a weight shared with another module (GPT-2's wte and lm_head) would change
    that module too, so the merged model would compute something else: refuse, before any change."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    tied = []
    for path, layer in lora_layers(model):
        if name in layer.adapters and len(owners.get(id(layer.base.weight), ())) > 1:
            others = [n for n in owners[id(layer.base.weight)] if not n.startswith(path + ".")]
            tied.append(f"{path}.weight is tied to {', '.join(others)}")
    if tied:
        raise LoraError(f"cannot merge adapter {name!r}: " + "; ".join(tied) + ". Merging would change the "
                        "tied modules as well. Keep the adapter unmerged, or untie the weights first "
                        "(e.g. model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())).")


def unmerge(model: nn.Module) -> None:
    """Subtract the merged adapter from the base weights (W0 back within float rounding).
    A no-op when nothing is merged."""
    st = _state(model)
    for _, layer in lora_layers(model):
        layer.unmerge()
    st.merged = None


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every lorakit layer; returns the model made of plain torch modules again.

    With ``merge=True`` the active adapter is folded into the base weights first (and each
    modules_to_save module is replaced by the active adapter's copy); otherwise the model is
    the original base model again (an already merged adapter is unmerged first).
    """
    st = find_state(model)
    if st is None:
        raise LoraError(f"{type(model).__name__} has no lorakit layers to unload")
    if merge:
        if st.merged is None and st.active is not None:
            merge_adapter(model, st.active)
        active = st.active
        keep = (lambda s: s.copies[active] if active in s.copies else s.base)
    else:
        unmerge(model)
        keep = None
    for _, layer in lora_layers(model):
        layer.merged_name = None
    with torch.no_grad():
        unwrap_all(model, keep)
    return model


merge_adapter = merge  # an alias usable where an argument named ``merge`` shadows the function
