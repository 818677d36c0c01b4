"""Rank analysis of weights and weight updates, and extracting a LoRA adapter from a full fine-tune.

Why LoRA works (Hu et al. 2021, section 7): the update a fine-tune makes to a weight,
dW = W_tuned - W_base (d x k), has a fast-decaying spectrum, so a rank-r product B A keeps
most of it. With the SVD dW = U diag(s) V^T, s_1 >= ... >= s_m >= 0, m = min(d, k)::

    energy(r)          = sum_{i<=r} s_i^2 / sum_i s_i^2
    effective rank     = the smallest r with energy(r) >= threshold (0.9, 0.99, ...)
    best rank-r approx = U_r diag(s_r) V_r^T                       (Eckart-Young)
    relative error     = ||dW - dW_r||_F / ||dW||_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)

Extraction turns dW_r into LoRA factors with alpha = r, so scale = alpha / r = 1::

    B = U_r diag(sqrt(s_r))    (d x r)        A = diag(sqrt(s_r)) V_r^T    (r x k)
    scale * B A = dW_r

Checkpoints (lorakit/weights.py) are safetensors files, folders of safetensors files, Hugging
Face model folders (a config.json: loaded with transformers so every weight is known by its
module and type) or in-memory nn.Modules. Every weight is seen as a (d, k) matrix: nn.Linear as stored,
GPT-2 Conv1D (stored k x d) and nn.Embedding (num x dim) transposed, a convolution
(out, in, *kernel) flattened to (out, in * prod(kernel)).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .errors import CheckpointError, LoraError, ShapeMismatch, preview
from .weights import Checkpoint, _select, changed_others, load_checkpoint, matrix_view, pair_checkpoints  # noqa: F401

DEFAULT_RANKS = (1, 4, 16, 64)
DEFAULT_THRESHOLDS = (0.9, 0.99)
EXTRACTABLE = ("linear", "conv1d", "embedding", "conv")


# ------------------------------------------------------------------------------ spectra
def singular_values(x: Tensor) -> Tensor:
    """s_1 >= ... >= s_m >= 0 (m = min(d, k)) of a 2-D matrix (d, k); float64 stays float64,
    anything else is computed in float32. A 1-D tensor is taken as singular values already
    (returned as |x| sorted in descending order)."""
    x = x.detach()
    if x.dim() == 1:
        return x.abs().sort(descending=True).values
    if x.dim() != 2:
        raise ShapeMismatch(f"singular values need a 2-D matrix (d, k), got shape {list(x.shape)}")
    return torch.linalg.svdvals(x.to(_compute_dtype(x)))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def energy(x: Tensor) -> Tensor:
    """Cumulative energy c_r = sum_{i<=r} s_i^2 / sum_i s_i^2 for r = 1..m (float64; all 1 for a zero matrix)."""
    s2 = singular_values(x).double() ** 2
    total = s2.sum()
    return torch.ones_like(s2) if total == 0 else torch.cumsum(s2, 0) / total


def effective_rank(x: Tensor, threshold: float = 0.9) -> int:
    """The smallest r with energy(r) >= threshold (0 for a zero matrix). ``x``: matrix or singular values."""
    if not 0.0 < threshold <= 1.0:
        raise LoraError(f"threshold must be in (0, 1], got {threshold!r}")
    s = singular_values(x)
    if s.numel() == 0 or float(s.double().abs().sum()) == 0.0:
        return 0
    c = energy(s)
    i = int(torch.searchsorted(c, torch.tensor([threshold - 1e-12], dtype=c.dtype))[0])
    return min(i + 1, s.numel())


def relative_error(x: Tensor, r: int) -> float:
    """||X - X_r||_F / ||X||_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2) for the best rank-r X_r (0 for X = 0)."""
    if r < 0:
        raise LoraError(f"rank must be >= 0, got {r}")
    s2 = singular_values(x).double() ** 2
    total = float(s2.sum())
    return 0.0 if total == 0.0 else math.sqrt(max(float(s2[r:].sum()), 0.0) / total)


def numerical_rank(x: Tensor, tol: Optional[float] = None) -> int:
    """Number of singular values above ``tol`` (default max(d, k) * eps * s_1, as torch.linalg.matrix_rank)."""
    s = singular_values(x)
    if s.numel() == 0:
        return 0
    if tol is None:
        n = max(x.shape) if x.dim() == 2 else s.numel()
        tol = n * torch.finfo(s.dtype).eps * float(s[0])
    return int((s > tol).sum())


@dataclass(frozen=True)
class LowRank:
    """The best rank-r approximation U diag(S) Vh of a (d, k) matrix, and its relative Frobenius error."""

    U: Tensor          # (d, r)
    S: Tensor          # (r,)
    Vh: Tensor         # (r, k)
    error: float       # ||X - U diag(S) Vh||_F / ||X||_F

    def matrix(self) -> Tensor:
        return (self.U * self.S) @ self.Vh          # (d, r) * (r,) @ (r, k) -> (d, k)

    def lora_factors(self, rank: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """(B (d, rank), A (rank, k)) with B A = U diag(S) Vh; zero columns/rows pad up to ``rank``."""
        root = self.S.sqrt()
        B, A = self.U * root, root[:, None] * self.Vh
        pad = (rank or B.shape[1]) - B.shape[1]
        if pad > 0:
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1)
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])], 0)
        return B, A


def truncated_svd(x: Tensor, r: int) -> LowRank:
    """Best rank-r approximation of a (d, k) matrix (r is capped at min(d, k)); float32 unless x is float64."""
    if r < 1:
        raise LoraError(f"rank must be >= 1, got {r}")
    if x.dim() != 2:
        raise ShapeMismatch(f"truncated_svd needs a 2-D matrix (d, k), got shape {list(x.shape)}")
    U, S, Vh = torch.linalg.svd(x.detach().to(_compute_dtype(x)), full_matrices=False)
    r = min(r, S.numel())
    return LowRank(U[:, :r], S[:r], Vh[:r], relative_error(S, r))


# ------------------------------------------------------------------------------ analysis
@dataclass
class LayerAnalysis:
    """Rank statistics of one layer's update (or of its weight, with no tuned checkpoint)."""

    name: str
    kind: str
    shape: tuple                      # (d, k) of the matrix view
    full_rank: int                    # min(d, k)
    numerical_rank: int               # singular values above the storage/rounding noise
    effective_rank: dict[float, int]  # threshold -> smallest r keeping that energy
    relative_error: dict[int, float]  # r -> ||X - X_r||_F / ||X||_F
    norm: float                       # ||X||_F
    relative_norm: Optional[float]    # ||dW||_F / ||W_base||_F (None without a tuned checkpoint)
    singular_values: Tensor = field(repr=False)

    def to_dict(self, top: int = 128) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "full_rank": self.full_rank,
                "numerical_rank": self.numerical_rank,
                "effective_rank": {str(k): v for k, v in self.effective_rank.items()},
                "relative_error": {str(k): v for k, v in self.relative_error.items()},
                "norm": self.norm, "relative_norm": self.relative_norm,
                "top_singular_values": [float(v) for v in self.singular_values[:top]]}


