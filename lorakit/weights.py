"""Reading model weights for analysis: safetensors files, folders of shards, Hugging Face
model folders, nn.Modules or {key: tensor} dicts, each seen as module weights of a known kind.

Every weight is seen as a (d, k) matrix: nn.Linear as stored, GPT-2 Conv1D (stored k x d)
and nn.Embedding (num x dim) transposed, a convolution (out, in, *kernel) flattened to
(out, in * prod(kernel)). Pickle checkpoints are never unpickled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError, LoraError, preview

@dataclass
class Checkpoint:
    """Tensors of one checkpoint and which of them are module weights of which kind.

    ``modules``: module path -> (kind, state-dict key); kind is "linear", "conv1d", "embedding",
    "conv", or "matrix" (a 2-D tensor of a plain file whose key does not end in ".weight").
    """

    source: str
    tensors: Mapping[str, Tensor]
    modules: dict[str, tuple[str, str]]
    task_type: Optional[str] = None

    def matrix(self, path: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (d, k) matrix view of the module's weight (see the module docstring)."""
        return matrix_view(self.modules[path][0], self.raw(path)).to(dtype)

    def raw(self, path: str) -> Tensor:
        """The module's weight as stored."""
        return self.tensors[self.modules[path][1]]

    def shape(self, path: str) -> tuple:
        """The stored weight's shape, without reading it from a file."""
        return _shape(self.tensors, self.modules[path][1])


def matrix_view(kind: str, w: Tensor) -> Tensor:
    """A stored weight as the (d, k) matrix LoRA approximates: Conv1D (k, d) and Embedding (num, dim)
    transposed, a convolution (out, in, *kernel) flattened to (out, in * prod(kernel))."""
    if kind in ("conv1d", "embedding"):
        return w.t()
    return w.flatten(1) if kind == "conv" else w


class _LazyFiles(Mapping):
    """{key: tensor} over one or more safetensors files, read on access (memory-mapped)."""

    def __init__(self, files: Sequence[Path]) -> None:
        from safetensors import safe_open
        self._where = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: not a readable safetensors file: {e}") from None
            for k in handle.keys():
                self._where[k] = handle

    def __getitem__(self, key: str) -> Tensor:
        return self._where[key].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_checkpoint(source: Union[str, Path, nn.Module, Mapping[str, Tensor]]) -> Checkpoint:
    """A Checkpoint from a safetensors file, a folder of them, a Hugging Face model folder
    (config.json: loaded with transformers), an nn.Module, or a {key: tensor} dict."""
    if isinstance(source, nn.Module):
        return _from_module(source, type(source).__name__)
    if isinstance(source, Mapping):
        return _from_tensors(dict(source), "state dict")
    p = Path(source)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p}: expected a .safetensors file (pickle checkpoints are never unpickled) "
                                  "or a model folder")
        return _from_tensors(_LazyFiles([p]), str(p))
    if p.is_dir():
        if (p / "config.json").exists():
            return _from_module(_load_hf(p), str(p))
        files = sorted(p.glob("*.safetensors"))
        if files:
            return _from_tensors(_LazyFiles(files), str(p))
        raise CheckpointError(f"{p}: no config.json and no *.safetensors file in this folder")
    raise CheckpointError(f"{p}: no such file or folder")


def _from_tensors(tensors: Mapping[str, Tensor], source: str) -> Checkpoint:
    modules = {}
    for key in tensors:
        if len(_shape(tensors, key)) == 2:
            path = key[:-len(".weight")] if key.endswith(".weight") else key
            modules[path] = ("linear" if key.endswith(".weight") else "matrix", key)
    return Checkpoint(source, tensors, modules)


def _shape(tensors: Mapping[str, Tensor], key: str) -> tuple:
    if isinstance(tensors, _LazyFiles):
        return tuple(tensors._where[key].get_slice(key).get_shape())
    return tuple(tensors[key].shape)


def _from_module(model: nn.Module, source: str) -> Checkpoint:
    from .inject import _why_not
    from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, SavedModule, supported_base
    kinds = {LoraEmbedding: "embedding", LoraConv: "conv"}
    modules = {}
    for path, m in model.named_modules():
        if isinstance(m, (LoraLayer, SavedModule)):
            raise CheckpointError(f"{source}: module {path!r} carries LoRA adapters; merge or unload them "
                                  "(lorakit.unload(model, merge=True)) before analysing")
        cls = supported_base(m)
        if cls is None or not path or _why_not(model, path, m) is not None:
            continue   # its weight is analysed as a plain tensor ("not captured" when extracting)
        kind = ("linear" if isinstance(m, nn.Linear) else "conv1d") if cls is LoraLinear else kinds[cls]
        modules[path] = (kind, f"{path}.weight")
    arch = (getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__])[0]
    return Checkpoint(source, model.state_dict(), modules, _task_type(arch))


def _task_type(arch: str) -> Optional[str]:
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                         ("ForTokenClassification", "TOKEN_CLS")):
        if arch.endswith(suffix):
            return task
    return None


def _load_hf(folder: Path) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"{folder} is a Hugging Face model folder; reading it needs transformers "
                              "(pip install 'lorakit[hf]')") from None
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(folder))
        archs = getattr(cfg, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        return (cls or transformers.AutoModel).from_pretrained(str(folder)).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: cannot load the Hugging Face model: {e}") from None


def _select(paths: Iterable[str], include: Optional[str], exclude: Optional[str]) -> list[str]:
    """Paths where re.search(include) matches and re.search(exclude) does not."""
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise LoraError(f"invalid --include/--exclude regular expression: {e}") from None
    return [p for p in paths if (inc is None or inc.search(p)) and not (exc and exc.search(p))]


def pair_checkpoints(base: Checkpoint, tuned: Checkpoint) -> list[str]:
    """Module paths common to both, in base order; raises listing every mismatch at once."""
    missing = [p for p in base.modules if p not in tuned.modules]
    extra = [p for p in tuned.modules if p not in base.modules]
    shapes = [f"{p}: {list(base.shape(p))} vs {list(tuned.shape(p))}" for p in base.modules
              if p in tuned.modules and base.shape(p) != tuned.shape(p)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights only in the base: {preview(missing)}")
    if extra:
        problems.append(f"{len(extra)} weights only in the tuned checkpoint: {preview(extra)}")
    if shapes:
        problems.append("shape mismatches (base vs tuned): " + "; ".join(shapes[:12]))
    if problems:
        raise CheckpointError(f"{base.source} and {tuned.source} are not the same architecture: "
                              + " | ".join(problems))
    return list(base.modules)


def changed_others(base: Checkpoint, tuned: Checkpoint, used: Iterable[str]) -> list[str]:
    """Tensors other than ``used`` module weights that differ between the checkpoints (biases, norms, ...)."""
    used_keys = {base.modules[p][1] for p in used}
    out = []
    for key in base.tensors:
        if key in used_keys or key not in tuned.tensors:
            continue
        b, t = base.tensors[key], tuned.tensors[key]
        if b.shape != t.shape or not torch.equal(b, t.to(b.dtype)):
            out.append(key)
    return out
