"""Saving and loading adapters in PEFT's on-disk layout.

A folder holds two files:

* ``adapter_config.json``: PEFT's LoraConfig fields (peft_type "LORA", r, lora_alpha,
  target_modules listing the adapted modules, rank_pattern, alpha_pattern, ...);
* ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` (r, k)
  and ``.lora_B.weight`` (d, r); for embeddings ``.lora_embedding_A`` (r, num_embeddings)
  and ``.lora_embedding_B`` (dim, r); for modules_to_save ``<module path>.<param>``.

Loading validates everything before touching the model: the config's values and types,
the safetensors header (lorakit.tensorfile: sizes, dtypes, shapes, offsets) before any
tensor is read, every key against the model and the config (lorakit.checks: ranks of A and
B, orphans, missing and unexpected keys), finite values, and the base-model fingerprint
(lorakit.fingerprint). A load that fails leaves the model exactly as it was and registers
no adapter name. Pickle files are refused, never unpickled; files are never read through a
symlink that leads out of the adapter folder.

Saving builds the whole folder beside the old one and swaps it in (lorakit.atomic): after a
crash at any moment the path holds the complete old adapter or the complete new one.
docs/files.md lists every guarantee.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .atomic import atomic_save_folder, atomic_write_bytes, write_new_file  # noqa: F401 (atomic_write_bytes re-exported)
from .checks import PREFIX, Expected, check_header, check_values, config_regex_problems, finite_keys, strip
from .config import LoraConfig
from .errors import AdapterExists, AdapterFormatError, ConfigError, LoraError, MergedStateError, preview
from .fingerprint import base_fingerprint, check_base, encode
from .inject import add_adapter, check_adapter_name, find_state, lora_layers, saved_modules, walk
from .layers import LoraLinear
from .locate import CONFIG_NAME, WEIGHTS_NAME, find_adapter_files, open_adapter  # noqa: F401 (re-exported)
from .tensorfile import Header, open_regular, read_buffer, read_file, read_header, serialize, split_buffer

MAX_CONFIG_BYTES = 16 * 2**20

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
def adapter_file_bytes(model: nn.Module, name: Optional[str] = None,
                       base_model_name_or_path: Optional[str] = None) -> dict[str, bytes]:
    """{file name: content} of adapter ``name`` (default: the active one) in PEFT's layout, built
    in memory, byte-for-byte deterministic. The weights' metadata records the base-model
    fingerprint (lorakit.fingerprint). Non-finite weights are refused: a file lorakit writes
    always loads."""
    from .adapters import get_config
    cfg = get_config(model, name)
    adapter = cfg_name(model, name)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model, adapter).items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise LoraError(f"adapter {adapter!r}: refusing to save non-finite weights (NaN or Inf) in "
                        f"{preview(bad, 10)}; nothing was written")
    if base_model_name_or_path is None:
        base_model_name_or_path = cfg.base_model_name_or_path or _name_or_path(model)
    layers = [(path, layer) for path, layer in lora_layers(model) if adapter in layer.adapters]
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in layers if isinstance(layer, LoraLinear))
    config = cfg.replace(base_model_name_or_path=base_model_name_or_path).to_peft_dict(
        cfg.target_modules, fan_in_fan_out=fan_in_fan_out)
    metadata = {"format": "pt", "saved_by": "lorakit", **encode(base_fingerprint(model, [p for p, _ in layers]))}
    return {WEIGHTS_NAME: serialize(tensors, metadata),
            CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}


def write_adapter_files(model: nn.Module, folder: PathLike, name: Optional[str] = None,
                        base_model_name_or_path: Optional[str] = None) -> None:
    """Write adapter ``name``'s two files into ``folder``, a fresh folder being built (for instance
    by ``lorakit.atomic.atomic_save_folder``'s writer, for a checkpoint); each file is fsync'ed."""
    for fname, data in adapter_file_bytes(model, name, base_model_name_or_path).items():
        write_new_file(Path(folder) / fname, data)


def save_adapter(model: nn.Module, path: PathLike, name: Optional[str] = None,
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Save adapter ``name`` (default: the active one) to folder ``path`` in PEFT's layout.

    Works while merged (A and B are kept). Crash-safe: the new folder is built beside ``path``
    and swapped in, so ``path`` always holds the complete old or the complete new adapter;
    other files in ``path`` (a README, other adapters' subfolders) are kept. A full disk or a
    read-only folder raises lorakit.atomic.FileWriteError and leaves the old files as they
    were. Returns the folder's Path.
    """
    files = adapter_file_bytes(model, name, base_model_name_or_path)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AdapterFormatError(f"{folder}: exists and is not a folder; save_adapter writes a folder "
                                 f"({CONFIG_NAME} + {WEIGHTS_NAME})")

    def writer(tmp: Path) -> None:
        for fname, data in files.items():
            write_new_file(tmp / fname, data)

    atomic_save_folder(folder, writer)
    return folder


