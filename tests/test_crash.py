"""Crash safety of saves (lorakit.atomic through save_adapter): after a crash at any moment the
path holds the complete old adapter or the complete new one, never a mix and never nothing;
the next save removes the leftovers; a full disk or a read-only folder keeps the old files.

Two kinds of crash: injected in-process at every file-system step of a save in turn (each
open, write, fsync, close, mkdir, link, rename, unlink: from that step on every call fails,
as if the process had died, and a crash inside a write first writes half of it), and real
SIGKILLs of a forked process that keeps saving, at random moments.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import MLP, randomize_adapters

import lorakit
from lorakit.atomic import FileWriteError, atomic_write_bytes

STEPS = ("open", "write", "fsync", "close", "mkdir", "chmod", "link", "symlink", "rename", "replace", "unlink",
         "rmdir")


def base() -> MLP:
    torch.manual_seed(0)
    return MLP()


def source(r: int, alpha: float, seed: int) -> MLP:
    """An MLP with one adapter of rank ``r``; different ranks make a mixed config/weights pair unloadable."""
    m = base()
    lorakit.inject(m, lorakit.LoraConfig(r=r, alpha=alpha, target_modules=["layers.0", "layers.2"]))
    randomize_adapters(m, seed=seed)
    return m


OLD, NEW, NEWER = source(2, 4.0, 1), source(3, 5.0, 2), source(4, 6.0, 3)
VERSIONS = {"old": OLD, "new": NEW, "newer": NEWER}


def which(path: Path) -> str:
    """Load ``path`` onto a fresh base and say which version it is, exactly (every tensor and r, alpha)."""
    m = base()
    lorakit.load_adapter(m, path)
    sd, cfg = lorakit.lora_state_dict(m), lorakit.get_config(m)
    for label, src in VERSIONS.items():
        ref, ref_cfg = lorakit.lora_state_dict(src), lorakit.get_config(src)
        if (sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
                and (cfg.r, cfg.alpha) == (ref_cfg.r, ref_cfg.alpha)):
            return label
    raise AssertionError(f"{path} holds none of the saved versions (a mix?)")


class Crash(BaseException):
    """The process 'dies': not an Exception, so no `except Exception` handler swallows it."""


class Injector:
    """Count the os-level steps of a save; at step ``at`` crash, and fail every later step."""

    def __init__(self, at=None):
        self.at, self.count, self.dead, self.log = at, 0, False, []

    def install(self, mp: pytest.MonkeyPatch) -> None:
        for fname in STEPS:
            mp.setattr(os, fname, self._wrap(fname, getattr(os, fname)))

    def _wrap(self, fname, real):
        def step(*args, **kwargs):
            if self.dead:
                raise Crash(f"dead: os.{fname}")
            i, self.count = self.count, self.count + 1
            self.log.append(fname)
            if i == self.at:
                self.dead = True
                if fname == "write":
                    data = bytes(args[1])
                    real(args[0], data[: len(data) // 2])          # half of the write reaches the file
                raise Crash(f"crash at step {i}: os.{fname}")
            return real(*args, **kwargs)
        return step


def hidden(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".lorakit-" in n)


def count_steps(action) -> list[str]:
    inj = Injector()
    with pytest.MonkeyPatch.context() as mp:
        inj.install(mp)
        action()
    return inj.log


@pytest.mark.parametrize("existing", [True, False], ids=["overwrite", "first-save"])
def test_crash_at_every_step_of_a_save_leaves_old_or_new(tmp_path, existing):
    def prepare(root: Path) -> Path:
        path = root / "adapter"
        if existing:
            lorakit.save_adapter(OLD, path)
            (path / "README.md").write_text("notes\n")           # kept across saves (hard-linked)
        return path

    probe = prepare(tmp_path / "probe")
    steps = count_steps(lambda: lorakit.save_adapter(NEW, probe))
    assert {"write", "fsync", "rename"} <= set(steps) and len(steps) >= 10
    outcomes = []
    for i in range(len(steps)):
        path = prepare(tmp_path / f"s{i}")
        with pytest.MonkeyPatch.context() as mp:
            Injector(at=i).install(mp)
            with pytest.raises(Crash):
                lorakit.save_adapter(NEW, path)
        # "restart": loading gives the old adapter or the new one, complete
        if existing:
            outcomes.append(which(path))
        else:
            try:
                outcomes.append(which(path))
            except lorakit.AdapterFormatError as e:           # absent is fine on a first save
                assert "no such adapter folder" in str(e)
                outcomes.append("absent")
        if existing:                                          # the README is in whichever folder is read
            folder = lorakit.io.find_adapter_files(path)[0].parent
            assert (folder / "README.md").read_text() == "notes\n"
        # the next save finishes or discards what the crash left, and removes every leftover
        lorakit.save_adapter(NEWER, path)
        assert hidden(path.parent) == [] and which(path) == "newer", (i, steps[i])
        if existing:
            assert (path / "README.md").read_text() == "notes\n"
    first = "old" if existing else "absent"
    assert outcomes[0] == first and outcomes[-1] == "new" and set(outcomes) == {first, "new"}
    switch = outcomes.index("new")
    assert outcomes[switch:] == ["new"] * (len(outcomes) - switch), outcomes     # one commit point


def test_crash_at_every_step_of_a_file_write(tmp_path):
    path = tmp_path / "f.json"
    steps = count_steps(lambda: atomic_write_bytes(path, b"x" * 1000))
    for i in range(len(steps)):
        path.write_bytes(b"old")
        with pytest.MonkeyPatch.context() as mp:
            Injector(at=i).install(mp)
            with pytest.raises(Crash):
                atomic_write_bytes(path, b"new" * 1000)
        assert path.read_bytes() in (b"old", b"new" * 1000)
        atomic_write_bytes(path, b"next")
        assert os.listdir(tmp_path) == ["f.json"] and path.read_bytes() == b"next"


def test_interrupted_swap_is_recovered_by_load_and_finished_by_the_next_save(tmp_path):
    path = tmp_path / "adapter"
    lorakit.save_adapter(OLD, path)
    lorakit.save_adapter(OLD, tmp_path / "probe" / "adapter")
    steps = count_steps(lambda: lorakit.save_adapter(NEW, tmp_path / "probe" / "adapter"))
    second_rename = [i for i, s in enumerate(steps) if s == "rename"][1]      # after path -> .old, before .new -> path
    with pytest.MonkeyPatch.context() as mp:
        Injector(at=second_rename).install(mp)
        with pytest.raises(Crash):
            lorakit.save_adapter(NEW, path)
    assert not path.exists() and len(hidden(tmp_path)) == 2                # the window: no folder at path
    assert which(path) == "new"                                             # read from the complete new folder
    assert lorakit.io.find_adapter_files(path)[0].parent.name.startswith(".adapter.lorakit-new-")
    assert not path.exists()                                                # loading wrote nothing
    lorakit.save_adapter(NEWER, path)
    assert hidden(tmp_path) == [] and which(path) == "newer"


def _child_saves_forever(path: Path, ready: int) -> None:
    os.write(ready, b"!")
    while True:
        lorakit.save_adapter(NEW, path)
        lorakit.save_adapter(OLD, path)


def test_sigkill_at_random_moments(tmp_path):
    """At least 50 trials: a forked process saving NEW and OLD in turn is killed after a random delay."""
    t0 = time.perf_counter()
    for _ in range(3):
        lorakit.save_adapter(NEW, tmp_path / "timing")
    per_save = (time.perf_counter() - t0) / 3
    rng = random.Random(7)
    seen = {"old": 0, "new": 0, "leftovers": 0}
    for trial in range(50):
        root = tmp_path / f"t{trial}"
        path = root / "adapter"
        lorakit.save_adapter(OLD, path)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                                        # the child: save until killed
            try:
                os.close(r)
                _child_saves_forever(path, w)
            finally:
                os._exit(1)
        try:
            os.close(w)
            assert os.read(r, 1) == b"!"
            time.sleep(rng.uniform(0, 4 * per_save))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
        seen["leftovers"] += bool(hidden(root))
        seen[which(path)] += 1                                              # complete, old or new
        lorakit.save_adapter(NEWER, path)
        assert hidden(root) == [] and which(path) == "newer"
    assert seen["old"] and seen["new"] and seen["leftovers"] >= 5, seen


# ---------------------------------------------------------------------------- full disk, read-only
def _fail(fname: str, err: int, after: int = 0, times: int = 10**9):
    """os.<fname> raising ``err`` after ``after`` calls, ``times`` times (os.open: only when creating a file)."""
    real = getattr(os, fname)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        if fname == "open" and not (len(args) > 1 and args[1] & os.O_CREAT):
            return real(*args, **kwargs)
        calls["n"] += 1
        if after < calls["n"] <= after + times:
            raise OSError(err, os.strerror(err), args[0] if args and isinstance(args[0], (str, Path)) else None)
        return real(*args, **kwargs)
    return failing


@pytest.mark.parametrize("fname,err,after,times,reason", [
    ("write", errno.ENOSPC, 0, 99, "no space left on the device"),
    ("write", errno.ENOSPC, 1, 99, "no space left on the device"),       # the first file fits, the second not
    ("fsync", errno.ENOSPC, 0, 99, "no space left on the device"),
    ("mkdir", errno.EROFS, 0, 99, "read-only file system"),
    ("open", errno.EACCES, 0, 99, "permission denied"),
    ("rename", errno.EROFS, 0, 99, "read-only file system"),
    ("rename", errno.EIO, 1, 1, "Input/output error"),                   # old moved aside, new cannot move in
])
def test_full_disk_or_read_only_folder_gives_a_clear_error_and_keeps_the_old_files(tmp_path, fname, err, after,
                                                                                    times, reason):
    path = tmp_path / "adapter"
    lorakit.save_adapter(OLD, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, fname, _fail(fname, err, after, times))
        with pytest.raises(FileWriteError) as e:
            lorakit.save_adapter(NEW, path)
    assert isinstance(e.value, lorakit.LoraError) and isinstance(e.value, OSError) and e.value.errno == err
    assert str(path) in str(e.value) and reason in str(e.value) and "unchanged" in str(e.value)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before and hidden(tmp_path) == []
    assert which(path) == "old"


def test_a_swap_that_cannot_move_back_still_never_leaves_nothing(tmp_path):
    path = tmp_path / "adapter"
    lorakit.save_adapter(OLD, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "rename", _fail("rename", errno.EIO, after=1))      # every rename after the first fails
        with pytest.raises(FileWriteError, match="stopped half-way.*loading .* reads the new one"):
            lorakit.save_adapter(NEW, path)
    assert not path.exists() and which(path) == "new"
    lorakit.save_adapter(NEWER, path)
    assert hidden(tmp_path) == [] and which(path) == "newer"


def test_file_write_errors_keep_the_old_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("old\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", _fail("write", errno.ENOSPC))
        with pytest.raises(FileWriteError, match="no space left on the device.*previous file.*unchanged"):
            atomic_write_bytes(path, b"new\n" * 100)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["metrics.csv"]


def test_really_read_only_folder(tmp_path):
    """With real permissions (root ignores them, so there the simulated test above is the check)."""
    path = tmp_path / "ro" / "adapter"
    lorakit.save_adapter(OLD, path)
    os.chmod(path.parent, 0o555)
    try:
        if os.geteuid() != 0:
            with pytest.raises(FileWriteError, match="permission denied"):
                lorakit.save_adapter(NEW, path)
        else:
            lorakit.save_adapter(NEW, path)
    finally:
        os.chmod(path.parent, 0o755)
    assert which(path) == ("old" if os.geteuid() != 0 else "new") and hidden(path.parent) == []
