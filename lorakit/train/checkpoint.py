"""Checkpoints: everything a run needs to continue exactly where it stopped.

    out_dir/checkpoints/step-000200/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT layout)
        trainer_state.pt     optimizer + scheduler + RNG states (torch.save; loaded with weights_only=True)
        trainer_state.json   step, data position, metrics of that step, the run's config (written last)

A checkpoint is built in a hidden temporary folder next to the others (each file written
to a temporary file and renamed) and published with one ``os.replace`` of the folder: a
crash at any moment leaves either the complete new checkpoint or none, and the previous
ones untouched. Hidden leftovers of a crash are removed by the next save. Only the last
``keep_last`` checkpoints stay on disk.

On resume, the RNG states (torch CPU and CUDA, Python's ``random``) are restored after
the model is built, so dropout masks and data order continue as if never interrupted: on
the CPU a resumed run's losses are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import LoraError
from ..io import atomic_write_bytes, read_tensors, save_adapter

STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(LoraError):
    """A checkpoint cannot be written, found or restored (the message names the folder)."""


@dataclass
class Checkpoint:
    """A checkpoint read from disk: the folder, its step and its states."""

    path: Path
    step: int
    info: dict[str, Any]          # trainer_state.json
    states: dict[str, Any]        # trainer_state.pt


# ------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: torch CPU, each CUDA device, Python's random."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------ saving
def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints, oldest first (hidden temporaries ignored)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_JSON).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(out_dir: str | Path, step: int, model, adapter_name: str, optimizer, scheduler,
                    data_state: dict[str, Any], info: Optional[dict[str, Any]] = None, keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_adapter(model, tmp, name=adapter_name)
        states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
        buf = io.BytesIO()
        torch.save(states, buf)
        atomic_write_bytes(tmp / STATE_PT, buf.getvalue())
        meta = {"step": step, "data": data_state, "adapter_name": adapter_name, **(info or {})}
        atomic_write_bytes(tmp / STATE_JSON, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        _fsync_dir(tmp)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    for _, old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` (the same step saved again) is swapped out."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _remove_leftovers(root: Path) -> None:
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ loading
def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read one checkpoint folder (states loaded with weights_only=True: no code runs)."""
    path = Path(path)
    try:
        info = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        states = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except Exception as e:     # OSError, JSON errors, torch's UnpicklingError / RuntimeError on a bad file
        raise CheckpointError(f"{path}: unreadable checkpoint: {e}") from None
    return Checkpoint(path, int(info["step"]), info, states)


def latest_checkpoint(out_dir: str | Path) -> Optional[Checkpoint]:
    """The newest complete checkpoint of ``out_dir`` (None when there is none)."""
    found = list_checkpoints(out_dir)
    return read_checkpoint(found[-1][1]) if found else None


def restore(ckpt: Checkpoint, model, adapter_name: str, optimizer, scheduler) -> None:
    """Put the adapter weights, optimizer, scheduler and RNG states of ``ckpt`` back in place.

    The adapter file is validated against the model first (same keys and shapes).
    """
    from ..io import WEIGHTS_NAME, lora_state_dict
    saved = read_tensors(ckpt.path / WEIGHTS_NAME)
    current = lora_state_dict(model, adapter_name)        # detached views of the live parameters
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    bad = [k for k in current if k in saved and saved[k].shape != current[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"{ckpt.path}: the checkpoint's adapter does not fit this run's adapter "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {bad[:5]}); "
                              "resume with the same model and lora settings, or start a new out_dir")
    with torch.no_grad():
        for k, t in current.items():
            t.copy_(saved[k])
    optimizer.load_state_dict(ckpt.states["optimizer"])
    scheduler.load_state_dict(ckpt.states["scheduler"])
    set_rng_state(ckpt.states["rng"])


__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "read_checkpoint", "latest_checkpoint",
           "list_checkpoints", "restore", "rng_state", "set_rng_state"]
