"""Crash-safe writes: a file, or a whole folder, is replaced all at once or not at all.

One file, ``atomic_write_bytes(path, data)``::

    .NAME.lorakit-tmp-PID-RAND   1. written beside NAME, 2. fsync'ed,
    NAME                         3. renamed over NAME, 4. the folder fsync'ed

A reader, or a crash at any moment, sees the old NAME or the new one, never a part.

A folder, ``atomic_save_folder(path, writer)`` (an adapter, a checkpoint)::

    1. writer(new) fills a fresh hidden folder beside path      .NAME.lorakit-new-TAG
       (files written with write_new_file: each fsync'ed; then the folder is)
    2. entries of the old folder that writer did not write (a README, other adapters'
       subfolders) are hard-linked into the new one (copied where links are impossible)
    3. rename path -> .NAME.lorakit-old-TAG       <- the commit point
    4. rename new  -> path, fsync the parent
    5. delete the old folder

A crash before 3 leaves ``path`` as it was (the new folder is a leftover). A crash between
3 and 4 leaves no folder at ``path`` but a complete new one beside it, next to its
old-TAG twin: ``resolve_folder(path)`` finds it there (read-only: a reader never writes),
and the next save of ``path`` finishes the swap. After 4, ``path`` is the new folder.
Whenever ``path`` exists it is what a reader gets: a file edited by hand there is read as
written, never replaced by a hidden copy. Leftovers of crashed saves (those whose process
is gone) are removed by the next save of the same path.

Assumptions: one writer per path at a time, on one host (leftovers are matched to their
writer by process id); POSIX rename semantics (local file systems; NFS mostly).
Failures (a full disk, a read-only folder, no permission) raise :class:`FileWriteError`,
a LoraError that is also an OSError, naming the path, the reason and the state left on
disk: the old files are kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import LoraError

PathLike = Union[str, os.PathLike]

_KINDS = ("tmp", "new", "old")
_IN_FLIGHT: set[str] = set()          # temporaries this process is writing right now (never cleaned)
_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.ENAMETOOLONG: "file name too long"}


class FileWriteError(LoraError, OSError):
    """A save could not be completed (full disk, read-only folder, permissions, ...).

    Also an OSError (``errno`` is the cause's), so ``except OSError`` handlers keep working.
    """

    def __init__(self, message: str, err: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = err


def _error(e: OSError, target: Path, kept: str) -> FileWriteError:
    reason = _REASONS.get(e.errno or -1, e.strerror or str(e))
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return FileWriteError(f"{target}: cannot save: {reason}{where}; {kept}", e.errno)


# ------------------------------------------------------------------------------ small steps
def fsync_dir(path: PathLike) -> None:
    """fsync a folder so that renames and new entries in it survive a power loss.

    File systems that cannot sync a folder (EINVAL, ENOTSUP) are skipped silently.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_new_file(path: PathLike, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data`` completely and fsync it.

    For files inside a folder being built by ``atomic_save_folder``'s writer. The mode
    follows the umask (rw-r--r-- with the usual 022).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    try:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _tag() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _sibling(path: Path, kind: str, tag: str) -> Path:
    return path.with_name(f".{path.name}.lorakit-{kind}-{tag}")


def _leftover_re(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.lorakit-({'|'.join(_KINDS)})-(\d+)-([0-9a-f]+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                    # EPERM: alive, someone else's
        return True
    return True


def _leftovers(path: Path) -> list[tuple[str, str, Path]]:
    """(kind, tag, path) of the hidden temporaries of ``path`` whose writer is gone."""
    pattern = _leftover_re(path.name)
    found = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for entry in names:
        m = pattern.match(entry)
        if not m:
            continue
        full = path.parent / entry
        pid, tag = int(m.group(2)), f"{m.group(2)}-{m.group(3)}"
        stale = (str(full) not in _IN_FLIGHT) if pid == os.getpid() else not _alive(pid)
        if stale:
            found.append((m.group(1), tag, full))
    return found


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        os.unlink(p)


# ------------------------------------------------------------------------------ one file
def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it: fsync, rename, fsync the folder.

    A reader sees the old file or the new one, never a half-written one; on an error the old
    file is kept and a :class:`FileWriteError` names the reason. Leftover temporaries of
    ``path`` from crashed writers are removed first.
    """
    path = Path(path)
    for _, _, p in _leftovers(path):
        if p.is_file():
            with contextlib.suppress(OSError):
                os.unlink(p)
    tmp = _sibling(path, "tmp", _tag())
    _IN_FLIGHT.add(str(tmp))
    try:
        write_new_file(tmp, data)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _error(e, path, "the previous file, if any, is unchanged") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        _IN_FLIGHT.discard(str(tmp))


# ------------------------------------------------------------------------------ a folder
def resolve_folder(path: PathLike) -> Optional[Path]:
    """Where the folder saved at ``path`` is now: ``path`` itself when it exists (always, even
    if hidden temporaries lie beside it), else the complete new folder of a swap that was
    interrupted after its commit point, else None. Reads only; never changes the disk.

    A save running concurrently may move folders between our looks; looking again a few
    times makes a reader see the old folder or the new one, never nothing."""
    path = Path(path)
    for _ in range(8):
        if os.path.lexists(path):
            return path
        found = _committed_new(path)
        if found is not None:
            return found
    return path if os.path.lexists(path) else None


def _committed_new(path: Path) -> Optional[Path]:
    pattern = _leftover_re(path.name)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return None
    tags: dict[str, set] = {}
    for entry in names:
        m = pattern.match(entry)
        if m:
            tags.setdefault(f"{m.group(2)}-{m.group(3)}", set()).add(m.group(1))
    news = [_sibling(path, "new", t) for t, kinds in sorted(tags.items()) if {"new", "old"} <= kinds]
    if not news:
        return None
    return max(news, key=lambda p: p.stat().st_mtime_ns if p.exists() else -1)


def repair_folder(path: PathLike) -> None:
    """Finish a swap of ``path`` interrupted after its commit point (rename its new folder into
    place) and delete leftovers of crashed saves. Run by every save of ``path`` before it starts."""
    path = Path(path)
    stale = _leftovers(path)
    if not os.path.lexists(path):
        found = resolve_folder(path)
        if found is not None and any(p == found for _, _, p in stale):
            os.rename(found, path)
            fsync_dir(path.parent)
            stale = [s for s in stale if s[2] != found]
    for _, _, p in stale:
        with contextlib.suppress(OSError):
            _remove(p)


def repair_all(folder: PathLike) -> list[Path]:
    """repair_folder for every entry of ``folder`` that has leftovers of crashed saves (for folders
    of many saved folders, e.g. checkpoints/step-N, where a crashed name may never be saved again).
    Returns the paths repaired."""
    folder = Path(folder)
    pattern = re.compile(rf"^\.(.+)\.lorakit-({'|'.join(_KINDS)})-\d+-[0-9a-f]+$")
    try:
        names = sorted({m.group(1) for m in map(pattern.match, os.listdir(folder)) if m})
    except FileNotFoundError:
        return []
    for name in names:
        repair_folder(folder / name)
    return [folder / name for name in names]


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` every entry of ``old`` that ``new`` lacks; symlinks are
    recreated as links (never followed); folders are rebuilt entry by entry."""
    for entry in os.scandir(old):
        dst = new / entry.name
        if os.path.lexists(dst):
            if entry.is_dir(follow_symlinks=False) and dst.is_dir() and not dst.is_symlink():
                _carry_over(Path(entry.path), dst)
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(dst)
            _carry_over(Path(entry.path), dst)
        elif entry.is_file(follow_symlinks=False):
            try:
                os.link(entry.path, dst, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry.path, dst, follow_symlinks=False)


def atomic_save_folder(path: PathLike, writer: Callable[[Path], None], keep_others: bool = True) -> Path:
    """Build a folder with ``writer(tmp_folder)`` and put it at ``path`` in one crash-safe swap.

    ``writer`` gets a fresh, empty, private folder beside ``path`` and writes its files there
    (use :func:`write_new_file`, or any writes followed by ``fsync``). With ``keep_others``,
    entries of an existing ``path`` that ``writer`` did not write are kept (hard-linked).
    After a crash at any moment, ``path`` (read through :func:`resolve_folder`) is the
    complete old folder or the complete new one. Returns ``path``.
    """
    path = Path(os.path.abspath(path))
    if path.is_symlink():
        path = path.resolve()
    if os.path.lexists(path) and not path.is_dir():
        raise FileWriteError(f"{path}: exists and is not a folder; not replacing it")
    kept = "the existing folder is unchanged"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_folder(path)
    except OSError as e:
        raise _error(e, path, kept) from None
    tag = _tag()
    new, old = _sibling(path, "new", tag), _sibling(path, "old", tag)
    _IN_FLIGHT.update((str(new), str(old)))
    try:
        _build(path, new, writer, keep_others, kept)
        _swap(path, new, old)
    finally:
        _IN_FLIGHT.difference_update((str(new), str(old)))
    return path


def _build(path: Path, new: Path, writer: Callable[[Path], None], keep_others: bool, kept: str) -> None:
    """Steps 1 and 2: the complete new folder beside ``path`` (removed again on any error)."""
    try:
        os.mkdir(new)
        if path.is_dir():
            os.chmod(new, stat.S_IMODE(path.stat().st_mode))
        writer(new)
        if keep_others and path.is_dir():
            _carry_over(path, new)
        fsync_dir(new)
    except BaseException as e:
        with contextlib.suppress(OSError):
            shutil.rmtree(new)
        if isinstance(e, OSError) and not isinstance(e, LoraError):
            raise _error(e, path, kept) from None
        raise


def _swap(path: Path, new: Path, old: Path) -> None:
    """Steps 3 to 5: old out, new in. A failure between the two renames moves the old folder back;
    if even that fails, both stay (resolve_folder reads the new one, the next save finishes)."""
    existed, moved = path.is_dir(), False
    try:
        if existed:
            os.rename(path, old)
            moved = True
        os.rename(new, path)
    except OSError as e:
        if moved:
            try:
                os.rename(old, path)
            except OSError:
                raise _error(e, path, f"the swap stopped half-way: the complete new folder is at {new} and "
                                      f"the old one at {old}; loading {path} reads the new one and the next "
                                      "save finishes the swap") from None
        with contextlib.suppress(OSError):
            shutil.rmtree(new)
        raise _error(e, path, "the existing folder is unchanged") from None
    try:
        fsync_dir(path.parent)
    except OSError as e:
        raise _error(e, path, "the new folder is in place, but syncing its parent failed: it may not "
                              "survive a power loss; save again") from None
    finally:
        if existed:
            with contextlib.suppress(OSError):
                shutil.rmtree(old)


__all__ = ["FileWriteError", "atomic_write_bytes", "atomic_save_folder", "write_new_file", "fsync_dir",
           "resolve_folder", "repair_folder", "repair_all"]