def analyze_layer(name: str, x: Tensor, ranks: Sequence[int] = DEFAULT_RANKS,
                  thresholds: Sequence[float] = DEFAULT_THRESHOLDS, kind: str = "matrix",
                  base: Optional[Tensor] = None, noise: float = 0.0) -> LayerAnalysis:
    """Statistics of a (d, k) matrix ``x`` (an update when ``base`` is given). ``noise``: an absolute
    singular-value floor below which values count as rounding (see analyze)."""
    s = singular_values(x)
    tol = max(noise, max(x.shape) * torch.finfo(s.dtype).eps * float(s[0]) if s.numel() else 0.0)
    norm = float(s.double().norm())
    rel = None if base is None else norm / max(float(base.double().norm()), 1e-300)
    return LayerAnalysis(name, kind, tuple(x.shape), min(x.shape), int((s > tol).sum()),
                         {t: effective_rank(s, t) for t in thresholds}, {r: relative_error(s, r) for r in ranks},
                         norm, rel, s.cpu())


def analyze(base, tuned=None, ranks: Sequence[int] = DEFAULT_RANKS,
            thresholds: Sequence[float] = DEFAULT_THRESHOLDS, include: Optional[str] = None,
            exclude: Optional[str] = None, device: str = "cpu", progress: bool = False) -> list[LayerAnalysis]:
    """Per-layer rank statistics of ``tuned - base`` (or of ``base``'s weights when ``tuned`` is None).

    ``base``/``tuned``: anything load_checkpoint takes. The numerical rank of an update counts
    singular values above the rounding noise of storing W_tuned in its dtype (see _noise_floor),
    so an exactly rank-R update reports R.
    """
    b = base if isinstance(base, Checkpoint) else load_checkpoint(base)
    t = None if tuned is None else (tuned if isinstance(tuned, Checkpoint) else load_checkpoint(tuned))
    paths = _select(pair_checkpoints(b, t) if t is not None else list(b.modules), include, exclude)
    out = []
    for path in _progress(paths, progress, "analyse"):
        kind, w = b.modules[path][0], b.matrix(path).to(device)
        if t is None:
            out.append(analyze_layer(path, w, ranks, thresholds, kind))
            continue
        raw = t.raw(path)                            # seen through the base's module kind, as in extraction
        wt = matrix_view(kind, raw).to(device, torch.float32)
        noise = _noise_floor(wt, raw.dtype)
        out.append(analyze_layer(path, wt - w, ranks, thresholds, kind, base=w, noise=noise))
    return out