def cfg_name(model: nn.Module, name: Optional[str]) -> str:
    """``name``, or the active adapter's name when None."""
    from .adapters import active_adapter
    return active_adapter(model) if name is None else name


def _name_or_path(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    value = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return value or None


# ------------------------------------------------------------------------------ reading
def _read_all(fd: int, limit: int, source) -> bytes:
    chunks, total = [], 0
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise ConfigError(f"{source}: larger than {limit} bytes; an adapter config is a few kilobytes")
        chunks.append(chunk)


def parse_config(raw: bytes, source) -> LoraConfig:
    """A LoraConfig from adapter_config.json bytes; every problem is a LoraError naming ``source``."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterFormatError(f"{source}: cannot read the adapter config: {e}") from None
    if isinstance(data, dict):
        for key in ("task_type", "base_model_name_or_path"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ConfigError(f"{source}: {key} must be a string or null, got {data[key]!r}")
        risky = config_regex_problems(data)
        if risky:
            raise ConfigError(f"{source}: " + "; ".join(risky))
    try:
        return LoraConfig.from_peft_dict(data, source=str(source))
    except LoraError:
        raise
    except Exception as e:          # a value of a type config.py did not foresee
        raise ConfigError(f"{source}: invalid adapter config ({type(e).__name__}: {e})") from None


def read_config(path: PathLike) -> LoraConfig:
    """The LoraConfig of an adapter_config.json file."""
    with open_regular(path, "cannot read the adapter config") as fd:
        return parse_config(_read_all(fd, MAX_CONFIG_BYTES, path), path)


def read_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU, after checking its header (lorakit.tensorfile);
    a malformed file is an AdapterFormatError."""
    return read_file(path)[1]


def read_metadata(path: PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (where the base fingerprint lives); reads the header only."""
    with open_regular(path) as fd:
        return read_header(fd, path).metadata


# ------------------------------------------------------------------------------ loading
def load_adapter(model: nn.Module, path: PathLike, name: Optional[str] = None, trainable: bool = False,
                 strict: bool = True, dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device, None] = None, strict_base: bool = False) -> str:
    """Add the adapter saved at ``path`` (PEFT layout) to ``model`` under ``name``; returns the name.

    LoRA layers are injected where needed. The first adapter on a model becomes active;
    later ones do not (use set_adapter). Loaded adapters are frozen unless ``trainable``.
    Everything is validated first: on any error the model is unchanged and ``name`` is not
    registered. ``strict=False`` tolerates missing and unexpected keys. An adapter saved on a
    different base model (lorakit.fingerprint) warns, or raises BaseModelMismatch with
    ``strict_base=True``. ``device="cpu"`` keeps the weights in pinned host memory,
    registered with the model's adapter cache (lorakit.cache): a per-row batch naming the
    adapter brings it in.
    """
    name = "default" if name is None else name
    check_adapter_name(name)
    state = find_state(model)
    if state is not None and name in state.configs:
        raise AdapterExists(f"adapter {name!r} already exists on this model ({list(state.configs)}); "
                            "pass another name=, or delete_adapter first")
    if state is not None and state.merged is not None:
        raise MergedStateError(f"adapter {state.merged!r} is merged; unmerge(model) before loading adapters")
    from .cache import check_load_device, host_pinned, is_host, release_deleted   # device="cpu" (issue 6)
    check_load_device(model, device)
    release_deleted(model)
    pin = host_pinned() if is_host(device) else None
    loaded = _read_checked(model, path, name, strict, dtype, strict_base, pin)

    def fill(m: nn.Module) -> None:        # inside add_adapter's all-or-nothing: a failure rolls back
        _fill(m, name, loaded, device)

    add_adapter(model, loaded.cfg, name, loaded.exp.paths, loaded.exp.saved_paths, trainable, fill=fill,
                initialize=not strict)     # strict: every value is copied in, no random init to overwrite
    return name


@dataclass
class _Loaded:
    """A checked adapter file: its config, what it fits (checks.Expected), the data section as
    one uint8 buffer and its header, the tensors to copy in (views of the buffer) and their keys
    in the file, both keyed ``<module path>.<key>`` (without PEFT's prefix), and the buffer's
    dtype runs (flat views)."""

    cfg: LoraConfig
    exp: Expected
    buf: torch.Tensor
    header: Header
    by_path: dict[str, torch.Tensor]
    keys: dict[str, str]
    runs: list[torch.Tensor]


def _read_checked(model: nn.Module, path: PathLike, name: str, strict: bool, dtype: Optional[torch.dtype],
                  strict_base: bool, pin: Optional[bool] = None) -> _Loaded:
    """Read and check everything; the model is not touched. The data lands in pinned memory when
    ``pin``, or (``pin=None``) when the adapter goes to a GPU: one asynchronous copy takes it there."""
    files = open_adapter(path, name)
    source = str(files.weights)
    try:
        cfg = parse_config(_read_all(files.config_fd, MAX_CONFIG_BYTES, files.config), files.config)
        if dtype is not None:
            cfg = cfg.replace(adapter_dtype=str(dtype).removeprefix("torch."))
        header = read_header(files.weights_fd, source)
        exp = check_header(model, cfg, header.entries, source, strict)
        check_base(model, header.metadata, source, strict_base, stacklevel=4)
        if pin is None:
            pin = any(d.type == "cuda" for d in exp.devices)
        buf = read_buffer(files.weights_fd, header, source, pin=pin and torch.cuda.is_available())
        tensors, runs = split_buffer(buf, header)
        by_path = check_values(exp, tensors, source, model, finite=finite_keys(exp, runs))
        keys = {k: key for key in header.entries if (k := strip(key)) in by_path}
        return _Loaded(cfg, exp, buf, header, by_path, keys, [flat for flat, _ in runs])
    except LoraError as e:
        if str(files.folder) in str(e):
            raise
        raise type(e)(f"{files.config}: {e}") from None          # e.g. TargetNotFound: name the file too
    except Exception as e:              # whatever a malformed file provokes, it stays a LoraError
        raise AdapterFormatError(f"{source}: cannot load ({type(e).__name__}: {e})") from e
    finally:
        files.close()


@torch.no_grad()
def _fill(model: nn.Module, name: str, loaded: _Loaded, device) -> None:
    """Copy the validated tensors into adapter ``name``: into its parameters, or with
    ``device="cpu"`` into the adapter cache's host memory (lorakit.cache). Keys absent with
    strict=False keep their init (B = 0, so such a layer adds nothing)."""
    from .cache import place_loaded_adapter
    pairs = _pairs(model, name, loaded)
    if place_loaded_adapter(model, name, device, [(p, k and loaded.by_path[k]) for p, k in pairs], loaded.runs):
        return
    pairs = [(p, k) for p, k in pairs if k is not None]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], _sources(pairs, loaded))


def _pairs(model: nn.Module, name: str, loaded: _Loaded) -> list[tuple[nn.Parameter, Optional[str]]]:
    """(parameter of adapter ``name``, the key of its loaded value or None), every parameter once."""
    modules = dict(walk(model))
    has, pairs = loaded.by_path.__contains__, []
    for path in loaded.exp.paths:
        layer = modules[path]
        a = layer.adapters[name]
        for p, k in ((a.lora_A, f"{path}.{layer.peft_a_key}"), (a.lora_B, f"{path}.{layer.peft_b_key}")):
            pairs.append((p, k if has(k) else None))
    for path in loaded.exp.saved_paths:
        for pname, p in modules[path].copies[name].named_parameters():
            pairs.append((p, f"{path}.{pname}" if has(f"{path}.{pname}") else None))
    return pairs


def _sources(pairs: list[tuple[nn.Parameter, str]], loaded: _Loaded) -> list[torch.Tensor]:
    """The loaded values on their destinations' device. When every destination is on one GPU and
    the adapter is most of the file, the whole data section goes over in one asynchronous copy
    (from pinned memory) and the sources are views of it; otherwise one copy each."""
    srcs = [loaded.by_path[k] for _, k in pairs]
    devices = {p.device for p, _ in pairs}
    dev = devices.pop() if len(devices) == 1 else None
    if dev is None or dev.type == "cpu":
        return srcs                                   # _foreach_copy_ moves them (any device, any dtype)
    if 2 * sum(t.numel() * t.element_size() for t in srcs) < loaded.buf.numel():
        return [t.to(dev, non_blocking=t.is_pinned()) for t in srcs]
    on_dev = split_buffer(loaded.buf.to(dev, non_blocking=loaded.buf.is_pinned()), loaded.header)[0]
    return [on_dev[loaded.keys[k]] for _, k in pairs]
