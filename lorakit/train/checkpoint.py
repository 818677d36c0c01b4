"""Checkpoints: everything a run needs to continue exactly where it stopped.

    out_dir/checkpoints/step-000200/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT layout)
        trainer_state.pt     optimizer + scheduler + RNG states (torch.save; loaded with weights_only=True)
        trainer_state.json   step, data position, metrics of that step, the run's config (written last)

A checkpoint is built in a hidden folder next to the others (each file fsynced) and swapped
into place by ``lorakit.atomic.atomic_save_folder``: a crash at any moment leaves either the
complete new checkpoint or none, and the previous ones untouched; leftovers of a crash are
repaired or removed by the next save (``atomic.repair_all``). Only the last ``keep_last``
checkpoints stay on disk.

Resume refuses a checkpoint made for another base model (the adapter's base fingerprint,
see lorakit.fingerprint) or another adapter config, naming the difference.

On resume, the RNG states (torch CPU and CUDA, Python's ``random``) are restored after
the model is built, so dropout masks and data order continue as if never interrupted: on
the CPU a resumed run's losses are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import LoraError
from ..io import read_tensors

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
    """Write checkpoint ``step`` crash-safely, then delete all but the newest ``keep_last``.

    The folder is built beside its final name and swapped in by ``lorakit.atomic``: after a
    crash at any moment the step's folder is complete (old or new) or absent, and earlier
    checkpoints are untouched. Leftovers of an earlier crash are repaired or removed first.
    """
    from ..atomic import atomic_save_folder, repair_all, write_new_file
    from ..io import write_adapter_files
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    repair_all(root)
    states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    buf = io.BytesIO()
    torch.save(states, buf)
    meta = {"step": step, "data": data_state, "adapter_name": adapter_name, **(info or {})}

    def write(folder: Path) -> None:
        write_adapter_files(model, folder, name=adapter_name)       # refuses non-finite weights
        write_new_file(folder / STATE_PT, buf.getvalue())
        write_new_file(folder / STATE_JSON, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())  # last

    final = atomic_save_folder(root / f"step-{step:06d}", write, keep_others=False)
    for _, old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    """The newest complete checkpoint of ``out_dir`` (None when there is none). A swap that a
    crash interrupted is finished first (lorakit.atomic.repair_all), so it is found."""
    from ..atomic import repair_all
    if checkpoint_dir(out_dir).is_dir():
        repair_all(checkpoint_dir(out_dir))
    found = list_checkpoints(out_dir)
    return read_checkpoint(found[-1][1]) if found else None


def check_compatible(ckpt: Checkpoint, config: dict[str, Any], model) -> None:
    """Refuse to resume from a checkpoint made for another base model or adapter config.

    ``config`` is this run's TrainConfig.to_dict(); the model and lora sections must equal the
    checkpoint's, and the adapter file's base fingerprint must match ``model``.
    """
    from ..fingerprint import BaseModelMismatch, check_base
    from ..io import WEIGHTS_NAME, read_metadata
    saved = ckpt.info.get("config") or {}
    diffs = []
    for section in ("model", "lora"):
        old, new = saved.get(section) or {}, config.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if section == "model" and key == "device":
                continue                      # moving a run to another device is fine
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: checkpoint {old.get(key)!r}, this run {new.get(key)!r}")
    if diffs:
        raise CheckpointError(f"{ckpt.path}: made for another configuration, cannot resume: " + "; ".join(diffs)
                              + ". Resume with the checkpoint's settings, or start a new out_dir")
    try:
        check_base(model, read_metadata(ckpt.path / WEIGHTS_NAME), str(ckpt.path / WEIGHTS_NAME), strict=True)
    except BaseModelMismatch as e:
        raise CheckpointError(f"cannot resume on this base model: {e}") from None


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


__all__ = ["Checkpoint", "CheckpointError", "check_compatible", "save_checkpoint", "read_checkpoint", "latest_checkpoint",
           "list_checkpoints", "restore", "rng_state", "set_rng_state"]
