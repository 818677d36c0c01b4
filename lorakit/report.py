"""The parameter report users print: what trains, what is frozen, what LoRA adds.

    >>> print(lorakit.parameter_report(model))
    module                      parameter  shape        params  trainable
    ...
    trainable: 50,000 of 25,050,000 (0.200%) | base 25,000,000 | LoRA adds 50,000 (+0.200%)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from .layers import LoraLayer, SavedModule


@dataclass(frozen=True)
class ReportRow:
    module: str          # dotted module path
    parameter: str       # weight, bias, lora_A, lora_B, ...
    adapter: Optional[str]  # adapter name for LoRA / saved-copy parameters, None for base parameters
    shape: tuple
    numel: int
    trainable: bool


@dataclass(frozen=True)
class ParameterReport:
    rows: list[ReportRow]

    @property
    def total(self) -> int:
        """Every parameter, base and adapters."""
        return sum(r.numel for r in self.rows)

    @property
    def trainable(self) -> int:
        return sum(r.numel for r in self.rows if r.trainable)

    @property
    def base(self) -> int:
        """Parameters of the original model (no adapter)."""
        return sum(r.numel for r in self.rows if r.adapter is None)

    @property
    def lora(self) -> int:
        """Parameters added by adapters (all of them)."""
        return sum(r.numel for r in self.rows if r.adapter is not None)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def table(self, max_rows: int = 60) -> str:
        head = ("module", "parameter", "adapter", "shape", "params", "trainable")
        body = [(r.module or ".", r.parameter, r.adapter or "-", "x".join(map(str, r.shape)) or "scalar",
                 f"{r.numel:,}", "yes" if r.trainable else "no") for r in self.rows]
        if len(body) > max_rows:
            half = max_rows // 2
            body = body[:half] + [("...", f"({len(body) - max_rows} rows)", "", "", "", "")] + body[-half:]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        fmt = "  ".join("{:<%d}" % w if i < 4 else "{:>%d}" % w for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body]
        return "\n".join(lines)

    def summary(self) -> str:
        pct = 100.0 * self.lora / self.base if self.base else 0.0
        return (f"trainable: {self.trainable:,} of {self.total:,} ({self.trainable_percent:.3f}%) | "
                f"base {self.base:,} | LoRA adds {self.lora:,} (+{pct:.3f}%)")

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


def parameter_report(model: nn.Module) -> ParameterReport:
    """Every parameter of ``model`` with its shape, count, and whether it trains.

    Rows use the model's own module paths (lorakit's ``.base`` / ``.adapters.<name>``
    wrappers are hidden) and name the adapter a parameter belongs to; tied weights count once.
    """
    rows, seen = [], set()
    prefixes = _wrapper_prefixes(model)
    for name, p in model.named_parameters():
        if id(p) in seen:     # tied weights count once
            continue
        seen.add(id(p))
        module, adapter, pname = _split(name, prefixes)
        rows.append(ReportRow(module, pname, adapter, tuple(p.shape), p.numel(), p.requires_grad))
    return ParameterReport(rows)


def _wrapper_prefixes(model: nn.Module) -> list[tuple[str, str, Optional[str]]]:
    """(parameter-name prefix inside a wrapper, the model's module path, adapter name or None),
    longest prefixes first."""
    from .inject import walk
    out = []
    for path, m in walk(model):
        if isinstance(m, LoraLayer):
            out.append((f"{path}.base.", path, None))
            out += [(f"{path}.adapters.{a}.", path, a) for a in m.adapters]
        elif isinstance(m, SavedModule):
            out.append((f"{path}.base.", path, None))
            out += [(f"{path}.copies.{a}.", path, a) for a in m.copies]
    return sorted(out, key=lambda t: -len(t[0]))


def _split(name: str, prefixes) -> tuple[str, Optional[str], str]:
    """A parameter's (module path as the user sees it, adapter name, parameter name)."""
    for prefix, path, adapter in prefixes:
        if name.startswith(prefix):
            rest = name[len(prefix):]                       # "weight", "lora_A", "0.weight", ...
            sub, _, pname = rest.rpartition(".")
            return (f"{path}.{sub}" if sub else path), adapter, pname
    module, _, pname = name.rpartition(".")
    return module, None, pname


__all__ = ["ParameterReport", "ReportRow", "parameter_report"]
