"""Finding target modules, injecting LoRA layers, freezing, and unloading back to plain torch.

Matching follows PEFT exactly, so a config means the same thing in both libraries:

* ``target_modules`` as a list: a module path matches when it equals an entry or ends
  with ``"." + entry`` ("q_proj" matches "model.layers.0.self_attn.q_proj");
* as a string: ``re.fullmatch(pattern, path)``;
* ``"all-linear"``: every nn.Linear and GPT-2 Conv1D except the output head
  (``model.get_output_embeddings()`` when the model has one, else the ``score`` /
  ``classifier`` head when ``task_type="SEQ_CLS"``); an ``out_proj`` owned by
  nn.MultiheadAttention is skipped (its parent reads the weight directly);
* ``exclude_modules``: the same rules, applied first; modules in ``modules_to_save``
  (and everything inside them) are never adapted.

Everything is validated before the model changes: a call that raises leaves the model's
modules, parameters and registered adapter names exactly as they were.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

from torch import nn

from . import fused, grouped
from .config import LoraConfig
from .errors import AdapterExists, ConfigError, LoraError, MergedStateError, TargetNotFound, UnsupportedModule, preview
from .layers import LoraLayer, LoraLinear, LoraState, SavedModule, supported_base, unsupported_reason

# Well-known target names used when target_modules is None (attention query and value, as in the paper).
DEFAULT_TARGETS = (["q_proj", "v_proj"], ["c_attn"], ["query", "value"], ["q", "v"], ["query_key_value"])

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")


def check_adapter_name(name: str) -> None:
    """Adapter names are safe identifiers: letters, digits, '_' and '-', at most 64 characters."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-' "
                          "(starting with a letter, digit or '_')")


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module, seeing a LoRA / saved wrapper as its base module's slot
    (their internals are not walked)."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not isinstance(child, (LoraLayer, SavedModule)):
            yield from walk(child, path)


def base_of(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, (LoraLayer, SavedModule)) else module


def _matches(patterns, path: str) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return path in patterns or any(path.endswith("." + p) for p in patterns)


SEQ_CLS_HEAD_NAMES = ("score", "classifier")   # PEFT's convention for classification heads


def _output_head_paths(model: nn.Module, task_type=None) -> set[str]:
    """Paths of the output head that "all-linear" leaves alone (PEFT's rule)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, n, None),
                                                                               nn.Module)), None)
    if head is None:
        return set()
    return {path for path, m in walk(model) if base_of(m) is head or m is head}


def _in_saved(saved: list[str], path: str) -> bool:
    """PEFT's rule: a module inside (or equal to) a modules_to_save entry is never adapted."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in saved)


def _why_not(model: nn.Module, path: str, module: nn.Module) -> Optional[str]:
    """Why the module at ``path`` cannot get a LoRA layer, or None when it can."""
    if isinstance(module, SavedModule):
        return "it is in modules_to_save of an adapter already on the model"
    base = base_of(module)
    if supported_base(base) is None:
        return "unsupported type"
    parent, _ = get_submodule_parent(model, path)
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads this weight directly, so a LoRA layer would never run"
    return unsupported_reason(base)


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Paths of the modules ``cfg`` adapts in ``model``, in model order. Raises when none match
    or when a pattern matches a module lorakit cannot adapt (all such modules in one message)."""
    targets = cfg.target_modules if cfg.target_modules is not None else _default_targets(model)
    saved = cfg.modules_to_save or []
    all_linear = targets == "all-linear"
    heads = _output_head_paths(model, cfg.task_type) if all_linear else set()
    found, unsupported = [], []
    for path, module in walk(model):
        base = base_of(module)
        if _matches(cfg.exclude_modules, path) or _in_saved(saved, path):
            continue
        if all_linear:
            if supported_base(base) is LoraLinear and path not in heads and _why_not(model, path, module) is None:
                found.append(path)
            continue
        if _matches(targets, path):
            reason = _why_not(model, path, module)
            if reason is None:
                found.append(path)
            else:
                unsupported.append(f"{path} ({type(base).__name__}: {reason})")
    if unsupported:
        raise UnsupportedModule(
            f"target_modules {targets!r} matched modules lorakit cannot adapt: " + "; ".join(unsupported)
            + ". Supported types: nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d (groups=1, zero padding), "
            "transformers Conv1D; narrow target_modules or add these to exclude_modules.")
    if not found:
        leaf_names = sorted({p.rsplit(".", 1)[-1] for p, m in walk(model) if supported_base(base_of(m))})
        hint = (" lorakit adapts the submodules of the model it is given; to adapt a single layer, put it in a "
                "container first, e.g. nn.Sequential(layer)." if supported_base(model) else "")
        raise TargetNotFound(
            f"target_modules {targets!r} matched no module of {type(model).__name__}"
            + (f" (exclude_modules={cfg.exclude_modules!r})" if cfg.exclude_modules else "")
            + f". Adaptable module names in this model: {preview(leaf_names, 20)}." + hint)
    return found


def _default_targets(model: nn.Module) -> list[str]:
    leaves = {p.rsplit(".", 1)[-1] for p, _ in walk(model)}
    for names in DEFAULT_TARGETS:
        if all(n in leaves for n in names):
            return names
    raise ConfigError("target_modules is not set and this model has none of the well-known attention "
                      f"projections {[n for names in DEFAULT_TARGETS for n in names]}; set target_modules, "
                      "e.g. ['q_proj', 'v_proj'] or 'all-linear'")


def compact_targets(model: nn.Module, paths: list[str]) -> list[str]:
    """The shortest target_modules list that selects exactly ``paths``: leaf names when they
    select no other module of any type, otherwise the full paths (what a saved config records)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = [p for p, _ in walk(model) if _matches(leaves, p)]
    return leaves if sorted(selected) == sorted(paths) else sorted(paths)


