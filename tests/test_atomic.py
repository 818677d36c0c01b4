"""lorakit.atomic: atomic file writes, whole-folder swaps, recovery of interrupted swaps, cleanup
of leftovers (only those whose writer is gone), other files kept, hand-edited files read as written."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from conftest import MLP, randomize_adapters

import lorakit
from lorakit.atomic import (FileWriteError, atomic_save_folder, atomic_write_bytes, repair_all, repair_folder,
                            resolve_folder, write_new_file)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def hidden(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def write_files(files: dict[str, bytes]):
    def writer(tmp: Path) -> None:
        for name, data in files.items():
            write_new_file(tmp / name, data)
    return writer


# ---------------------------------------------------------------------------- one file
def test_atomic_write_bytes_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["a.txt"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~_umask()
    atomic_write_bytes(str(tmp_path / "b.bin"), bytearray(b"\x00" * 10))          # str paths, any buffer
    assert (tmp_path / "b.bin").read_bytes() == b"\x00" * 10


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_temporaries_are_removed_but_a_live_writers_are_kept(tmp_path):
    path = tmp_path / "m.csv"
    stale = tmp_path / f".m.csv.lorakit-tmp-{dead_pid()}-0badcafe"
    live = tmp_path / ".m.csv.lorakit-tmp-1-0badcafe"                 # pid 1 is always alive
    other = tmp_path / f".n.csv.lorakit-tmp-{dead_pid()}-0badcafe"   # another file's: not ours to judge here
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    atomic_write_bytes(path, b"x")
    assert sorted(os.listdir(tmp_path)) == sorted(["m.csv", live.name, other.name])


def test_writing_over_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FileWriteError, match="d: cannot save") as e:
        atomic_write_bytes(tmp_path / "d", b"x")
    assert isinstance(e.value, lorakit.LoraError) and isinstance(e.value, OSError)
    assert os.listdir(tmp_path) == ["d"]


# ---------------------------------------------------------------------------- a folder
def test_folder_swap_keeps_other_entries_without_following_symlinks(tmp_path):
    path = tmp_path / "ad"
    atomic_save_folder(path, write_files({"w.bin": b"old", "cfg.json": b"{}"}))
    (path / "README.md").write_text("readme")
    (path / "sub").mkdir()
    (path / "sub" / "deep.txt").write_text("deep")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    os.symlink(secret, path / "link")
    os.chmod(path, 0o750)
    atomic_save_folder(path, write_files({"w.bin": b"new", "cfg.json": b"{\"a\": 1}"}))
    assert (path / "w.bin").read_bytes() == b"new" and (path / "cfg.json").read_bytes() == b"{\"a\": 1}"
    assert (path / "README.md").read_text() == "readme" and (path / "sub" / "deep.txt").read_text() == "deep"
    assert os.readlink(path / "link") == str(secret)                      # recreated as a link, not copied
    assert stat.S_IMODE(path.stat().st_mode) == 0o750
    assert hidden(tmp_path) == []
    atomic_save_folder(path, write_files({"w.bin": b"only"}), keep_others=False)
    assert os.listdir(path) == ["w.bin"] and secret.read_text() == "outside"


def test_a_failing_writer_leaves_the_old_folder_and_no_leftover(tmp_path):
    path = tmp_path / "ad"
    atomic_save_folder(path, write_files({"w.bin": b"old"}))

    def broken(tmp: Path) -> None:
        write_new_file(tmp / "w.bin", b"half")
        raise RuntimeError("serialization failed")

    with pytest.raises(RuntimeError, match="serialization failed"):
        atomic_save_folder(path, broken)
    assert (path / "w.bin").read_bytes() == b"old" and hidden(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileWriteError, match="not a folder"):
        atomic_save_folder(tmp_path / "file", broken)


def test_saving_through_a_symlinked_folder_writes_its_target(tmp_path):
    real = tmp_path / "real"
    atomic_save_folder(real, write_files({"w.bin": b"old"}))
    os.symlink(real, tmp_path / "alias")
    atomic_save_folder(tmp_path / "alias", write_files({"w.bin": b"new"}))
    assert (tmp_path / "alias").is_symlink() and (real / "w.bin").read_bytes() == b"new"


# ---------------------------------------------------------------------------- recovery
def _interrupted(tmp_path: Path, pid: int) -> Path:
    """The state a crash leaves between 'path -> .old' and '.new -> path'."""
    path = tmp_path / "ad"
    new, old = tmp_path / f".ad.lorakit-new-{pid}-00aa", tmp_path / f".ad.lorakit-old-{pid}-00aa"
    for folder, data in ((new, b"new"), (old, b"old")):
        folder.mkdir()
        (folder / "w.bin").write_bytes(data)
    return path


def test_resolve_folder_reads_an_interrupted_swap_without_writing(tmp_path):
    path = _interrupted(tmp_path, dead_pid())
    listing = sorted(os.listdir(tmp_path))
    found = resolve_folder(path)
    assert found.name.startswith(".ad.lorakit-new-") and (found / "w.bin").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == listing
    repair_folder(path)                                                   # what the next save runs first
    assert os.listdir(tmp_path) == ["ad"] and (path / "w.bin").read_bytes() == b"new"


def test_a_live_writers_swap_is_not_touched(tmp_path):
    path = _interrupted(tmp_path, 1)
    listing = sorted(os.listdir(tmp_path))
    repair_folder(path)
    assert sorted(os.listdir(tmp_path)) == listing


def test_an_old_leftover_alone_is_never_resurrected(tmp_path):
    """A swap that completed, then crashed while deleting the old folder, then the user deleted
    the adapter: the leftover must not come back as the adapter."""
    path = tmp_path / "ad"
    old = tmp_path / f".ad.lorakit-old-{dead_pid()}-00aa"
    old.mkdir()
    (old / "w.bin").write_bytes(b"old")
    assert resolve_folder(path) is None
    atomic_save_folder(path, write_files({"w.bin": b"new"}))
    assert os.listdir(tmp_path) == ["ad"]


def test_repair_all_handles_every_name_in_a_folder_of_checkpoints(tmp_path):
    dead = dead_pid()
    for kind, name in (("new", "step-200"), ("old", "step-200"), ("new", "step-400"), ("new", "step-600")):
        pid = 1 if name == "step-600" else dead                        # step-600: a live writer's
        folder = tmp_path / f".{name}.lorakit-{kind}-{pid}-00aa"
        folder.mkdir()
        (folder / "state.json").write_text(f"{name} {kind}")
    (tmp_path / "step-100").mkdir()
    assert repair_all(tmp_path) == [tmp_path / "step-200", tmp_path / "step-400", tmp_path / "step-600"]
    assert sorted(os.listdir(tmp_path)) == [".step-600.lorakit-new-1-00aa", "step-100", "step-200"]
    assert (tmp_path / "step-200" / "state.json").read_text() == "step-200 new"     # rolled forward
    assert repair_all(tmp_path / "missing") == []


def _save_llama_like(folder: Path, r: int, seed: int) -> MLP:
    torch.manual_seed(0)
    m = MLP()
    lorakit.inject(m, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=["layers.0"]))
    randomize_adapters(m, seed=seed)
    lorakit.save_adapter(m, folder)
    return m


def test_a_hand_edited_config_is_read_as_written(tmp_path):
    """Hidden temporaries beside the folder (a crashed save's) never replace what the user sees."""
    path = tmp_path / "ad"
    _save_llama_like(path, 2, 1)
    pid = dead_pid()
    _save_llama_like(tmp_path / f".ad.lorakit-new-{pid}-00aa", 2, 2)
    (tmp_path / f".ad.lorakit-old-{pid}-00aa").mkdir()
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 7.5                                               # edited by hand
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    m = MLP()
    lorakit.load_adapter(m, path)
    assert lorakit.get_config(m).alpha == 7.5
    assert m.layers[0].adapters["default"].scale == 7.5 / 2


def test_concurrent_loads_during_saves_see_old_or_new_never_a_mix(tmp_path):
    """Configs of rank 2 and rank 3 alternate: a config from one save with weights from the other
    would not load. The loader opens both files from one view of the folder."""
    path = tmp_path / "ad"
    a, b = _save_llama_like(tmp_path / "a", 2, 1), _save_llama_like(tmp_path / "b", 3, 2)
    lorakit.save_adapter(a, path)
    stop, errors, ranks = threading.Event(), [], set()

    def reader():
        while not stop.is_set():
            torch.manual_seed(0)
            m = MLP()
            try:
                lorakit.load_adapter(m, path)
                ranks.add(lorakit.get_config(m).r)
            except Exception as e:                       # noqa: BLE001 - collected and asserted below
                errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            lorakit.save_adapter(b if i % 2 == 0 else a, path)
    finally:
        stop.set()
        t.join()
    assert errors == [] and ranks == {2, 3}


def test_files_guide_examples_run(tmp_path, monkeypatch, capsys):
    """docs/files.md: every ```python block, in order, as one script (so the guide cannot rot)."""
    guide = Path(__file__).resolve().parent.parent / "docs" / "files.md"
    blocks = re.findall(r"^```python\n(.*?)^```", guide.read_text(), flags=re.S | re.M)
    assert len(blocks) >= 5
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace = {"__name__": "files_guide"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{guide}:block{i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "r must be an integer >= 1, got 0" in out and "BaseModelMismatch" in out
    assert "refusing to save non-finite weights" in out and "trainer_state.json" in out
