"""Does an adapter file fit a model? Checked in two passes, before the model is touched.

1. ``check_header`` (shapes and dtypes from the safetensors header, no tensor read): every
   key maps to an adapted module of the model (or a modules_to_save parameter); no key is
   missing; for each adapted module, A (r, k) and B (d, r) are both present (no orphan),
   their ranks agree with each other and with the config (rank_pattern included), the
   other dims fit the module; dtypes are floating point.
2. ``check_values`` (after reading): values are finite, and stay finite in the dtype they are
   copied into (a float64 1e300 would become inf in float32); a copy of a base weight that
   PEFT may store (``<module>.base_layer.weight``) equals the model's.

Every problem is collected and reported at once, naming the file and the key, expected vs
actual. Keys may carry PEFT's ``base_model.model.`` prefix or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterFormatError, ShapeMismatch, preview
from .inject import base_of, resolve_saved, resolve_targets, walk
from .layers import adapter_shapes, supported_base
from .tensorfile import FLOAT_DTYPES, TensorInfo

PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


@dataclass
class Expected:
    """What a file for ``cfg`` must contain on ``model`` (keys without PREFIX)."""

    pairs: dict[str, tuple[str, tuple, str, tuple]] = field(default_factory=dict)  # path: (A key, shape, B key, shape)
    saved: dict[str, tuple] = field(default_factory=dict)                          # key: shape
    optional: dict[str, torch.Tensor] = field(default_factory=dict)                # key: base parameter
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)                   # key: dtype it is copied into
    devices: set = field(default_factory=set)                                      # where the copies go
    saved_paths: list[str] = field(default_factory=list)                           # modules_to_save paths

    @property
    def paths(self) -> list[str]:
        """The adapted module paths, in model order (resolve_targets)."""
        return list(self.pairs)

    def keys(self) -> set[str]:
        found = set(self.saved)
        for a, _, b, _ in self.pairs.values():
            found.update((a, b))
        return found


def expected(model: nn.Module, cfg: LoraConfig) -> Expected:
    """What a file for ``cfg`` must hold on ``model``: one walk of the model, then dict lookups."""
    exp = Expected()
    modules = dict(walk(model))
    for path in resolve_targets(model, cfg):
        base = base_of(modules[path])
        cls = supported_base(base)
        a_shape, b_shape = adapter_shapes(base, cfg.rank_for(path))
        exp.pairs[path] = (f"{path}.{cls.peft_a_key}", tuple(a_shape), f"{path}.{cls.peft_b_key}", tuple(b_shape))
        dest = base.weight.dtype if cfg.adapter_dtype == "auto" else getattr(torch, cfg.adapter_dtype)
        exp.dtypes.update({exp.pairs[path][0]: dest, exp.pairs[path][2]: dest})
        exp.devices.add(base.weight.device)
        for pname, p in base.named_parameters():
            exp.optional[f"{path}.base_layer.{pname}"] = p
    exp.saved_paths = resolve_saved(model, cfg)
    for path in exp.saved_paths:
        for pname, p in base_of(modules[path]).named_parameters():
            exp.saved[f"{path}.{pname}"] = tuple(p.shape)
            exp.dtypes[f"{path}.{pname}"] = p.dtype
            exp.devices.add(p.device)
    return exp


def strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


@dataclass
class _Report:
    shapes: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def raise_if_any(self, model: nn.Module, source: str, strict: bool) -> None:
        problems = []
        if self.shapes:
            problems.append("shape mismatches: " + "; ".join(self.shapes))
        if self.dtypes:
            problems.append("bad dtypes: " + "; ".join(self.dtypes))
        orphans = self.orphans if strict else [o for o in self.orphans if "(B without A)" in o]
        if orphans:
            problems.append("orphans: " + "; ".join(orphans))
        if self.missing and (strict or orphans):
            problems.append(f"{len(self.missing)} missing keys: {preview(self.missing, 50)}")
        if self.unexpected and strict:
            problems.append(f"{len(self.unexpected)} unexpected keys (no adapted module of the model takes them): "
                            f"{preview(self.unexpected, 50)}")
        if problems:
            only_shapes = self.shapes and not (self.dtypes or orphans or
                                               (strict and (self.missing or self.unexpected)))
            cls = ShapeMismatch if only_shapes else AdapterFormatError
            raise cls(f"{source}: adapter does not fit {type(model).__name__}: " + " | ".join(problems))


def check_header(model: nn.Module, cfg: LoraConfig, entries: dict[str, TensorInfo], source: str,
                 strict: bool = True) -> Expected:
    """Pass 1: the header's keys, shapes and dtypes against ``cfg`` on ``model``.

    ``strict=False`` tolerates missing and unexpected keys, and an A without its B (B keeps its
    zero init: that module adds nothing); a B without its A is always refused (A's random init
    would make it add noise)."""
    exp = expected(model, cfg)
    rep = _Report()
    by_key = {strip(k): (k, info) for k, info in entries.items()}
    lora_keys = {key for a, _, b, _ in exp.pairs.values() for key in (a, b)}
    for k, (key, info) in by_key.items():
        if k in exp.optional:
            param = exp.optional[k]
            if info.shape != tuple(param.shape):
                rep.shapes.append(f"{key}: expected shape {list(param.shape)}, got {list(info.shape)}")
        elif k in exp.saved:
            if info.shape != exp.saved[k]:
                rep.shapes.append(f"{key}: expected shape {list(exp.saved[k])}, got {list(info.shape)}")
        elif k not in lora_keys:
            rep.unexpected.append(f"{key} ({_why_unexpected(model, cfg, k, exp)})")
            continue
        if info.dtype not in FLOAT_DTYPES:
            rep.dtypes.append(f"{key}: expected a floating-point dtype {list(FLOAT_DTYPES)}, got {info.dtype} "
                              f"({info.torch_dtype})")
    for path, (a_key, a_shape, b_key, b_shape) in exp.pairs.items():
        a, b = by_key.get(a_key), by_key.get(b_key)
        if a and b:
            _check_pair(cfg, path, a, a_shape, b, b_shape, rep)
        elif a or b:
            have, lack = (a_key, b_key) if a else (b_key, a_key)
            rep.orphans.append(f"{PREFIX}{have} has no partner {PREFIX}{lack} ({'A' if a else 'B'} without "
                               f"{'B' if a else 'A'})")
            rep.missing.append(PREFIX + lack)
        else:
            rep.missing += [PREFIX + a_key, PREFIX + b_key]
    rep.missing += [PREFIX + k for k in exp.saved if k not in by_key]
    rep.raise_if_any(model, source, strict)
    return exp


def _check_pair(cfg: LoraConfig, path: str, a, a_shape: tuple, b, b_shape: tuple, rep: _Report) -> None:
    """Shapes of one module's A (r, k, ...) and B (d, r, ...): the rank is A's dim 0 and B's dim 1."""
    (a_key, a_info), (b_key, b_info) = a, b
    sa, sb = a_info.shape, b_info.shape
    if sa == b_shape and sb == a_shape and a_shape != b_shape:
        rep.shapes.append(f"{path}: A and B look swapped: {a_key} has shape {list(sa)} (B's {list(b_shape)}), "
                          f"{b_key} has shape {list(sb)} (A's {list(a_shape)})")
        return
    if len(sa) != len(a_shape) or len(sb) != len(b_shape) or len(sb) < 2:
        for key, got, want in ((a_key, sa, a_shape), (b_key, sb, b_shape)):
            if got != want:
                rep.shapes.append(f"{key}: expected shape {list(want)}, got {list(got)}")
        return
    file_r = sa[0] if sa[0] == sb[1] else None
    for key, got, want, dim in ((a_key, sa, a_shape, 0), (b_key, sb, b_shape, 1)):
        if got[:dim] + got[dim + 1:] != want[:dim] + want[dim + 1:]:
            shown = list(want) if file_r is None else [*want[:dim], file_r, *want[dim + 1:]]
            rep.shapes.append(f"{key}: expected shape {shown}, got {list(got)}")
    ra, rb, r = sa[0], sb[1], cfg.rank_for(path)
    if ra != rb:
        rep.shapes.append(f"{path}: A and B ranks disagree: {a_key} has r={ra} (shape {list(sa)}), "
                          f"{b_key} has r={rb} (shape {list(sb)})")
    elif ra != r:
        rep.shapes.append(f"{path}: r={ra} in the file ({a_key} {list(sa)}, {b_key} {list(sb)}), but the config "
                          f"gives r={r} {_rank_source(cfg, path)}")