def _noise_floor(w: Tensor, storage: torch.dtype) -> float:
    """eps(storage) * rms(W) * (sqrt(d) + sqrt(k)): about the spectral norm of the rounding noise of
    storing W (d, k) in ``storage`` (iid entries of size eps * rms(W)); smaller singular values are noise."""
    if not storage.is_floating_point:
        return 0.0
    d, k = w.shape
    rms = float(w.double().norm()) / math.sqrt(max(d * k, 1))
    return torch.finfo(storage).eps * rms * (math.sqrt(d) + math.sqrt(k))


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="layer", leave=False)


# ------------------------------------------------------------------------------ extraction
@dataclass
class ExtractedLayer:
    name: str
    kind: str
    shape: tuple          # (d, k) of the matrix view
    rank: int             # rank kept (<= requested; zero-padded up to it in the file)
    relative_error: float         # ||dW - B A||_F / ||dW||_F, with B, A as saved (their dtype included)
    relative_weight_error: float  # ||dW - B A||_F / ||W_tuned||_F: how far base + B A is from W_tuned


@dataclass
class Extraction:
    folder: Path
    rank: int
    layers: list[ExtractedLayer]
    unchanged: list[str]      # selected modules whose weight did not change (not adapted)
    not_captured: list[str]   # changed tensors a LoRA adapter cannot carry (biases, norms, 2-D non-weights, ...)

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "rank": self.rank, "alpha": self.rank,
                "layers": [vars(x) | {"shape": list(x.shape)} for x in self.layers],
                "max_relative_error": max((x.relative_error for x in self.layers), default=0.0),
                "unchanged": self.unchanged, "not_captured": self.not_captured}


_PEFT_KEYS = {"embedding": ("lora_embedding_A", "lora_embedding_B")}