def get_submodule_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), leaf


def find_state(model: nn.Module) -> Optional[LoraState]:
    """The LoraState shared by the model's LoRA layers, or None for a model without any."""
    st = model.__dict__.get("_lorakit_state")
    if st is not None:
        return st
    if isinstance(model, (LoraLayer, SavedModule)):
        return model.state
    for m in model.modules():
        if isinstance(m, (LoraLayer, SavedModule)):
            return m.state
    return None


def ensure_state(model: nn.Module) -> LoraState:
    st = find_state(model)
    if st is None:
        st = LoraState()
    model.__dict__["_lorakit_state"] = st
    return st


def wrap(model: nn.Module, path: str, state: LoraState) -> LoraLayer:
    """Replace the module at ``path`` with its LoRA layer (or return the existing one)."""
    parent, leaf = get_submodule_parent(model, path)
    module = getattr(parent, leaf)
    if isinstance(module, LoraLayer):
        return module
    cls = supported_base(module)
    if cls is None:
        raise UnsupportedModule(f"{path}: cannot adapt a {type(module).__name__}")
    layer = cls(module, state)
    layer.train(module.training)        # an eval-mode model stays in eval mode (no adapter dropout)
    setattr(parent, leaf, layer)
    return layer


def wrap_saved(model: nn.Module, path: str, state: LoraState) -> SavedModule:
    parent, leaf = get_submodule_parent(model, path)
    module = getattr(parent, leaf)
    if isinstance(module, SavedModule):
        return module
    if isinstance(module, LoraLayer):
        raise ConfigError(f"{path} is LoRA-adapted already and cannot also be in modules_to_save")
    wrapped = SavedModule(module, state)
    setattr(parent, leaf, wrapped)
    return wrapped


