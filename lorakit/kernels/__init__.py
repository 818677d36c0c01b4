"""Optional Triton kernels for CUDA GPUs. Each module imports triton at the top, so import it
only where Triton is available (``load``); every kernel has a plain-PyTorch reference and a GPU test."""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Iterator, Optional

_LOADED: dict[str, Optional[ModuleType]] = {}


def load(name: str) -> Optional[ModuleType]:
    """``lorakit.kernels.<name>``, or None when Triton cannot be imported (tried once per name)."""
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError:          # no Triton (CPU-only installs)
            _LOADED[name] = None
    return _LOADED[name]


@contextlib.contextmanager
def disabled(name: str) -> Iterator[None]:
    """Within the block, ``load(name)`` returns None: the callers run their torch fallback
    (benchmarks compare the two)."""
    load(name)
    saved = _LOADED[name]
    _LOADED[name] = None
    try:
        yield
    finally:
        _LOADED[name] = saved
