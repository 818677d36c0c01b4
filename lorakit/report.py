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
    """Every parameter of ``model`` with its shape, count, and whether it trains."""
    rows, seen = [], set()
    owners = _owners(model)
    for name, p in model.named_parameters():
        if id(p) in seen:     # tied weights count once
            continue
        seen.add(id(p))
        module, _, pname = name.rpartition(".")
        adapter = owners.get(id(p))
        rows.append(ReportRow(_clean(module), pname, adapter, tuple(p.shape), p.numel(), p.requires_grad))
    return ParameterReport(rows)


def _owners(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> adapter name, for LoRA and modules_to_save copies."""
    owners = {}
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for aname, a in m.adapters.items():
                for p in a.parameters():
                    owners[id(p)] = aname
        elif isinstance(m, SavedModule):
            for aname, c in m.copies.items():
                for p in c.parameters():
                    owners[id(p)] = aname
    return owners


def _clean(module_path: str) -> str:
    """Show the model's own path: drop lorakit's internal '.base' / '.adapters.<name>' parts."""
    parts = module_path.split(".")
    out, i = [], 0
    while i < len(parts):
        if parts[i] in ("adapters", "copies") and i + 1 < len(parts):
            i += 2
            continue
        if parts[i] == "base":
            i += 1
            continue
        out.append(parts[i])
        i += 1
    return ".".join(out)


__all__ = ["ParameterReport", "ReportRow", "parameter_report"]