def resolve_saved(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Paths of the modules_to_save in ``model`` (matched exactly or as a dotted suffix, outermost
    matches only). Raises when an entry matches nothing or a match holds LoRA layers."""
    if not cfg.modules_to_save:
        return []
    found = [p for p, _ in walk(model) if _matches(cfg.modules_to_save, p)]
    missing = [m for m in cfg.modules_to_save if not any(p == m or p.endswith("." + m) for p in found)]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in walk(model)})
        raise TargetNotFound(f"modules_to_save {missing} matched no module of {type(model).__name__}; "
                             f"module names in this model: {preview(names, 20)}")
    found = [p for p in found if not any(p.startswith(q + ".") for q in found if q != p)]
    clashes = [p for p in found for q, m in walk(model)
               if isinstance(m, LoraLayer) and (q == p or q.startswith(p + "."))]
    if clashes:
        raise ConfigError(f"modules_to_save {sorted(set(clashes))} hold LoRA layers of adapters already on the "
                          "model; a module cannot be both LoRA-adapted and saved in full")
    return found


def _torch_dtype(name: str):
    import torch
    return None if name == "auto" else getattr(torch, name)


def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add a LoRA adapter ``name`` to every module ``config`` targets, in place; returns ``model``.

    Every base parameter is frozen; the new adapter's A and B (and modules_to_save copies)
    are trainable. The first adapter on a model becomes active; later ones do not (use
    set_adapter). Right after inject, outputs equal the base model's exactly (B = 0).
    """
    check_adapter_name(name)
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    state = find_state(model)
    if state is not None and name in state.configs:
        raise AdapterExists(f"adapter {name!r} already exists on this model; adapters: {list(state.configs)}")
    if state is not None and state.merged is not None:
        raise MergedStateError(f"adapter {state.merged!r} is merged; unmerge(model) before adding adapters")
    paths = resolve_targets(model, config)          # validates before any change
    saved = resolve_saved(model, config)
    add_adapter(model, config, name, paths, saved, trainable=True)
    return model


def add_adapter(model: nn.Module, config: LoraConfig, name: str, paths: list[str], saved: list[str],
                trainable: bool, fill=None, initialize: bool = True) -> None:
    """Add adapter ``name`` to the (validated) ``paths`` and ``saved`` modules, all or nothing.

    Wraps modules as needed, lets ``fill(model)`` copy loaded values in, freezes every base
    parameter and registers the name (the first adapter becomes active). If anything raises,
    the model's modules, the state and every requires_grad flag are restored before re-raising.
    """
    before = dict(walk(model))
    had_state = find_state(model)
    state = ensure_state(model)
    active_before = state.active
    base_params = list(base_parameters(model))
    grads = [p.requires_grad for p in base_params]
    try:
        add_adapter_layers(model, state, config, name, paths, saved, trainable, initialize)
        if fill is not None:
            fill(model)
        freeze_base(model)
    except BaseException:
        _rollback(model, name, before, state, active_before, had_state)
        for p, flag in zip(base_params, grads):
            p.requires_grad_(flag)
        raise
    fused.attach(model)     # gated MLPs whose three projections now carry LoRA run as one node
    grouped.attach(model)   # so do q, k and v (when the model calls them on one input)


def _rollback(model: nn.Module, name: str, before: dict, state: LoraState, active_before, had_state) -> None:
    """Undo a half-done add_adapter: drop ``name`` everywhere and put back unwrapped modules."""
    for path, m in list(walk(model)):
        if isinstance(m, LoraLayer) and name in m.adapters:
            del m.adapters[name]
        if isinstance(m, SavedModule) and name in m.copies:
            del m.copies[name]
        if isinstance(m, (LoraLayer, SavedModule)) and path in before and before[path] is not m:
            parent, leaf = get_submodule_parent(model, path)
            setattr(parent, leaf, before[path])
    state.configs.pop(name, None)
    state.active = active_before
    if had_state is None:
        model.__dict__.pop("_lorakit_state", None)


def add_adapter_layers(model: nn.Module, state: LoraState, config: LoraConfig, name: str, paths: list[str],
                       saved: list[str], trainable: bool, initialize: bool = True) -> None:
    """Wrap ``paths`` as needed and add adapter ``name`` to each; register it in the state.
    ``initialize=False`` skips the random init (every value is about to be copied in).
    Not transactional on its own: call it through add_adapter."""
    dtype = _torch_dtype(config.adapter_dtype)
    for path in paths:
        layer = wrap(model, path, state)
        adapter = layer.add_adapter(name, config.rank_for(path), config.alpha_for(path), config.scale_for(path),
                                    config.dropout, config.init if initialize else None, dtype)
        adapter.train(layer.training)
        adapter.requires_grad_(trainable)
    for path in saved:
        copy = wrap_saved(model, path, state).add_copy(name)
        copy.requires_grad_(trainable)
    state.configs[name] = config.replace(target_modules=compact_targets(model, paths))
    if state.active is None:
        state.active = name


def base_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every parameter that is not a LoRA adapter's (or a saved copy's), without visiting
    the adapters: the cost does not grow with the number of adapters loaded."""
    for m in [model] + [m for _, m in walk(model)]:
        if isinstance(m, (LoraLayer, SavedModule)):
            yield from m.base.parameters()
        else:
            yield from m.parameters(recurse=False)


def freeze_base(model: nn.Module) -> None:
    """requires_grad = False for every parameter that is not a LoRA adapter's (or a saved copy's)."""
    for p in base_parameters(model):
        p.requires_grad_(False)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, m in walk(model):
        if isinstance(m, LoraLayer):
            yield path, m


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for path, m in walk(model):
        if isinstance(m, SavedModule):
            yield path, m


def unwrap_all(model: nn.Module, keep=None) -> nn.Module:
    """Replace every LoRA layer by its base module and every saved wrapper by ``keep(wrapper)``
    (default: the original). Removes the model's lorakit state."""
    fused.detach(model)
    grouped.detach(model)
    for path, m in list(walk(model)):
        if isinstance(m, LoraLayer):
            parent, leaf = get_submodule_parent(model, path)
            setattr(parent, leaf, m.base)
        elif isinstance(m, SavedModule):
            parent, leaf = get_submodule_parent(model, path)
            setattr(parent, leaf, keep(m) if keep else m.base)
    model.__dict__.pop("_lorakit_state", None)
    if isinstance(model, (LoraLayer, SavedModule)):
        raise LoraError("unload() needs the model that contains the LoRA layers, not a LoRA layer itself")
    return model
