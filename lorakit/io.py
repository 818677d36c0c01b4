"""Saving and loading adapters in PEFT's on-disk layout.

A folder holds two files:

* ``adapter_config.json``: PEFT's LoraConfig fields (peft_type "LORA", r, lora_alpha,
  target_modules listing the adapted modules, rank_pattern, alpha_pattern, ...);
* ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` (r, k)
  and ``.lora_B.weight`` (d, r); for embeddings ``.lora_embedding_A`` (r, num_embeddings)
  and ``.lora_embedding_B`` (dim, r); for modules_to_save ``<module path>.<param>``.

Loading validates everything (config values, every key, every shape, finite values)
before touching the model: a load that fails leaves the model exactly as it was and
registers no adapter name. Pickle files are refused, never unpickled. Files are written to
a temporary file in the same folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterExists, AdapterFormatError, MergedStateError, ShapeMismatch, preview
from .inject import (add_adapter, base_of, check_adapter_name, find_state, lora_layers, resolve_saved,
                     resolve_targets, saved_modules)
from .layers import LoraLinear, adapter_shapes, supported_base

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------ state dict
def lora_state_dict(model: nn.Module, name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Adapter ``name`` (default: the active one) as {PEFT key: tensor} (detached, not copied)."""
    from .adapters import _check_name, _state
    st = _state(model)
    name = st.active if name is None else name
    _check_name(st, name)
    sd: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name in layer.adapters:
            a = layer.adapters[name]
            sd[f"{PREFIX}{path}.{layer.peft_a_key}"] = a.lora_A.detach()
            sd[f"{PREFIX}{path}.{layer.peft_b_key}"] = a.lora_B.detach()
    for path, saved in saved_modules(model):
        if name in saved.copies:
            for pname, p in saved.copies[name].named_parameters():
                sd[f"{PREFIX}{path}.{pname}"] = p.detach()
    return sd


# ------------------------------------------------------------------------------ saving
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename.

    A reader sees the old file or the new one, never a half-written one. The file gets the
    usual permissions (rw-r--r--), not mkstemp's owner-only ones.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_adapter(model: nn.Module, path: PathLike, name: Optional[str] = None,
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Save adapter ``name`` (default: the active one) to folder ``path`` in PEFT's layout.

    Works while merged (A and B are kept). Returns the folder's Path.
    """
    from safetensors.torch import save as st_save
    from .adapters import get_config
    cfg = get_config(model, name)
    sd = lora_state_dict(model, name)
    if base_model_name_or_path is None:
        base_model_name_or_path = cfg.base_model_name_or_path or _name_or_path(model)
    adapter = cfg_name(model, name)
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in lora_layers(model)
                         if isinstance(layer, LoraLinear) and adapter in layer.adapters)
    config = cfg.replace(base_model_name_or_path=base_model_name_or_path).to_peft_dict(
        cfg.target_modules, fan_in_fan_out=fan_in_fan_out)
    tensors = {k: v.contiguous().cpu() for k, v in sd.items()}
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AdapterFormatError(f"{folder}: exists and is not a folder; save_adapter writes a folder "
                                 f"({CONFIG_NAME} + {WEIGHTS_NAME})")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS_NAME, st_save(tensors, metadata={"format": "pt", "saved_by": "lorakit"}))
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


def cfg_name(model: nn.Module, name: Optional[str]) -> str:
    """``name``, or the active adapter's name when None."""
    from .adapters import active_adapter
    return active_adapter(model) if name is None else name