def extract_lora(base, tuned, rank: int, out: Union[str, Path], include: Optional[str] = None,
                 exclude: Optional[str] = None, dtype: Optional[torch.dtype] = None, device: str = "cpu",
                 progress: bool = False) -> Extraction:
    """Approximate ``tuned - base`` by a rank-``rank`` LoRA adapter and save it in PEFT's layout.

    For every selected module whose weight changed: dW_r = U_r diag(s_r) V_r^T, B = U_r sqrt(s_r),
    A = sqrt(s_r) V_r^T, alpha = rank (scale 1), reshaped to the module kind's A/B shapes. The
    folder gets adapter_model.safetensors, adapter_config.json and extraction_report.json.
    ``dtype``: of the saved factors (default: each base weight's dtype).
    """
    from safetensors.torch import save as st_save
    from .config import LoraConfig
    from .io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, atomic_write_bytes
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"rank must be an integer >= 1, got {rank!r}")
    b = base if isinstance(base, Checkpoint) else load_checkpoint(base)
    t = tuned if isinstance(tuned, Checkpoint) else load_checkpoint(tuned)
    paths = _select(pair_checkpoints(b, t), include, exclude)
    layers, unchanged, not_captured, tensors = [], [], [], {}
    for path in _progress(paths, progress, "extract"):
        kind, raw_base, raw_tuned = b.modules[path][0], b.raw(path), t.raw(path)
        if torch.equal(raw_base, raw_tuned):
            unchanged.append(path)
            continue
        if kind not in EXTRACTABLE:
            not_captured.append(b.modules[path][1])
            continue
        w_tuned = matrix_view(kind, raw_tuned).to(device, torch.float32)                  # (d, k)
        delta = w_tuned - matrix_view(kind, raw_base).to(device, torch.float32)          # dW (d, k)
        low = truncated_svd(delta, rank)
        out_dtype = dtype or raw_base.dtype
        B, A = (f.to(out_dtype) for f in low.lora_factors(rank))                         # (d, rank), (rank, k)
        err = float((delta - B.float() @ A.float()).double().norm())   # what the saved factors really give
        layers.append(ExtractedLayer(path, kind, tuple(delta.shape), low.S.numel(),
                                     err / max(float(delta.double().norm()), 1e-300),
                                     err / max(float(w_tuned.double().norm()), 1e-300)))
        a_key, b_key = _PEFT_KEYS.get(kind, ("lora_A.weight", "lora_B.weight"))
        A, B = _to_module_shapes(kind, raw_base.shape, A, B)
        tensors[f"{PREFIX}{path}.{a_key}"] = A.cpu().contiguous()
        tensors[f"{PREFIX}{path}.{b_key}"] = B.cpu().contiguous()
    if not layers:
        raise CheckpointError(f"{t.source}: no selected module weight differs from {b.source}; nothing to extract"
                              + (f" (changed but not extractable: {preview(not_captured)})" if not_captured else ""))
    not_captured += changed_others(b, t, paths)
    cfg = LoraConfig(r=rank, alpha=rank, target_modules=[x.name for x in layers], base_model_name_or_path=b.source,
                     task_type=b.task_type)
    result = Extraction(Path(out), rank, layers, unchanged, not_captured)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "saved_by": "lorakit extract"}
    atomic_write_bytes(folder / WEIGHTS_NAME, st_save(tensors, metadata=meta))
    peft = cfg.to_peft_dict(target_modules=cfg.target_modules,
                            fan_in_fan_out=any(x.kind == "conv1d" for x in layers))
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(peft, indent=2, sort_keys=True) + "\n").encode())
    report = json.dumps(result.to_dict(), indent=2) + "\n"
    atomic_write_bytes(folder / "extraction_report.json", report.encode())
    return result


def _to_module_shapes(kind: str, weight_shape: torch.Size, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """A (r, k), B (d, r) of the matrix view -> the module kind's adapter shapes (layers.adapter_shapes)."""
    if kind == "conv":
        ones = (1,) * (len(weight_shape) - 2)
        return A.reshape(A.shape[0], *weight_shape[1:]), B.reshape(*B.shape, *ones)
    return A, B


__all__ = ["CheckpointError", "Checkpoint", "LowRank", "LayerAnalysis", "ExtractedLayer", "Extraction",
           "singular_values", "energy", "effective_rank", "relative_error", "numerical_rank", "truncated_svd",
           "load_checkpoint", "pair_checkpoints", "changed_others", "analyze", "analyze_layer", "extract_lora"]
