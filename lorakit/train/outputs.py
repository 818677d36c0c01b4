"""What a training run leaves on disk besides checkpoints: metrics, the loss curve, the
adapter's README, the resolved config. Only the main process writes (see ``Dist``)."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..io import atomic_write_bytes

METRIC_FIELDS = ("step", "loss", "eval_loss", "lr", "tokens_per_s", "tokens", "elapsed_s", "grad_norm", "skipped",
                 "bad_steps")


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly distributed) run. No global state: the loop gets
    one of these and writes files only when ``is_main``."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Dist":
        """From torchrun's RANK / WORLD_SIZE variables (a single process when unset)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def write_text(path: Path, text: str) -> None:
    """Atomic text write (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))


class MetricsLog:
    """Appends one JSON line per step to ``metrics.jsonl`` (flushed each time, so a crashed run
    keeps its metrics) and writes ``metrics.csv`` from it at the end."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []

    def truncate_after(self, step: int) -> None:
        """On resume: keep the rows of steps <= ``step`` (later ones were lost with the crash)."""
        if not self.path.exists():
            return
        kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        self.rows = [r for r in kept if r["step"] <= step]
        if self.enabled:
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def reset(self) -> None:
        self.rows = []
        if self.enabled and self.path.exists():
            self.path.unlink()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()

    def write_csv(self) -> Path:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_FIELDS})
        path = self.path.with_suffix(".csv")
        if self.enabled:
            write_text(path, buf.getvalue())
        return path


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str = "LoRA training") -> Optional[Path]:
    """Train loss per step and eval loss where measured, as a PNG (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in rows], lw=1.2, label="train loss")
    ev = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", lw=1.5, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def adapter_readme(base: str, data: dict[str, Any], steps: int, train_loss: Optional[float],
                   eval_loss: Optional[float], lora: dict[str, Any], seconds: float) -> str:
    """A short README saved next to the final adapter."""
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"
    return (
        "# LoRA adapter (lorakit)\n\n"
        f"- base model: `{base}`\n"
        f"- training data: `{data.get('train_file')}` ({data.get('examples')} examples, format "
        f"{data.get('format')}); validation: {data.get('valid')}\n"
        f"- steps: {steps} ({seconds:.0f} s)\n"
        f"- final train loss: {fmt(train_loss)}; final eval loss: {fmt(eval_loss)}\n"
        f"- rank {lora.get('r')}, alpha {lora.get('alpha')}, targets {lora.get('target_modules')}\n\n"
        "Load it with lorakit (`lorakit.load_adapter(model, this_folder)`) or PEFT "
        "(`PeftModel.from_pretrained(model, this_folder)`); try it with "
        "`lorakit generate --adapter this_folder --prompt ...`.\n")


__all__ = ["Dist", "MetricsLog", "plot_losses", "adapter_readme", "write_text"]
