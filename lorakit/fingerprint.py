"""Base-model fingerprints: which base an adapter was trained on, cheaply and checkably.

An adapter only means something on the base it was trained on. ``save_adapter`` records in
the safetensors metadata (key ``"lorakit.base"``, a JSON string)::

    {"version": 1, "architecture": "LlamaForCausalLM", "samples": 64,
     "modules": {"model.layers.0.self_attn.q_proj": {"shape": [32, 32], "dtype": "float32",
                                                     "sample": "9c1f4e0a2b7d"}, ...}}

for every module the adapter adapts: the base weight's shape and dtype, and the first 12
hex digits of sha256 over ``samples`` of its values, taken at fixed pseudo-random flat
indices ``i_j = (j * 2654435761 + 12345) mod numel``, j = 0..samples-1, as raw bytes of
that dtype. Cost: one small gather per adapted weight.

``load_adapter`` compares (:func:`compare`): another architecture, other shapes, missing
modules, or sampled values that differ (a base vs an instruct checkpoint of the same
architecture) warn with :class:`BaseModelWarning`, or raise :class:`BaseModelMismatch` with
``strict_base=True``. Values are compared when the base's dtype is the recorded one, or when
the base is float32/float64 (cast down to the recorded dtype first: a bfloat16 checkpoint
upcast to float32 still matches); otherwise (an adapter saved on a float32 base, loaded on a
bfloat16 one) only the architecture and shapes are checked. A weight merged with an adapter
at save time has no sample. Files without the key (PEFT's, older lorakit's) are not checked.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .errors import AdapterFormatError, LoraError, preview

METADATA_KEY = "lorakit.base"
VERSION = 1
SAMPLES = 64
_HIGH_PRECISION = (torch.float32, torch.float64)


class BaseModelMismatch(LoraError):
    """The adapter was saved on a different base model (raised with ``strict_base=True``)."""


class BaseModelWarning(UserWarning):
    """The adapter was saved on a different base model (the default: load anyway, warn)."""


def _module(model: nn.Module, path: str, modules: Optional[dict] = None) -> Optional[nn.Module]:
    """The module at ``path`` (looked up in ``modules``, a dict(walk(model)), when given), or None."""
    found = modules.get(path) if modules is not None else None
    if found is not None:
        return found
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _weight(model: nn.Module, path: str, modules: Optional[dict] = None) -> Optional[torch.Tensor]:
    from .inject import base_of
    module = _module(model, path, modules)
    if module is None:
        return None
    w = getattr(base_of(module), "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def _indices(numel: int, samples: int) -> torch.Tensor:
    j = torch.arange(min(samples, numel), dtype=torch.int64)
    return (j * 2654435761 + 12345) % numel


def _digest(values: torch.Tensor) -> str:
    raw = values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:12]


def _sample(w: torch.Tensor, samples: int, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """The digest of ``w``'s sampled values (cast to ``dtype`` first), or None (meta, empty)."""
    if w.is_meta or w.numel() == 0:
        return None
    flat = w.detach().reshape(-1)
    values = flat[_indices(flat.numel(), samples).to(flat.device)]
    return _digest(values if dtype is None else values.to(dtype))


def _digests(items: list[tuple[torch.Tensor, Optional[torch.dtype]]], samples: int) -> list[Optional[str]]:
    """``_sample(w, samples, dtype)`` for many weights: the gathers run where the weights are and
    one copy per device brings every sampled byte to the host (a GPU model syncs once, not once
    per weight)."""
    index: dict = {}
    raws: list[Optional[torch.Tensor]] = []
    for w, dtype in items:
        if w.is_meta or w.numel() == 0:
            raws.append(None)
            continue
        flat = w.detach().reshape(-1)
        key = (flat.numel(), flat.device)
        if key not in index:
            index[key] = _indices(flat.numel(), samples).to(flat.device)
        values = flat.index_select(0, index[key])
        raws.append((values if dtype is None else values.to(dtype)).contiguous().view(torch.uint8))
    host: list[Optional[torch.Tensor]] = [None] * len(raws)
    for dev in {r.device for r in raws if r is not None}:
        idx = [i for i, r in enumerate(raws) if r is not None and r.device == dev]
        parts = torch.cat([raws[i] for i in idx]).cpu().split([raws[i].numel() for i in idx])
        for i, part in zip(idx, parts):
            host[i] = part
    return [None if h is None else hashlib.sha256(h.numpy().tobytes()).hexdigest()[:12] for h in host]


def _merged(model: nn.Module, path: str, modules: Optional[dict] = None) -> bool:
    return getattr(_module(model, path, modules), "merged_name", None) is not None