def _rank_source(cfg: LoraConfig, path: str) -> str:
    for key, value in cfg.rank_pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return f"(rank_pattern {key!r}: {value})"
    return f"(its r: {cfg.r})"


def _why_unexpected(model: nn.Module, cfg: LoraConfig, k: str, exp: Expected) -> str:
    suffix = next((s for s in LORA_SUFFIXES if k.endswith(s)), None)
    if suffix is None:
        return ("not a LoRA key: expected '<module>.lora_A.weight', '.lora_B.weight', '.lora_embedding_A', "
                "'.lora_embedding_B' or a modules_to_save parameter")
    module = k[:-len(suffix)]
    try:
        found = model.get_submodule(module)
    except AttributeError:
        return f"no module {module!r} in {type(model).__name__}"
    if module in exp.pairs:
        a_key, _, b_key, _ = exp.pairs[module]
        return f"module {module!r} ({type(base_of(found)).__name__}) takes the keys {a_key!r} and {b_key!r}"
    return f"module {module!r} is not adapted by the config's target_modules {cfg.target_modules!r}"


def all_finite(t: torch.Tensor) -> bool:
    """True when every value of ``t`` is finite.

    A NaN or Inf anywhere makes the sum NaN or Inf (NaN + x = NaN, Inf + finite = Inf,
    Inf + -Inf = NaN), so a finite sum (one reduction) proves every value finite; only a
    non-finite sum (a bad value, or finite values whose sum overflows the dtype) pays for the
    elementwise check. The sum is taken in t's own dtype (torch accumulates half types in
    float32 internally; a float32 result of a bfloat16 sum is 25x slower on CPU); 8-bit floats,
    which torch cannot sum, are summed as float32.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    total = t.sum(dtype=torch.float32) if t.element_size() < 2 else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def finite_keys(exp: Expected, runs: list[tuple[torch.Tensor, list[str]]]) -> frozenset[str]:
    """Keys proven finite, in the file and in the dtype they are copied into, by one all_finite
    per run (tensorfile.split_buffer: adjacent tensors of one dtype seen as one flat tensor; a file
    lorakit writes is one run). A run copied into another dtype is checked after one cast (a
    value that is not finite in the file is not finite after the cast either)."""
    proven: set[str] = set()
    for flat, keys in runs:
        dests = {exp.dtypes.get(strip(k), flat.dtype) for k in keys}
        dest = dests.pop() if len(dests) == 1 else None
        if dest is not None and all_finite(flat if dest == flat.dtype else flat.to(dest)):
            proven.update(keys)
    return frozenset(proven)


def check_values(exp: Expected, tensors: dict[str, torch.Tensor], source: str, model: nn.Module,
                 finite: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Pass 2: finite values, and saved base copies equal to the model's. Returns the adapter's
    tensors keyed without PREFIX (the base copies dropped). Keys in ``finite`` are known finite
    (finite_keys) and skip their own reduction."""
    wanted = exp.keys()
    by_path, bad, differ = {}, [], []
    for key, t in tensors.items():
        k = strip(key)
        if k in exp.optional:
            p = exp.optional[k]
            if not torch.equal(t.to(p.device, p.dtype), p):
                differ.append(f"{key}: a saved copy of the base weight that differs from this model's "
                              "(was the vocabulary resized?)")
        elif k in wanted:
            if key in finite:
                pass
            elif not all_finite(t):
                n_nan, n_bad = int(torch.isnan(t).sum()), int((~torch.isfinite(t)).sum())
                bad.append(f"{key}: expected finite values, got {n_nan} NaN and {n_bad - n_nan} Inf")
            elif t.dtype != exp.dtypes[k] and not all_finite(t.to(exp.dtypes[k])):
                n = int((~torch.isfinite(t.to(exp.dtypes[k]))).sum())
                bad.append(f"{key}: expected values that fit {exp.dtypes[k]} (the adapter's dtype), got {n} that "
                           f"overflow it (largest magnitude {t.abs().max().item():.3g})")
            by_path[k] = t
    if bad or differ:
        raise AdapterFormatError(f"{source}: adapter does not fit {type(model).__name__}: "
                                 + " | ".join(x for x in ("bad values: " + "; ".join(bad) if bad else "",
                                                          "; ".join(differ)) if x))
    return by_path


