"""Errors raised by lorakit.

Every error is a :class:`LoraError`, itself a :class:`ValueError`, so callers can
catch one type. Messages name the module path, key or file, what was expected and
what was found, and how to fix it; all problems found are reported in one message.
"""

from __future__ import annotations


class LoraError(ValueError):
    """Base class of every error lorakit raises on bad input or bad state."""


class ConfigError(LoraError):
    """A LoraConfig field (or an adapter_config.json value) is out of range or of the wrong type."""


class TargetNotFound(LoraError):
    """target_modules matched no module of the model."""


class UnsupportedModule(LoraError):
    """A pattern matched a module whose type lorakit cannot adapt."""


class AdapterNotFound(LoraError):
    """An adapter name is not registered on the model (the message lists those that are)."""


class AdapterExists(LoraError):
    """An adapter with this name is already registered on the model."""


class ShapeMismatch(LoraError):
    """A tensor's shape does not fit the module it is meant for."""


class AdapterFormatError(LoraError):
    """An adapter file or folder is malformed: missing/unexpected keys, pickle files, bad header, ..."""


class CheckpointError(LoraError):
    """A model checkpoint cannot be read, or two checkpoints do not have the same architecture."""


class MergedStateError(LoraError):
    """The operation is not allowed while an adapter is merged into the base weights (unmerge first)."""


def preview(items, limit: int = 12) -> str:
    """Format a list for an error message: the first ``limit`` items and a count of the rest."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return "[" + shown + "]"
