"""Finding and opening an adapter's files safely.

``path`` may be an adapter folder, its safetensors file, or a folder whose subfolder
``name`` holds the adapter (PEFT's multi-adapter layout). Both files are opened from one
view of the folder, so a concurrent save that swaps the folder cannot mix an old config
with new weights; a folder whose save was interrupted mid-swap is found where the swap left
it (lorakit.atomic.resolve_folder). Pickle files are refused, never unpickled, and no file
is read through a symlink that leads out of the adapter folder.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .atomic import resolve_folder
from .errors import AdapterFormatError
from .inject import check_adapter_name
from .tensorfile import link_target, open_inside, open_regular_fd

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

PathLike = Union[str, os.PathLike]


@dataclass
class AdapterFiles:
    """An adapter's two files, opened from one view of its folder (a save that swaps the folder
    meanwhile cannot mix the old config with the new weights)."""

    folder: Path
    config: Path
    weights: Path
    config_fd: int
    weights_fd: int

    def close(self) -> None:
        for fd in (self.config_fd, self.weights_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Moved(Exception):
    """The folder changed while being opened (a concurrent save): look it up again."""


def _pickle_message(p: Path) -> str:
    return (f"{p}: refusing to load a pickle file (unpickling can run arbitrary code). If you trust it, "
            "convert it once: `from safetensors.torch import save_file; save_file(torch.load(PATH, "
            "weights_only=True), 'adapter_model.safetensors')`")


def _locate(path: PathLike, name: Optional[str]) -> tuple[Path, Optional[Path]]:
    """(folder, the weights file when ``path`` names it). Recovers a folder whose save was
    interrupted mid-swap (lorakit.atomic.resolve_folder); ``path/name`` wins over ``path``."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterFormatError(_pickle_message(p))
        return p.parent, p
    folder = resolve_folder(p)
    if folder is None:
        raise AdapterFormatError(f"{p}: no such adapter folder")
    if name:
        check_adapter_name(name)
        sub = resolve_folder(folder / name)
        if sub is not None and (sub / CONFIG_NAME).exists():
            if sub.is_symlink():
                link_target(folder, name)          # refuses a subfolder link that leads outside
            folder = sub
    return folder, None


def _same_folder(folder: Path, dfd: int) -> bool:
    try:
        a, b = os.stat(folder), os.fstat(dfd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _missing_weights(folder: Path) -> AdapterFormatError:
    pickles = [folder / n for n in PICKLE_NAMES if (folder / n).exists()]
    if pickles:
        return AdapterFormatError(_pickle_message(pickles[0]))
    subs = sorted(c.parent.name for c in folder.glob(f"*/{CONFIG_NAME}") if not c.parent.name.startswith("."))
    hint = f"; subfolders with adapters: {subs} (pass name=...)" if subs else ""
    return AdapterFormatError(f"{folder}: no {WEIGHTS_NAME}{hint}")


def _open_one(folder: Path, dfd: int, fname: str, explicit: Optional[Path], missing) -> int:
    try:
        if explicit is not None:
            return open_regular_fd(explicit)
        return open_inside(folder, fname, dfd)
    except FileNotFoundError:
        if _same_folder(folder, dfd):
            raise missing() from None
        raise _Moved() from None
    except OSError as e:
        raise AdapterFormatError(f"{explicit or folder / fname}: cannot open: {e.strerror}") from None


def _open(folder: Path, explicit: Optional[Path]) -> AdapterFiles:
    try:
        dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _Moved() from None
    except OSError as e:
        raise AdapterFormatError(f"{folder}: cannot open the adapter folder: {e.strerror}") from None
    try:
        weights = explicit or folder / WEIGHTS_NAME
        wfd = _open_one(folder, dfd, WEIGHTS_NAME, explicit, lambda: _missing_weights(folder))
        try:
            cfd = _open_one(folder, dfd, CONFIG_NAME, None, lambda: AdapterFormatError(
                f"{folder}: no {CONFIG_NAME} beside {weights.name}"))
        except BaseException:
            os.close(wfd)
            raise
        return AdapterFiles(folder, folder / CONFIG_NAME, weights, cfd, wfd)
    finally:
        os.close(dfd)


def open_adapter(path: PathLike, name: Optional[str] = None) -> AdapterFiles:
    """Open the config and weights of the adapter at ``path`` (see find_adapter_files); close()
    them after use. Refuses pickle files, and symlinks that lead out of the folder."""
    for _ in range(5):
        try:
            folder, explicit = _locate(path, name)
            return _open(folder, explicit)
        except _Moved:
            continue
        except OSError as e:
            raise AdapterFormatError(f"{path}: cannot read the adapter: {e}") from None
    raise AdapterFormatError(f"{path}: the adapter folder kept changing while being opened (another process "
                             "saving it?); try again")


def find_adapter_files(path: PathLike, name: Optional[str] = None) -> tuple[Path, Path]:
    """(config file, weights file) for an adapter folder, refusing pickle files.

    ``path`` may be the folder, its safetensors file, or a folder whose subfolder ``name``
    holds the adapter (PEFT saves non-default adapters so). When ``path/name`` holds an
    adapter it wins over one directly in ``path`` (PEFT's multi-adapter layout puts the
    default adapter at the top); pass the top-level file's path to load that one instead.
    A folder whose save was interrupted mid-swap is found where the swap left it.
    """
    files = open_adapter(path, name)
    files.close()
    return files.config, files.weights