# ------------------------------------------------------------------------------ regexes from files
MAX_PATTERN_CHARS = 10_000


def regex_problem(pattern: str) -> Optional[str]:
    """Why a regex from a stranger's config must not run, or None.

    target_modules / rank_pattern keys are matched against every module path; a nested
    repetition such as ``(\\w+\\.?)+x`` backtracks exponentially (seconds per path, hours per
    model). Refused: patterns over MAX_PATTERN_CHARS, and a repetition (more than 16) inside
    another. Alternations with overlapping branches, like ``(a|a)*``, are not detected.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    try:
        from re import _constants as const, _parser as parser        # Python >= 3.11
    except ImportError:                                               # pragma: no cover
        import sre_constants as const
        import sre_parse as parser
    try:
        tree = parser.parse(pattern)
    except Exception as e:  # noqa: BLE001 - re.compile reports it with its own message later
        return None if isinstance(e, re.error) else f"cannot be parsed ({e})"
    if _nested_repeat(tree, False, (const.MAX_REPEAT, const.MIN_REPEAT), const.MAXREPEAT, parser.SubPattern):
        return ("a repetition inside a repetition (like (a+)+) can take exponential time on module names; "
                "write it without repeating a repeated group")
    return None


def _nested_repeat(node: Any, inside: bool, repeats: tuple, unbounded: int, subpattern: type) -> bool:
    if isinstance(node, subpattern):
        node = list(node)
    if not isinstance(node, (list, tuple)):
        return False
    if len(node) == 2 and any(node[0] is r for r in repeats):
        lo, hi, sub = node[1]
        big = hi is unbounded or hi > 16
        return (big and inside) or _nested_repeat(sub, inside or big, repeats, unbounded, subpattern)
    return any(_nested_repeat(x, inside, repeats, unbounded, subpattern) for x in node)


def config_regex_problems(data: dict) -> list[str]:
    """regex_problem for every pattern of a raw adapter_config.json dict."""
    found = []
    for name in ("target_modules", "exclude_modules"):
        if isinstance(data.get(name), str):
            found.append((name, data[name]))
    for name in ("rank_pattern", "alpha_pattern"):
        if isinstance(data.get(name), dict):
            found += [(name, key) for key in data[name]]
    problems = []
    for name, pattern in found:
        why = regex_problem(pattern)
        if why:
            problems.append(f"{name} regex {pattern[:80]!r}: {why}")
    return problems