def base_fingerprint(model: nn.Module, paths: Iterable[str], samples: int = SAMPLES) -> dict[str, Any]:
    """The fingerprint of ``model``'s base weights at the adapted module ``paths``."""
    modules = {}
    for path in sorted(paths):
        w = _weight(model, path)
        if w is None:
            continue
        modules[path] = {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."),
                         "sample": None if _merged(model, path) else _sample(w, samples)}
    return {"version": VERSION, "architecture": type(model).__name__, "samples": samples, "modules": modules}


def encode(fingerprint: dict[str, Any]) -> dict[str, str]:
    """The metadata entry for a fingerprint (safetensors metadata maps strings to strings)."""
    return {METADATA_KEY: json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))}


def decode(metadata: dict[str, str], source: str) -> Optional[dict[str, Any]]:
    """The fingerprint recorded in a file's metadata, None when there is none; a malformed one
    is an AdapterFormatError naming the file and the field."""
    if METADATA_KEY not in metadata:
        return None
    where = f"{source}: __metadata__[{METADATA_KEY!r}]"
    try:
        fp = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError) as e:
        raise AdapterFormatError(f"{where}: not valid JSON ({e})") from None
    problems = _shape_problems(fp)
    if problems:
        raise AdapterFormatError(f"{where}: malformed base fingerprint: {problems}")
    return fp


def _shape_problems(fp: Any) -> Optional[str]:
    if not isinstance(fp, dict) or fp.get("version") != VERSION:
        return f"expected an object with version {VERSION}"
    if not isinstance(fp.get("architecture"), str) or not isinstance(fp.get("modules"), dict):
        return "expected 'architecture' (a string) and 'modules' (an object)"
    samples = fp.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= 4096:
        return f"'samples' must be an integer in [1, 4096], got {samples!r}"
    for path, m in fp["modules"].items():
        ok = (isinstance(m, dict) and isinstance(m.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) for d in m["shape"])
              and isinstance(m.get("dtype"), str) and (m.get("sample") is None or isinstance(m.get("sample"), str)))
        if not ok:
            return f"module {path!r}: expected {{shape: [int], dtype: str, sample: str or null}}, got {m!r}"
    return None


def _comparable(current: torch.dtype, recorded: str) -> Optional[torch.dtype]:
    """The dtype to cast the current weight to before hashing, or None when values cannot be compared."""
    target = getattr(torch, recorded, None)
    if not isinstance(target, torch.dtype):
        return None
    if current == target:
        return current
    if current in _HIGH_PRECISION and target.is_floating_point:
        return target
    return None


def compare(recorded: dict[str, Any], model: nn.Module) -> list[str]:
    """What differs between the recorded fingerprint and ``model`` (empty: the same base)."""
    diffs = []
    if recorded["architecture"] != type(model).__name__:
        diffs.append(f"architecture: saved on {recorded['architecture']}, this model is {type(model).__name__}")
    from .inject import walk
    modules = dict(walk(model))
    missing, shapes, sampled = [], [], []
    for path, m in recorded["modules"].items():
        w = _weight(model, path, modules)
        if w is None:
            missing.append(path)
        elif list(w.shape) != m["shape"]:
            shapes.append(f"{path}.weight saved {m['shape']}, now {list(w.shape)}")
        elif m["sample"] is not None and not _merged(model, path, modules):
            cast = _comparable(w.dtype, m["dtype"])
            if cast is not None:
                sampled.append((path, m["sample"], w, cast))
    digests = _digests([(w, cast) for _, _, w, cast in sampled], recorded["samples"])
    values = [path for (path, want, _, _), got in zip(sampled, digests) if got != want]
    compared = len(sampled)
    if missing:
        diffs.append(f"modules missing from this model: {preview(missing, 5)}")
    if shapes:
        diffs.append(f"weight shapes: {preview(shapes, 5)}")
    if values:
        diffs.append(f"weight values: the sampled values of {len(values)} of {compared} adapted weights differ "
                     f"{preview(values, 3)} (another checkpoint of the same architecture, e.g. a base vs an "
                     "instruct model?)")
    return diffs


def check_base(model: nn.Module, metadata: dict[str, str], source: str, strict: bool = False,
               stacklevel: int = 2) -> list[str]:
    """Compare the fingerprint in ``metadata`` with ``model``: warn (default) or raise
    (``strict``) naming every difference. Returns the differences (empty when the same base
    or no fingerprint)."""
    recorded = decode(metadata, source)
    if recorded is None:
        return []
    diffs = compare(recorded, model)
    if diffs:
        msg = f"{source}: the adapter was saved on a different base model: " + "; ".join(diffs)
        if strict:
            raise BaseModelMismatch(msg + " (load with strict_base=False to use it anyway)")
        warnings.warn(msg + " (strict_base=True refuses such loads)", BaseModelWarning, stacklevel=stacklevel)
    return diffs


__all__ = ["METADATA_KEY", "BaseModelMismatch", "BaseModelWarning", "base_fingerprint", "encode", "decode",
           "compare", "check_base"]