def _name_or_path(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    value = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return value or None


# ------------------------------------------------------------------------------ loading
def find_adapter_files(path: PathLike, name: Optional[str] = None) -> tuple[Path, Path]:
    """(config file, weights file) for an adapter folder, refusing pickle files.

    ``path`` may be the folder, its safetensors file, or a folder whose subfolder ``name``
    holds the adapter (PEFT saves non-default adapters so). When ``path/name`` holds an
    adapter it wins over one directly in ``path`` (PEFT's multi-adapter layout puts the
    default adapter at the top); pass the top-level file's path to load that one instead.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
            raise AdapterFormatError(_pickle_message(p))
        folder = p.parent
        weights = p
    else:
        if not p.exists():
            raise AdapterFormatError(f"{p}: no such adapter folder")
        folder = p
        if name and (p / name / CONFIG_NAME).exists():
            folder = p / name
        weights = folder / WEIGHTS_NAME
    config = folder / CONFIG_NAME
    if not weights.exists():
        pickles = [folder / n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickles:
            raise AdapterFormatError(_pickle_message(pickles[0]))
        subs = sorted(c.parent.name for c in folder.glob(f"*/{CONFIG_NAME}"))
        hint = f"; subfolders with adapters: {subs} (pass name=...)" if subs else ""
        raise AdapterFormatError(f"{folder}: no {WEIGHTS_NAME}{hint}")
    if not config.exists():
        raise AdapterFormatError(f"{folder}: no {CONFIG_NAME} beside {weights.name}")
    return config, weights


def _pickle_message(p: Path) -> str:
    return (f"{p}: refusing to load a pickle file (unpickling can run arbitrary code). If you trust it, "
            "convert it once: `from safetensors.torch import save_file; save_file(torch.load(PATH, "
            "weights_only=True), 'adapter_model.safetensors')`")


def read_config(path: Path) -> LoraConfig:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path}: cannot read the adapter config: {e}") from None
    return LoraConfig.from_peft_dict(data, source=str(path))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU; a malformed file is an AdapterFormatError."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError / OSError kinds
        raise AdapterFormatError(f"{path}: not a readable safetensors file: {e}") from None


def _expected(model: nn.Module, cfg: LoraConfig) -> tuple[dict, dict, dict]:
    """What a file for ``cfg`` must contain on ``model``.

    Returns (lora, saved, optional): {key: (shape, path)}; ``optional`` are keys PEFT may add
    (a copy of an embedding's base weight) mapped to the model tensor they must equal.
    """
    lora, saved, optional = {}, {}, {}
    for path in resolve_targets(model, cfg):
        base = base_of(model.get_submodule(path))
        cls = supported_base(base)
        a_shape, b_shape = adapter_shapes(base, cfg.rank_for(path))
        lora[f"{path}.{cls.peft_a_key}"] = (tuple(a_shape), path)
        lora[f"{path}.{cls.peft_b_key}"] = (tuple(b_shape), path)
        for pname, p in base.named_parameters():
            optional[f"{path}.base_layer.{pname}"] = p
    for path in resolve_saved(model, cfg):
        for pname, p in base_of(model.get_submodule(path)).named_parameters():
            saved[f"{path}.{pname}"] = (tuple(p.shape), path)
    return lora, saved, optional


def validate(model: nn.Module, cfg: LoraConfig, tensors: dict[str, torch.Tensor], source: str,
             strict: bool = True) -> dict[str, torch.Tensor]:
    """Check ``tensors`` against what ``cfg`` needs on ``model``; return them keyed by model path.

    Every problem is collected and reported at once; nothing is changed.
    """
    lora, saved, optional = _expected(model, cfg)
    wanted = {**lora, **saved}
    by_path, unexpected, mismatched, bad_values = {}, [], [], []
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if k in optional:
            if not (t.shape == optional[k].shape and torch.equal(t.to(optional[k].device, optional[k].dtype),
                                                                 optional[k])):
                mismatched.append(f"{key}: a saved copy of the base weight that differs from this model's "
                                  "(was the vocabulary resized?)")
            continue
        if k not in wanted:
            unexpected.append(key)
            continue
        shape = wanted[k][0]
        if tuple(t.shape) != shape:
            mismatched.append(f"{key}: expected shape {list(shape)}, got {list(t.shape)}")
        elif not t.is_floating_point():
            bad_values.append(f"{key}: dtype {t.dtype} is not a floating-point type")
        elif not torch.isfinite(t).all():
            bad_values.append(f"{key}: contains NaN or Inf")
        by_path[k] = t
    missing = [PREFIX + k for k in wanted if k not in by_path and not any(m.startswith(PREFIX + k) for m in
                                                                         mismatched)]
    problems = []
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if bad_values:
        problems.append("bad values: " + "; ".join(bad_values))
    if strict and missing:
        problems.append(f"{len(missing)} missing keys: {preview(missing, 50)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (no adapted module of the model takes them): "
                        f"{preview(unexpected, 50)}")
    if problems:
        cls = ShapeMismatch if mismatched and not (bad_values or missing or unexpected) else AdapterFormatError
        raise cls(f"{source}: adapter does not fit {type(model).__name__}: " + " | ".join(problems))
    return by_path


def load_adapter(model: nn.Module, path: PathLike, name: Optional[str] = None, trainable: bool = False,
                 strict: bool = True, dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device, None] = None) -> str:
    """Add the adapter saved at ``path`` (PEFT layout) to ``model`` under ``name``; returns the name.

    LoRA layers are injected where needed. The first adapter on a model becomes active;
    later ones do not (use set_adapter). Loaded adapters are frozen unless ``trainable``.
    Everything is validated first: on any error the model is unchanged.
    ``device="cpu"`` keeps the weights in pinned host memory, registered with the model's
    adapter cache (lorakit.cache): a per-row batch naming the adapter brings it in.
    """
    name = "default" if name is None else name
    check_adapter_name(name)
    state = find_state(model)
    if state is not None and name in state.configs:
        raise AdapterExists(f"adapter {name!r} already exists on this model ({list(state.configs)}); "
                            "pass another name=, or delete_adapter first")
    if state is not None and state.merged is not None:
        raise MergedStateError(f"adapter {state.merged!r} is merged; unmerge(model) before loading adapters")
    config_file, weights_file = find_adapter_files(path, name)
    cfg = read_config(config_file)
    if dtype is not None:
        cfg = cfg.replace(adapter_dtype=str(dtype).removeprefix("torch."))
    tensors = read_tensors(weights_file)
    by_path = validate(model, cfg, tensors, str(weights_file), strict=strict)
    paths = resolve_targets(model, cfg)
    saved = resolve_saved(model, cfg)
    from .cache import check_load_device, place_loaded_adapter   # lorakit.cache: device="cpu" (issue 6)
    check_load_device(model, device)
    add_adapter(model, cfg, name, paths, saved, trainable, fill=lambda m: _fill(m, name, paths, saved, by_path))
    place_loaded_adapter(model, name, device)
    return name


@torch.no_grad()
def _fill(model: nn.Module, name: str, paths: list[str], saved: list[str], by_path: dict) -> None:
    """Copy validated tensors into adapter ``name`` (keys absent with strict=False keep their init:
    B = 0, so such a layer adds nothing)."""
    for path in paths:
        layer = model.get_submodule(path)
        a = layer.adapters[name]
        for param, key in ((a.lora_A, f"{path}.{layer.peft_a_key}"), (a.lora_B, f"{path}.{layer.peft_b_key}")):
            if key in by_path:
                param.copy_(by_path[key])
    for path in saved:
        for pname, p in model.get_submodule(path).copies[name].named_parameters():
            if f"{path}.{pname}" in by_path:
                p.copy_(by_path[f"{path}.{pname}"])
